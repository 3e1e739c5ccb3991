//! Certificate fingerprints as users see and type them: `SHA256:` and 64 hex digits.

use sha2::{Digest, Sha256};

/// The SHA-256 fingerprint of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("SHA256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Normalises a user-typed fingerprint (optional `SHA256:` prefix, colons, any case), or
/// `None` if it is not 32 bytes of hex.
pub fn parse_fingerprint(text: &str) -> Option<String> {
    let t = text.trim();
    let t = t
        .strip_prefix("SHA256:")
        .or_else(|| t.strip_prefix("sha256:"))
        .unwrap_or(t);
    let hex: String = t
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Some(format!("SHA256:{hex}"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = fingerprint(b"cert");
        assert_eq!(f.len(), 71);
        assert_eq!(parse_fingerprint(&f).as_deref(), Some(f.as_str()));
        let colons: String = f.as_bytes()[7..]
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&colons).as_deref(), Some(f.as_str()));
        assert!(parse_fingerprint("SHA256:abc").is_none());
    }
}
