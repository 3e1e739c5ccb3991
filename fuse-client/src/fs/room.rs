//! Whether a write that grows a file fits in the space the server leaves its user. It is
//! checked on the write that crosses the limit, which then fails with EDQUOT (the quota)
//! or ENOSPC (the server's disk), instead of every write succeeding into the staging
//! area and `close()` failing after the whole file was staged and uploaded.
//!
//! The check compares the file's growth over the version it replaces (what the server
//! will count against the quota) with the server's last answer to statfs, asked again
//! when that answer is more than [`FRESH`] old or when the write would not fit by it. An
//! upload this mount commits takes its size off the answer kept (more than it uses when it
//! replaces a version), so a run of small files costs no statfs each. The check is per
//! file: several files growing at once can still pass the limit together, and then the
//! server refuses the upload at `close()`, as before. A server that does not answer
//! statfs is not a reason to refuse a write: the upload will tell.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sharefs_protocol::Space;

use super::error::FsError;

/// How long a statfs answer is trusted for writes that fit by it.
pub const FRESH: Duration = Duration::from_secs(1);

/// The last statfs answer and when it came.
#[derive(Debug, Default)]
pub struct Room {
    last: Mutex<Option<(Instant, Space)>>,
}

impl Room {
    /// The last answer, if younger than [`FRESH`].
    pub fn fresh(&self) -> Option<Space> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < FRESH)
            .map(|(_, s)| s.clone())
    }

    /// Takes `bytes` just committed by an upload off the last answer: what is left can
    /// only be less than it says, so a write it refuses asks the server again.
    pub fn spend(&self, bytes: u64) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, space)) = last.as_mut() {
            space.available = space.available.saturating_sub(bytes);
            space.quota_available = space.quota_available.map(|q| q.saturating_sub(bytes));
        }
    }

    pub fn store(&self, space: Space) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), space));
    }
}

/// The error for growing a file by `need` bytes with `space` left, if it does not fit:
/// EDQUOT when the quota is what runs out, ENOSPC when the disk is.
pub fn refusal(space: &Space, need: u64) -> Option<FsError> {
    if need <= space.available {
        return None;
    }
    Some(match space.quota_available {
        Some(left) if need > left => FsError::QuotaExceeded,
        _ => FsError::NoSpace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(available: u64, quota_available: Option<u64>) -> Space {
        Space {
            total: 1 << 30,
            available,
            used: 0,
            files: 0,
            quota_available,
        }
    }

    #[test]
    fn the_limit_that_runs_out_names_the_error() {
        assert!(refusal(&space(100, None), 100).is_none());
        assert!(matches!(
            refusal(&space(100, None), 101),
            Some(FsError::NoSpace)
        ));
        assert!(matches!(
            refusal(&space(100, Some(100)), 101),
            Some(FsError::QuotaExceeded)
        ));
        // A quota with room left on a full disk: the disk.
        assert!(matches!(
            refusal(&space(100, Some(5000)), 101),
            Some(FsError::NoSpace)
        ));
    }
}
