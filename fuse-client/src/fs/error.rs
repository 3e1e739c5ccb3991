//! Errors of the filesystem core. The FUSE adapter maps each to an errno in one match.

use sharefs_protocol::ErrorCode;

use crate::error::ClientError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    /// Writing outside one's own folder, and the like.
    #[error("permission denied")]
    PermissionDenied,
    /// Operations sharefs does not offer (hard links, special files).
    #[error("operation not permitted")]
    NotPermitted,
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// The request makes no sense as asked (a directory moved into its own subtree).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name too long")]
    NameTooLong,
    #[error("quota exceeded")]
    QuotaExceeded,
    #[error("no space left on the server")]
    NoSpace,
    #[error("is a directory")]
    IsDir,
    #[error("not a directory")]
    NotDir,
    #[error("bad file handle")]
    BadHandle,
    /// The server's limit on open files (per connection, per user or its own) was reached.
    #[error("too many open files on the server")]
    TooManyOpen,
    /// The version an open file was reading is gone from the server.
    #[error("file changed on the server while open")]
    Stale,
    /// Connection lost beyond the timeout, server-side failure, local staging I/O failure.
    #[error("I/O error: {0}")]
    Io(String),
}

impl From<ClientError> for FsError {
    fn from(e: ClientError) -> FsError {
        match &e {
            ClientError::Remote(body) => match body.code {
                ErrorCode::NotFound => FsError::NotFound,
                ErrorCode::PermissionDenied => FsError::PermissionDenied,
                ErrorCode::InvalidName => FsError::InvalidName(body.message.clone()),
                ErrorCode::QuotaExceeded => FsError::QuotaExceeded,
                ErrorCode::NoSpace => FsError::NoSpace,
                ErrorCode::Stale => FsError::Stale,
                ErrorCode::TooManyOpen => FsError::TooManyOpen,
                ErrorCode::Exists => FsError::Exists,
                ErrorCode::NotEmpty => FsError::NotEmpty,
                ErrorCode::NotADirectory => FsError::NotDir,
                ErrorCode::IsADirectory => FsError::IsDir,
                ErrorCode::InvalidArgument => FsError::InvalidArgument(body.message.clone()),
                ErrorCode::NotPermitted => FsError::NotPermitted,
                ErrorCode::NameTooLong => FsError::NameTooLong,
                ErrorCode::AuthFailed
                | ErrorCode::Throttled
                | ErrorCode::VersionMismatch
                | ErrorCode::ProtocolError
                | ErrorCode::TooLarge
                | ErrorCode::Busy
                | ErrorCode::ChecksumMismatch
                | ErrorCode::Expired
                | ErrorCode::Internal
                | ErrorCode::Other => FsError::Io(e.to_string()),
            },
            ClientError::Disconnected(_)
            | ClientError::Connect { .. }
            | ClientError::Tls(_)
            | ClientError::Io(_)
            | ClientError::Protocol(_)
            | ClientError::Timeout(_) => FsError::Io(e.to_string()),
        }
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> FsError {
        match e.raw_os_error() {
            Some(libc::ENOSPC) => FsError::NoSpace,
            Some(libc::EDQUOT) => FsError::QuotaExceeded,
            _ => FsError::Io(format!("local staging: {e}")),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;
