//! The sharefs server: one folder per user, files on disk, metadata in JSON.
//!
//! # Layout
//! - [`server`]: the accept loop ([`server::run`]), connection limit, graceful shutdown.
//! - [`threads`]: the session threads connections are spread over, one per core.
//! - [`session`]: one connection: handshake, request dispatch, open-handle limits.
//! - [`outbox`]: a connection's replies, queued within its and its user's byte allowance,
//!   and the writer that sends them and pushed events (closing a peer that stops reading).
//! - [`login`]: login checks: bounded names and passwords, throttling ([`throttle`]),
//!   password checks one per core at a time, a rate-limited log ([`ratelog`]).
//! - [`cutoff`]: the deadline and fence past which a request must have no effect.
//! - [`store`]: crash-safe file storage: per user, a JSON journal of file metadata with
//!   snapshots, small files appended to a pack, large ones as blobs.
//! - [`space`]: the disk reserve, claimed by every write so concurrent writers add up.
//! - [`reservations`]: the quota held by uploads in progress, so they add up too.
//! - [`hub`]: durable download notifications and the registry of live sessions.
//! - [`users`]: accounts with argon2id password hashes in `users.json`.
//! - [`accounts`]: ends the sessions of accounts removed or re-passworded meanwhile.
//! - [`config`]: settings and their defaults.
//!
//! Tests and embedders bind their own listener and pass their own shutdown future to
//! [`server::run`]; the binary binds the configured address and passes SIGINT/SIGTERM.

pub mod accounts;
pub mod config;
pub mod cutoff;
pub mod error;
pub mod fsutil;
pub mod hub;
pub mod login;
pub mod outbox;
pub mod ratelog;
pub mod reservations;
pub mod server;
pub mod session;
pub mod space;
pub mod store;
pub mod threads;
pub mod throttle;
pub mod tls;
pub mod users;

pub use config::ServerConfig;
pub use error::ServerError;
pub use server::run;
