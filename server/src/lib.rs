//! The sharefs server: one folder per user, files on disk, metadata in JSON.
//!
//! # Layout
//! - [`server`]: the accept loop ([`server::run`]), connection limit, graceful shutdown.
//! - [`session`]: one connection: handshake, login, request dispatch, pushed events.
//! - [`store`]: crash-safe file storage with per-file JSON metadata.
//! - [`hub`]: durable download notifications and the registry of live sessions.
//! - [`users`]: accounts with argon2id password hashes in `users.json`.
//! - [`config`]: settings and their defaults.
//!
//! Tests and embedders bind their own listener and pass their own shutdown future to
//! [`server::run`]; the binary binds the configured address and passes SIGINT/SIGTERM.

pub mod config;
pub mod error;
pub mod fsutil;
pub mod hub;
pub mod server;
pub mod session;
pub mod store;
pub mod throttle;
pub mod tls;
pub mod users;

pub use config::ServerConfig;
pub use error::ServerError;
pub use server::run;
