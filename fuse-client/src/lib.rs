//! The sharefs client: a multiplexed connection to a server ([`remote`]), streamed
//! transfers ([`transfer`]), the command-line front end's shared pieces ([`settings`]),
//! and the FUSE mount ([`mount`]).
//!
//! # Layout
//! - [`remote`]: `RemoteClient`, one cheap-to-clone handle per connection; request ids,
//!   waiters, pushed events.
//! - [`connection`]: `Connection`, a `RemoteClient` that reconnects: a heartbeat that
//!   replaces a silent connection, one deadline per operation, and a client id that
//!   fences the older connections on the server.
//! - [`tls`]: how the client trusts a server (pinned fingerprint, CA, known servers).
//! - [`transfer`]: whole-file upload and download with bounded memory.
//! - [`paths`]: command-line paths (`OWNER/a/b`) and whole-tree operations (`mkdir -p`,
//!   `put -r`, `get -r`, `rm -r`, `mv`) made of one-entry requests.
//! - [`settings`]: connection settings from flags, environment, profile, password file,
//!   stored login or prompt.
//! - [`config`]: the configuration file and its profiles.
//! - [`login`]: stored logins, in the Secret Service or a 0600 file.
//! - [`display`]: how the command line shows entries (`ls -l`, human sizes, local time).
//! - [`logging`]: the log on stderr, without colour in files, rotated for a background
//!   mount.
//! - [`fs`]: the filesystem core, free of fuser and the kernel:
//!   - `fs/told.rs`: what the kernel may hold of each file's size, so an open asks it
//!     to drop attributes only when they may be another version's;
//!   - `fs/tree.rs`: the inode table, one inode per (owner, entry id), indexed by
//!     (parent, name);
//!   - `fs/listing.rs`: cached listings per directory, and fetches with the changes seen
//!     while they are in flight replayed onto them;
//!   - `fs/events.rs`: what pushed events change, and what the kernel must forget;
//!   - `fs/namespace.rs`: mkdir, symlink, unlink, rmdir, rename, setattr;
//!   - `fs/files.rs`: open files, descriptors and uploads of staged writes;
//!     `fs/creating.rs`: creates deferred to the file's first upload;
//!     `fs/durable.rs`: changes answered before the server's fdatasync, and the
//!     `close()`/`fsync()` points that make them durable;
//!   - `fs/read.rs`: ranged reads with prefetch; `fs/write.rs`: staged writes and their
//!     lazily fetched base; `fs/stream.rs`: sequential writes streamed as they happen,
//!     kept only until the server has them durable, resumed after a lost connection;
//!   - `fs/staging.rs`: the staging directory on disk and recovery of what a dead mount
//!     left; `fs/remote.rs`: the `Remote` trait the core needs of a server;
//!     `fs/error.rs`: the core's errors; `fs/room.rs`: whether a growing write fits
//!     the space the server leaves (EDQUOT/ENOSPC on the write that crosses it).
//! - [`fuse`]: the thin adapter from kernel requests to the core.
//! - [`mount`]: `sharefs mount`: connect, mount, serve until unmounted.
//! - [`fstab`]: the mount(8) helper convention (`mount -t fuse.sharefs`, /etc/fstab)
//!   translated into `sharefs mount`.
//! - [`mountpoint`]: what is mounted at the mount point already; clearing a dead mount.
//! - [`desktop`]: desktop notifications of downloads, a burst gathered into one digest;
//!   `desktop/text.rs` words the pop-ups (local times, markup escaped), `desktop/bus.rs`
//!   keeps the one D-Bus connection to the notification daemon.
//! - [`failed`]: the uploads a mount kept in its cache's `failed/` folder.
//! - [`status`]: what a running mount says of itself (`sharefs status`).
//! - [`quoting`]: text from the network made safe to print (GNU `ls` shell-escape).
//! - [`error`]: the `ClientError` type.

pub mod config;
pub mod connection;
pub mod desktop;
pub mod display;
pub mod error;
pub mod failed;
pub mod fs;
pub mod fstab;
pub mod fuse;
pub mod logging;
pub mod login;
pub mod mount;
pub mod mountpoint;
pub mod paths;
pub mod quoting;
pub mod remote;
pub mod settings;
pub mod status;
pub mod tls;
pub mod transfer;

pub use error::ClientError;
pub use remote::{AttrChange, ConnectOptions, EventStream, Move, RemoteClient, UploadTarget};
