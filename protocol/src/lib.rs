//! The sharefs wire protocol, shared by the server, the command-line client and the mount.
//!
//! # Layout
//! - [`frame`]: byte framing with no I/O: a length prefix, a JSON header and a raw binary
//!   payload. The codec enforces a maximum frame size before buffering anything.
//! - [`message`]: the typed messages carried in frame headers (handshake, login, requests,
//!   replies, pushed events) and the error codes that travel as data.
//! - [`decode`]: the server's common messages decoded in one pass (serde's way for
//!   internally tagged enums parses each message twice).
//! - [`name`]: validation of user and file names; the server enforces it, clients use it to
//!   fail early with the same words.
//! - [`fingerprint`]: the SHA-256 fingerprints by which clients pin a server certificate.
//! - `manual` (feature `cli`): the `completions` and `man` subcommands both binaries
//!   offer, generated from each one's command-line definition.
//!
//! The protocol is documented for humans in `docs/PROTOCOL.md`.

pub mod decode;
pub mod fingerprint;
pub mod frame;
#[cfg(feature = "cli")]
pub mod manual;
pub mod message;
pub mod name;

/// The TLS cipher suites both ends offer: rustls' ring defaults with AES-128-GCM first.
/// AES-128 has 10 rounds to AES-256's 14 and is what sshfs is compared with; it stays
/// well beyond brute force. Both ends prefer it, so it is what they agree on.
pub fn tls_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    std::sync::Arc::new(provider)
}

pub use frame::{Frame, FrameCodec, FrameError, FrameSink};
pub use message::*;

/// First bytes of every session, so a stray client (or a TLS client meeting a plaintext
/// server) is recognised at once.
pub const MAGIC: &str = "sharefs";
/// Protocol version spoken by this build. A peer with another version is refused with
/// [`ErrorCode::VersionMismatch`], whose message tells the user which side to upgrade.
/// Version 2 made each user's folder a tree addressed by entry ids; version 1 was flat.
/// Version 3 made uploads resumable (`upload_sync`, `upload_resume`, `upload_read`,
/// `content_hash`); a server speaking it still serves version 2 clients, which never ask
/// for those.
pub const VERSION: u32 = 3;
/// Oldest client protocol a server of this build serves.
pub const MIN_CLIENT_VERSION: u32 = 2;
/// Default cap on a whole frame (header and payload).
pub const DEFAULT_MAX_FRAME: u32 = 4 * 1024 * 1024;
/// Largest data chunk a client asks for or sends in one frame; leaves room for the header
/// inside [`DEFAULT_MAX_FRAME`]. On a connection whose negotiated frame is smaller, chunks
/// are [`chunk_size`] of it.
pub const CHUNK_SIZE: u32 = 1024 * 1024;
/// Room a frame carrying data keeps for its length prefixes and JSON header (a `chunk`, a
/// `data` reply, an `opened` reply with its `FileInfo`).
pub const FRAME_ROOM: u32 = 4 * 1024;
/// Smallest frame size a server serves with and a handshake settles on: a 64 KiB chunk and
/// its header.
pub const MIN_FRAME: u32 = 64 * 1024 + FRAME_ROOM;
/// Longest password, in bytes: a longer one is refused at login (`too_large`) before any
/// password check, and when an account is created or its password changed.
pub const MAX_PASSWORD: usize = 1024;
/// Largest frame size a server may be configured with (each connection may buffer one).
pub const MAX_FRAME_LIMIT: u32 = 64 * 1024 * 1024;

/// The largest data chunk that fits in a frame of `max_frame` bytes with its header:
/// [`CHUNK_SIZE`], or less on a connection that negotiated small frames.
pub fn chunk_size(max_frame: u32) -> u32 {
    CHUNK_SIZE.min(max_frame.saturating_sub(FRAME_ROOM)).max(1)
}
/// Cap on a frame's JSON header, whatever the negotiated frame size.
pub const MAX_HEADER: u32 = 2 * 1024 * 1024;
/// Most files in one listing page.
pub const LIST_PAGE: u32 = 4096;
/// Most bytes of JSON the files of one listing page may take; a page ends at whichever
/// of this and [`LIST_PAGE`] comes first (names that escape to six bytes a character
/// would otherwise make a page of [`LIST_PAGE`] files outgrow [`MAX_HEADER`]).
pub const LIST_PAGE_BYTES: usize = 256 * 1024;

#[cfg(test)]
mod tests {
    #[test]
    fn aes_128_gcm_is_offered_first() {
        let provider = super::tls_provider();
        let suites: Vec<_> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert!(suites.contains(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
    }
}
