//! The BLAKE3 hash of a file's content as an entry keeps it: its 32 bytes. Snapshots,
//! journals, the metadata database and the protocol carry it as 64 hex digits; kept as
//! such, every entry of a tree held a 64-byte allocation (80 with the allocator's own)
//! for it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A content's BLAKE3 hash, or none (directories, links).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digest(Option<[u8; 32]>);

impl Digest {
    /// From 64 hex digits, either case; `""` is none.
    pub fn from_hex(hex: &str) -> Option<Digest> {
        if hex.is_empty() {
            return Some(Digest(None));
        }
        blake3::Hash::from_hex(hex)
            .ok()
            .map(|h| Digest(Some(*h.as_bytes())))
    }

    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }

    /// 64 lowercase hex digits; `""` for none.
    pub fn to_hex(&self) -> String {
        self.hex()
            .map(|h| h.as_ref().to_string())
            .unwrap_or_default()
    }

    fn hex(&self) -> Option<impl AsRef<str>> {
        self.0.map(|b| blake3::Hash::from_bytes(b).to_hex())
    }

    /// Whether `hash` is this one.
    pub fn is(&self, hash: &blake3::Hash) -> bool {
        self.0.as_ref() == Some(hash.as_bytes())
    }
}

impl From<blake3::Hash> for Digest {
    fn from(hash: blake3::Hash) -> Digest {
        Digest(Some(*hash.as_bytes()))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.hex() {
            Some(hex) => s.serialize_str(hex.as_ref()),
            None => s.serialize_str(""),
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = Digest;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a BLAKE3 hash in hex, or an empty string")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Digest, E> {
                Digest::from_hex(v).ok_or_else(|| E::custom(format!("not a BLAKE3 hash: {v:?}")))
            }
        }
        d.deserialize_str(Hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_is_written_and_read_as_hex_in_either_case() {
        let hash = blake3::hash(b"content");
        let d = Digest::from(hash);
        assert!(d.is(&hash) && !d.is(&blake3::hash(b"other")));
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{}\"", hash.to_hex()));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        let upper = json.to_ascii_uppercase();
        assert_eq!(serde_json::from_str::<Digest>(&upper).unwrap(), d);
        assert_eq!(d.to_hex(), hash.to_hex().as_str());
        let none = Digest::default();
        assert!(none.is_none());
        assert_eq!(serde_json::to_string(&none).unwrap(), "\"\"");
        assert_eq!(serde_json::from_str::<Digest>("\"\"").unwrap(), none);
        assert!(serde_json::from_str::<Digest>("\"abc\"").is_err());
        assert!(Digest::from_hex(&"g".repeat(64)).is_none());
    }
}
