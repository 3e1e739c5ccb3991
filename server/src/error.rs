//! Server errors and their one mapping to protocol error codes.

use sharefs_protocol::{ErrorBody, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: already exists")]
    Exists(String),
    #[error("{0}: directory not empty")]
    NotEmpty(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("{0}: is a directory")]
    IsADirectory(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    #[error("name too long: {0}")]
    NameTooLong(String),
    #[error("{0}: no such user")]
    NoSuchUser(String),
    #[error("{0}: permission denied")]
    PermissionDenied(String),
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    #[error("no space left on the server: {0}")]
    NoSpace(String),
    #[error("content does not match its checksum")]
    ChecksumMismatch,
    #[error("the version this file was opened at is gone")]
    Stale,
    #[error("request not run: {0}")]
    Expired(String),
    #[error("{0}")]
    Protocol(String),
    #[error("too many {0}; try again later")]
    Busy(&'static str),
    #[error("{0}; try again shortly")]
    InUse(&'static str),
    /// An earlier failure, reported again (an upload's, to each request that touches it).
    #[error("{}", .0.message)]
    Again(ErrorBody),
    #[error("too many open files: {0}")]
    TooManyOpen(String),
    #[error("reply too large: {0}")]
    TooLarge(String),
    #[error("password longer than {} bytes", sharefs_protocol::MAX_PASSWORD)]
    PasswordTooLong,
    #[error("user {0} already exists")]
    UserExists(String),
    #[error("storage error: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt metadata in {path}: {source}")]
    Corrupt {
        path: String,
        source: serde_json::Error,
    },
    /// The database or the object store of a cluster failed or could not be reached.
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServerError {
    /// The protocol error for this failure. Every variant is decided here.
    pub fn code(&self) -> ErrorCode {
        match self {
            ServerError::NotFound(_) | ServerError::NoSuchUser(_) => ErrorCode::NotFound,
            ServerError::Exists(_) => ErrorCode::Exists,
            ServerError::NotEmpty(_) => ErrorCode::NotEmpty,
            ServerError::NotADirectory(_) => ErrorCode::NotADirectory,
            ServerError::IsADirectory(_) => ErrorCode::IsADirectory,
            ServerError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            ServerError::NotPermitted(_) => ErrorCode::NotPermitted,
            ServerError::NameTooLong(_) => ErrorCode::NameTooLong,
            ServerError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            ServerError::InvalidName(_) => ErrorCode::InvalidName,
            ServerError::QuotaExceeded(_) => ErrorCode::QuotaExceeded,
            ServerError::NoSpace(_) => ErrorCode::NoSpace,
            ServerError::ChecksumMismatch => ErrorCode::ChecksumMismatch,
            ServerError::Stale => ErrorCode::Stale,
            ServerError::Expired(_) => ErrorCode::Expired,
            ServerError::Protocol(_) => ErrorCode::ProtocolError,
            ServerError::Busy(_) | ServerError::InUse(_) => ErrorCode::Busy,
            ServerError::Again(body) => body.code,
            ServerError::TooManyOpen(_) => ErrorCode::TooManyOpen,
            ServerError::TooLarge(_) => ErrorCode::TooLarge,
            ServerError::UserExists(_) => ErrorCode::InvalidName,
            ServerError::PasswordTooLong => ErrorCode::TooLarge,
            ServerError::Io(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) => ErrorCode::NoSpace,
                Some(libc::EDQUOT) => ErrorCode::QuotaExceeded,
                _ => ErrorCode::Internal,
            },
            ServerError::Corrupt { .. } | ServerError::Backend(_) | ServerError::Internal(_) => {
                ErrorCode::Internal
            }
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.to_string())
    }
}

pub type Result<T, E = ServerError> = std::result::Result<T, E>;
