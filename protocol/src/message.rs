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
        /// A change whose answer need not wait for the disk: the server answers once the
        /// change is made and written, and makes it durable with the owner's next change
        /// that waits, a `sync`, or within [`LAZY_SYNC_MS`], whichever comes first. Only
        /// for changes that carry no file content (`mkdir`, `symlink`, `set_attr`, an
        /// empty `put`); a change with content waits for the disk whatever this says.
        #[serde(default, skip_serializing_if = "is_false")]
        lazy: bool,
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
///
/// Entries are addressed by id within their owner's tree: [`ROOT_ID`] is the owner's
/// folder itself. Ids are never reused within a tree, so a client may key its cache on
/// (owner, id) and an open handle or a pending upload follows its entry through renames.
/// Reading another user's tree needs, on every directory from the root down, the "other"
/// execute bit (o+x) to pass, the "other" read bit (o+r) to list it, and o+r on a file to
/// open it; writing is only ever allowed in one's own tree (`owner` must be the caller).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    ListUsers,
    /// One page of a directory's entries, sorted by name, starting after `after`.
    List {
        owner: String,
        dir: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// The entry `name` in directory `parent`.
    Lookup {
        owner: String,
        parent: u64,
        name: String,
    },
    /// The entry `id`, wherever it now is.
    Stat {
        owner: String,
        /// Sent as `entry`: `id` is the request's own id in the same JSON object.
        #[serde(rename = "entry")]
        id: u64,
    },
    /// The entry at `path` ("a/b/c", relative to the owner's folder; "" is the folder),
    /// as a sequence of lookups. Symbolic links are not followed.
    Resolve {
        owner: String,
        path: String,
    },
    /// Opens a regular file for reading. Opening another user's file is a download and
    /// notifies its owner. The handle reads the version that was current at open.
    Open {
        owner: String,
        /// Sent as `entry` (see `stat`).
        #[serde(rename = "entry")]
        id: u64,
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
    /// Starts an upload into the caller's own tree. With `replace`, the commit makes the
    /// content the new version of that file wherever it then is (`not_found` if it was
    /// removed meanwhile); without, it creates or replaces the regular file `name` in
    /// `parent`. `size`, when known, is checked against quota and free space before any
    /// byte is sent. `mode` sets the permission bits (default 0644 for a new file; a
    /// replaced file keeps its own unless given).
    UploadBegin {
        owner: String,
        parent: u64,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replace: Option<u64>,
        #[serde(default)]
        size: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
    },
    /// Commits an upload: the file becomes visible atomically, replacing any old version.
    /// `blake3` is the hex BLAKE3 hash of the whole content. `mtime_ns` sets the
    /// modification time (default: the commit's time).
    UploadCommit {
        upload: u64,
        size: u64,
        blake3: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtime_ns: Option<i64>,
    },
    UploadAbort {
        upload: u64,
    },
    /// Makes every byte of `upload` received so far durable; answered with
    /// `upload_durable` once it is. From then on the upload survives the loss of this
    /// connection and a restart of the server: `upload_resume` picks it up from there.
    UploadSync {
        upload: u64,
    },
    /// Takes up an upload of the caller that a lost connection or a server restart left
    /// behind (kept for the server's upload idle bound), answered with `upload_started`
    /// whose `offset` is where its chunks go on: at least the last `upload_durable`
    /// answer, at most what was sent. `busy` while the connection that had it has not
    /// yet let it go or its commit is running; `not_found` once it is gone (committed,
    /// aborted, failed or expired: `content_hash` tells whether a commit whose answer was
    /// lost made it).
    UploadResume {
        upload: u64,
    },
    /// Reads back bytes of an upload in progress (everything sent before this request);
    /// the data is the response payload, shorter at the end of what was received.
    UploadRead {
        upload: u64,
        offset: u64,
        len: u32,
    },
    /// The BLAKE3 hash of the current content of one of the caller's own files.
    ContentHash {
        owner: String,
        /// Sent as `entry` (see `stat`).
        #[serde(rename = "entry")]
        id: u64,
    },
    /// Uploads a small file in one round trip: the payload is the whole content. Fields as
    /// in `upload_begin` and `upload_commit`.
    Put {
        owner: String,
        parent: u64,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replace: Option<u64>,
        blake3: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtime_ns: Option<i64>,
    },
    /// Creates the directory `name` in `parent` (`exists` if the name is taken).
    Mkdir {
        owner: String,
        parent: u64,
        name: String,
        mode: u32,
    },
    /// Creates the symbolic link `name` in `parent`, pointing at `target` as given.
    Symlink {
        owner: String,
        parent: u64,
        name: String,
        target: String,
    },
    /// Removes `name` from `parent`: a file or symbolic link when `dir` is false
    /// (`is_a_directory` for a directory), an empty directory when true (`not_a_directory`,
    /// `not_empty`).
    Remove {
        owner: String,
        parent: u64,
        name: String,
        #[serde(default)]
        dir: bool,
    },
    /// Moves `name` in `parent` to `new_name` in `new_parent`, atomically replacing what is
    /// there as rename(2) does (a file by a file, an empty directory by a directory), or
    /// failing with `exists` when `noreplace` is set. A directory cannot move into its own
    /// subtree (`invalid_argument`). Returns the moved entry.
    Rename {
        owner: String,
        parent: u64,
        name: String,
        new_parent: u64,
        new_name: String,
        #[serde(default, skip_serializing_if = "is_false")]
        noreplace: bool,
    },
    /// Changes an entry's permission bits and times; absent fields are kept. The change
    /// time becomes now.
    SetAttr {
        owner: String,
        /// Sent as `entry` (see `stat`).
        #[serde(rename = "entry")]
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        atime_ns: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtime_ns: Option<i64>,
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
    /// Makes every change of the caller's own tree answered before it durable (the `lazy`
    /// ones); answered with `ok` once they are.
    Sync,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// At most this many milliseconds pass between the answer to a `lazy` change and the
/// server making it durable (when nothing else made it durable sooner).
pub const LAZY_SYNC_MS: u64 = 10;

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
        /// More entries follow the last one: ask again with `after`.
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
        /// Where the upload's chunks continue: 0 for a new one, the resume point for a
        /// resumed one.
        #[serde(default, skip_serializing_if = "is_zero_u64")]
        offset: u64,
    },
    /// Every byte of the upload before `durable` is on disk.
    UploadDurable {
        durable: u64,
    },
    /// A file's current content: its version, size and hex BLAKE3 hash.
    ContentHash {
        version: u64,
        size: u64,
        blake3: String,
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
    /// An entry was created, changed (content, mode, times) or moved: `file` is what it is
    /// now, its `parent` and `name` where it now is. A change of a directory's entries
    /// also sends the directory's own new attributes. `from` is where a moved entry was.
    Changed {
        owner: String,
        file: FileInfo,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<Place>,
    },
    /// The entry `id`, which was `name` in `parent`, is gone.
    Removed {
        owner: String,
        id: u64,
        parent: u64,
        name: String,
    },
    /// The set of users changed.
    UsersChanged,
    /// Events were dropped for this session (it fell behind); treat every cached entry
    /// as possibly stale.
    Resync,
}

/// Where an entry is: its name in a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    pub parent: u64,
    pub name: String,
}

/// The id of a user's folder, the root of their tree.
pub const ROOT_ID: u64 = 1;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// Permission bits a file gets unless its owner says otherwise.
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// Permission bits a directory gets unless its owner says otherwise.
pub const DEFAULT_DIR_MODE: u32 = 0o755;
/// The bits of a mode that are stored: permissions, setuid, setgid and sticky.
pub const MODE_MASK: u32 = 0o7777;

/// An entry of a user's tree, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub owner: String,
    /// Unique within the owner's tree and never reused; [`ROOT_ID`] is the folder.
    pub id: u64,
    /// The directory holding it; 0 for the folder itself.
    pub parent: u64,
    /// Its name in `parent`; empty for the folder itself.
    pub name: String,
    pub kind: EntryKind,
    /// Permission bits ([`MODE_MASK`]).
    pub mode: u32,
    /// Bytes of content; the target's length for a symbolic link; 0 for a directory.
    pub size: u64,
    /// Modification, access and change times, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    pub atime_ns: i64,
    pub ctime_ns: i64,
    /// Changes whenever the content changes; a reader pinned to a version keeps it.
    pub version: u64,
    /// Where a symbolic link points, as it was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl FileInfo {
    /// An upper bound on the bytes of this entry's JSON, found without encoding it:
    /// listing pages are budgeted with it.
    pub fn json_size_bound(&self) -> usize {
        // Keys, quotes and punctuation, and ten numbers of at most 20 characters each.
        const FIXED: usize = 384;
        FIXED
            + json_string_bound(&self.owner)
            + json_string_bound(&self.name)
            + self.target.as_deref().map_or(0, json_string_bound)
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
    /// The file's path in the owner's tree when it was downloaded ("a/b/c.pdf").
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
    /// Entries in the caller's tree (files, directories and symbolic links).
    pub files: u64,
    /// Bytes the caller's quota still allows, when there is a quota (`available` is this
    /// or the free disk, whichever is smaller): tells a client whether a write that does
    /// not fit runs out of quota or of disk. Absent without a quota, and from servers
    /// before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_available: Option<u64>,
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
    /// The name is taken (mkdir, symlink, a `noreplace` rename).
    Exists,
    /// A directory to be removed or replaced has entries.
    NotEmpty,
    /// A path component or a directory operation's target is not a directory.
    NotADirectory,
    /// A file operation's target is a directory.
    IsADirectory,
    /// The request makes no sense as asked (a directory moved into its own subtree).
    InvalidArgument,
    /// The operation is never allowed on this server (hard links, device nodes).
    NotPermitted,
    /// A path is longer than [`crate::name::MAX_PATH`] or a symlink target too long.
    NameTooLong,
    Internal,
    #[serde(other)]
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request travels flattened beside the request's own `id`: no field of theirs
    /// may take a key of the envelope.
    #[test]
    fn every_request_round_trips_inside_its_envelope() {
        let owner = || "alice".to_string();
        let ops = vec![
            Request::ListUsers,
            Request::List {
                owner: owner(),
                dir: 1,
                after: Some("a".into()),
                limit: Some(2),
            },
            Request::Lookup {
                owner: owner(),
                parent: 1,
                name: "n".into(),
            },
            Request::Stat {
                owner: owner(),
                id: 7,
            },
            Request::Resolve {
                owner: owner(),
                path: "a/b".into(),
            },
            Request::Open {
                owner: owner(),
                id: 7,
                head: 3,
            },
            Request::Read {
                handle: 1,
                offset: 2,
                len: 3,
            },
            Request::Close { handle: 1 },
            Request::UploadBegin {
                owner: owner(),
                parent: 1,
                name: "n".into(),
                replace: Some(7),
                size: Some(1),
                mode: Some(0o600),
            },
            Request::UploadCommit {
                upload: 1,
                size: 2,
                blake3: "h".into(),
                mtime_ns: Some(4),
            },
            Request::UploadAbort { upload: 1 },
            Request::UploadSync { upload: 1 },
            Request::UploadResume { upload: 1 },
            Request::UploadRead {
                upload: 1,
                offset: 2,
                len: 3,
            },
            Request::ContentHash {
                owner: owner(),
                id: 5,
            },
            Request::Put {
                owner: owner(),
                parent: 1,
                name: "n".into(),
                replace: Some(7),
                blake3: "h".into(),
                mode: Some(0o600),
                mtime_ns: Some(-1),
            },
            Request::Mkdir {
                owner: owner(),
                parent: 1,
                name: "d".into(),
                mode: 0o755,
            },
            Request::Symlink {
                owner: owner(),
                parent: 1,
                name: "l".into(),
                target: "t".into(),
            },
            Request::Remove {
                owner: owner(),
                parent: 1,
                name: "n".into(),
                dir: true,
            },
            Request::Rename {
                owner: owner(),
                parent: 1,
                name: "a".into(),
                new_parent: 2,
                new_name: "b".into(),
                noreplace: true,
            },
            Request::SetAttr {
                owner: owner(),
                id: 7,
                mode: Some(0o644),
                atime_ns: Some(1),
                mtime_ns: Some(2),
            },
            Request::Ack { ids: vec![1] },
            Request::Notifications { recent: 3 },
            Request::StatFs,
            Request::Ping,
            Request::Sync,
        ];
        for (i, op) in ops.into_iter().enumerate() {
            let msg = ClientMessage::Request {
                id: 99,
                deadline_ms: Some(5),
                lazy: i % 2 == 0,
                op,
            };
            let json = serde_json::to_string(&msg).unwrap();
            let back: ClientMessage = serde_json::from_str(&json).unwrap();
            assert_eq!(back, msg, "{json}");
        }
        let event = ServerMessage::Event {
            event: Event::Removed {
                owner: "a".into(),
                id: 3,
                parent: 1,
                name: "n".into(),
            },
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(serde_json::from_str::<ServerMessage>(&json).unwrap(), event);
    }

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
                id: u64::MAX,
                parent: u64::MAX,
                name: name.to_string(),
                kind: super::EntryKind::Symlink,
                mode: u32::MAX,
                size: u64::MAX,
                mtime_ns: i64::MIN,
                atime_ns: i64::MIN,
                ctime_ns: i64::MIN,
                version: u64::MAX,
                target: Some(name.to_string()),
            };
            let real = serde_json::to_vec(&info).unwrap().len();
            assert!(info.json_size_bound() >= real, "{name:?}: {real}");
            assert!(
                info.json_size_bound() <= real + 384,
                "{name:?}: far above {real}"
            );
        }
    }
}

#[cfg(test)]
mod seeds {
    /// The fuzz seeds of `fuzz/seeds/messages` are messages of this protocol version.
    #[test]
    fn fuzz_seeds_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/messages");
        let mut parsed = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            let client = serde_json::from_slice::<super::ClientMessage>(&bytes).is_ok();
            let server = serde_json::from_slice::<super::ServerMessage>(&bytes).is_ok();
            assert!(client || server, "{}", String::from_utf8_lossy(&bytes));
            parsed += 1;
        }
        assert!(parsed >= 8);
    }
}
