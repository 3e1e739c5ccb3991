//! The sharefs server: one folder per user, each a tree of entries; files on disk,
//! metadata in JSON.
//!
//! # Layout
//! - [`server`]: the accept loop ([`server::run`]), connection limit, graceful shutdown,
//!   TLS or plaintext transport and refusals.
//! - [`shared`]: the state every connection shares and the per-user and server-wide limits
//!   (used by `server` and `session`, which do not use each other).
//! - [`threads`]: the session threads connections are spread over, one per core.
//! - [`session`]: one connection: its reader loop and dispatch; `session::handshake`
//!   (hello, version, login), `session::requests` (tree reads and writes, open handles
//!   and their limits, reply rooms), `session::uploads` (chunked uploads,
//!   their syncs and resumes).
//! - [`outbox`]: a connection's replies, queued within its and its user's byte allowance,
//!   and the writer that sends them and pushed events (closing a peer that stops reading).
//! - [`login`]: login checks: bounded names and passwords, throttling ([`throttle`]),
//!   password checks one per core at a time, a rate-limited log ([`ratelog`]).
//! - [`cutoff`]: the deadline and fence past which a request must have no effect.
//! - [`storage`]: the two interfaces storage sits behind: a metadata store (the tree) and
//!   a blob store (contents).
//! - [`store`]: their embedded implementation, crash-safe: per user, a tree of entries
//!   ([`store::tree`], each content's hash kept as [`store::digest`]) in a JSON journal
//!   with snapshots ([`store::journal`]), small contents appended to a pack
//!   ([`store::pack`]), large ones as blobs; uploads being received
//!   ([`store::upload`]) and kept for a resume across lost connections and restarts
//!   ([`store::parts`]), read handles ([`store::read`]), loading a folder
//!   ([`store::folder`]) and migrating the flat layout of protocol 1 ([`store::migrate`]);
//!   the operations on a tree are split into reading (`store::reading`), changing
//!   (`store::changes`) and contents (`store::contents`); `store::flusher` makes lazy
//!   changes durable when nothing else does; `store::access` (what a caller may see of a
//!   tree) and `store::events` (the events of a change) are shared with the cluster.
//! - [`cluster`]: the scale-out implementation of both: trees in PostgreSQL
//!   ([`cluster::schema`], [`cluster::rows`]), contents as block objects in an
//!   S3-compatible store ([`cluster::objects`]), uploads resumable from any node
//!   ([`cluster::uploads`]), accounts ([`cluster::accounts`]) and notifications
//!   ([`cluster::notes`]) shared by the nodes, over one database handle
//!   ([`cluster::db`]); changes and notifications of other nodes reach this one's
//!   sessions through [`cluster::feed`].
//! - [`space`]: the disk reserve, claimed by every write so concurrent writers add up.
//! - [`reservations`]: the quota held by uploads in progress, so they add up too.
//! - [`hub`]: the registry of live sessions and the front of download notifications.
//! - [`notes`]: where notifications are kept until acknowledged, and the embedded
//!   implementation in files ([`notes::files`]).
//! - [`users`]: accounts with argon2id password hashes, in `users.json` by default.
//! - [`accounts`]: ends the sessions of accounts removed or re-passworded meanwhile.
//! - [`metrics`]: what the server counts, in Prometheus types; `metrics::endpoint` serves
//!   them over HTTP, `metrics::counted` counts the bytes on each connection's socket.
//! - [`config`]: settings and their defaults.
//! - [`error`]: the server's errors and their one mapping to protocol error codes.
//! - [`fsutil`]: durable file operations (temp file, fsync, rename, directory fsync).
//! - [`tls`]: the server's certificate and TLS configuration.
//! - [`units`]: sizes parsed from and written for people (`10G`, `10 GiB`).
//!
//! Tests and embedders bind their own listener and pass their own shutdown future to
//! [`server::run`]; the binary binds the configured address and passes SIGINT/SIGTERM.

pub mod accounts;
pub mod cluster;
pub mod config;
pub mod cutoff;
pub mod error;
pub mod fsutil;
pub mod hub;
pub mod login;
pub mod metrics;
pub mod notes;
pub mod outbox;
pub mod ratelog;
pub mod reservations;
pub mod server;
pub mod session;
pub mod shared;
pub mod space;
pub mod storage;
pub mod store;
pub mod threads;
pub mod throttle;
pub mod tls;
pub mod units;
pub mod users;

pub use config::ServerConfig;
pub use error::ServerError;
pub use server::run;
