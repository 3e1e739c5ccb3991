//! Client errors.

use sharefs_protocol::{ErrorBody, ErrorCode};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{0}")]
    Remote(ErrorBody),
    /// The connection is gone; in-flight requests fail with this.
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The server's identity could not be verified; retrying will not help.
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Io(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
}

impl ClientError {
    /// The server's error code, when the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Remote(body) => Some(body.code),
            _ => None,
        }
    }

    /// Whether retrying on a new connection may succeed. A request the server refused as
    /// expired did not run: the connection it came on was replaced (or its deadline
    /// passed, which the retry's own deadline catches).
    pub fn is_connection_error(&self) -> bool {
        match self {
            ClientError::Disconnected(_)
            | ClientError::Connect { .. }
            | ClientError::Timeout(_) => true,
            ClientError::Remote(body) => body.code == ErrorCode::Expired,
            ClientError::Tls(_) | ClientError::Io(_) | ClientError::Protocol(_) => false,
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> ClientError {
        ClientError::Io(e.to_string())
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
