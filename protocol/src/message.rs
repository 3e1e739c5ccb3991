//! Messages carried in frame headers.
//!
//! A session is: client `Hello` -> server `Hello` (or an error and close), client `Login`
//! -> server `LoginOk` (or an error and close), then any number of `Request`s, each with a
//! client-chosen id, answered by exactly one `Response` or `Error` with that id, in any
//! order. `Chunk` frames carry upload data and have no answer: a failed chunk fails the
//! upload, which its commit reports. The server pushes `Event`s at any time after login.
//!
//! Errors are data ([`ErrorBody`]) so a request failing never costs the connection.

use serde::{Deserialize, Serialize};

/// Messages from client to server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Hello {
        magic: String,
        version: u32,
        /// Largest frame the client accepts.
        max_frame: u32,
    },
    Login {
        user: String,
        password: String,
        /// Identifies one client process (a mount) across its reconnections. A login with
        /// the same user and client fences that client's older connections: nothing they
        /// still deliver runs, so a request retried on the new connection runs at most once.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<u64>,
    },
    Request {
        id: u64,
        /// Milliseconds after the server's `Hello` (by the server's clock) past which the
        /// request must not run: the server refuses it with `expired` instead. The client
        /// gives up on the request no earlier, so a request it reported as failed never
        /// runs later.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_ms: Option<u64>,
        #[serde(flatten)]
        op: Request,
    },
    /// Upload data for `upload`, at `offset`; the bytes are the frame payload.
    Chunk { upload: u64, offset: u64 },
}

/// Messages from server to client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Hello {
        magic: String,
        version: u32,
        /// Largest frame either side may send on this connection.
        max_frame: u32,
    },
    LoginOk {
        user: String,
    },
    Response {
        id: u64,
        #[serde(flatten)]
        reply: Reply,
    },
    /// A failed request (`id` set) or a connection-level failure (`id` absent), after which
    /// the server closes the connection.
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        #[serde(flatten)]
        error: ErrorBody,
    },
    Event {
        #[serde(flatten)]
        event: Event,
    },
}

/// Operations after login.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    ListUsers,
    /// One page of a user's files, sorted by name, starting after `after`.
    ListFiles {
        owner: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    Stat {
        owner: String,
        name: String,
    },
    /// Opens a file for reading. Opening another user's file is a download and notifies
    /// its owner. The handle reads the version that was current at open.
    Open {
        owner: String,
        name: String,
        /// Up to this many bytes from the start of the file come back with the reply (as
        /// its payload), saving small files a round trip.
        #[serde(default, skip_serializing_if = "is_zero")]
        head: u32,
    },
    /// Reads up to `len` bytes at `offset`; the data is the response payload, shorter at
    /// end of file.
    Read {
        handle: u64,
        offset: u64,
        len: u32,
    },
    Close {
        handle: u64,
    },
    /// Starts an upload into `owner`'s folder, which must be the caller's own. `size`, when known, is checked
    /// against quota and free space before any byte is sent.
    UploadBegin {
        owner: String,
        name: String,
        #[serde(default)]
        size: Option<u64>,
    },
    /// Commits an upload: the file becomes visible atomically, replacing any old version.
    /// `blake3` is the hex BLAKE3 hash of the whole content.
    UploadCommit {
        upload: u64,
        size: u64,
        blake3: String,
    },
    UploadAbort {
        upload: u64,
    },
    /// Uploads a small file in one round trip: the payload is the whole content.
    Put {
        owner: String,
        name: String,
        blake3: String,
    },
    Delete {
        owner: String,
        name: String,
    },
    /// Renames within the caller's own folder, replacing `to` if it exists.
    Rename {
        owner: String,
        from: String,
        to: String,
    },
    /// Acknowledges notifications shown to the user.
    Ack {
        ids: Vec<u64>,
    },
    /// Pending notifications and up to `recent` of the latest ones, pending or not.
    Notifications {
        #[serde(default)]
        recent: u32,
    },
    StatFs,
    /// Keeps an idle connection alive; answered with `ok`.
    Ping,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Ok,
    Users {
        users: Vec<String>,
    },
    Files {
        files: Vec<FileInfo>,
        /// More files follow the last one: ask again with `after`.
        #[serde(default)]
        more: bool,
    },
    File {
        file: FileInfo,
    },
    Opened {
        handle: u64,
        file: FileInfo,
    },
    /// File data; the bytes are the frame payload.
    Data,
    UploadStarted {
        upload: u64,
    },
    Notifications {
        pending: Vec<Notification>,
        recent: Vec<Notification>,
    },
    Space(Space),
}

/// What the server pushes without being asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// One of the caller's files was downloaded; pending until acknowledged.
    Notification { notification: Notification },
    /// A file was created, replaced or renamed into place (`file` set) or removed.
    FileChanged {
        owner: String,
        name: String,
        #[serde(default)]
        file: Option<FileInfo>,
    },
    /// The set of users changed.
    UsersChanged,
    /// Events were dropped for this session (it fell behind); treat every cached entry
    /// as possibly stale.
    Resync,
}

/// A file as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub owner: String,
    pub name: String,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Changes whenever the content changes; a reader pinned to a version keeps it.
    pub version: u64,
}

impl FileInfo {
    /// An upper bound on the bytes of this entry's JSON, found without encoding it:
    /// listing pages are budgeted with it.
    pub fn json_size_bound(&self) -> usize {
        // Keys, quotes and punctuation, and three numbers of at most 20 characters each.
        const FIXED: usize = 128;
        FIXED + json_string_bound(&self.owner) + json_string_bound(&self.name)
    }
}

/// The most bytes `s` takes inside a JSON string: escapes take two bytes, or six for
/// other control characters.
fn json_string_bound(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// A download of one of the recipient's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub id: u64,
    /// Who downloaded.
    pub downloader: String,
    /// Owner of the file (the recipient).
    pub owner: String,
    pub file: String,
    pub size: u64,
    /// First and latest download, milliseconds since the Unix epoch.
    pub first_ms: i64,
    pub last_ms: i64,
    /// Downloads coalesced into this notification.
    pub count: u32,
    /// Non-zero for a digest: this many older notifications were folded into this one
    /// (the server keeps a bounded number pending per user). `file` then says so in words
    /// ("N more files, not shown one by one"), `downloader` is the one who downloaded them
    /// all or "several users", `count` and `size` are their totals. Absent (0) otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub folded: u32,
}

/// Space as `df` should show it to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    /// Bytes the caller may use in all (quota, or the disk size).
    pub total: u64,
    /// Bytes the caller may still write.
    pub available: u64,
    /// Bytes used by the caller's files.
    pub used: u64,
    pub files: u64,
}

/// Typed failure, carried as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

/// Error codes of the protocol. New codes may be added; an unknown code decodes as
/// `Other` so old clients still show the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    PermissionDenied,
    InvalidName,
    QuotaExceeded,
    NoSpace,
    AuthFailed,
    /// Too many failed logins from this address or for this user: wait and retry.
    Throttled,
    VersionMismatch,
    ProtocolError,
    TooLarge,
    Busy,
    ChecksumMismatch,
    /// The version a handle was opened on is gone.
    Stale,
    /// The request arrived after its deadline, or on a connection a newer one of the same
    /// client replaced; it did not run.
    Expired,
    /// A limit on open handles (per connection, per user or server-wide) was reached:
    /// close some and retry.
    TooManyOpen,
    Internal,
    #[serde(other)]
    Other,
}

#[cfg(test)]
mod tests {
    use super::FileInfo;

    #[test]
    fn the_json_size_bound_is_never_below_the_encoding() {
        for name in [
            "plain.txt",
            &"\\".repeat(255),
            "a\"b\u{1}\u{1f}c",
            &"é".repeat(127),
        ] {
            let info = FileInfo {
                owner: "some-user".into(),
                name: name.to_string(),
                size: u64::MAX,
                mtime_ns: i64::MIN,
                version: u64::MAX,
            };
            let real = serde_json::to_vec(&info).unwrap().len();
            assert!(info.json_size_bound() >= real, "{name:?}: {real}");
            assert!(
                info.json_size_bound() <= real + 128,
                "{name:?}: far above {real}"
            );
        }
    }
}
