//! The sharefs client: a multiplexed connection to a server ([`remote`]), streamed
//! transfers ([`transfer`]), and the command-line front end's shared pieces ([`settings`]).
//!
//! # Layout
//! - [`remote`]: `RemoteClient`, one cheap-to-clone handle per connection; request ids,
//!   waiters, pushed events.
//! - [`transfer`]: whole-file upload and download with bounded memory.
//! - [`settings`]: connection settings from flags, environment, password file or prompt.
//! - [`error`]: the `ClientError` type.

pub mod connection;
pub mod desktop;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod mount;
pub mod remote;
pub mod settings;
pub mod tls;
pub mod transfer;

pub use error::ClientError;
pub use remote::{ConnectOptions, EventStream, RemoteClient};
