//! The disk reserve, kept across concurrent writers: every write that consumes disk space
//! first claims its bytes here, and a claim is granted only if the free space the
//! filesystem reports, less the bytes other writers have claimed but not yet written,
//! still leaves the reserve untouched. Checking `statvfs` alone would let parallel
//! uploads each see the same free space and all pass.
//!
//! Bytes are claimed before they are written and released as they land on disk (from
//! then on `statvfs` counts them), so a claim is never counted twice. Deletes need no
//! claim: they free space, and a full disk must still let a user make room.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Result, ServerError};
use crate::fsutil;

/// Room every metadata-only change claims (one journal record; a create, a rename).
pub const RECORD_ROOM: u64 = 4096;

/// Free space of one data directory's filesystem, less the reserve and open claims.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct DiskSpace {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// Bytes of free disk space writes must leave untouched.
    reserve: u64,
    /// Bytes claimed and not yet written. A std `Mutex`: held only around one `statvfs`.
    claimed: Mutex<u64>,
}

/// Bytes granted to one writer; what is not consumed is returned on drop.
#[derive(Debug)]
pub struct Claim {
    space: DiskSpace,
    bytes: u64,
}

impl DiskSpace {
    pub fn new(root: &Path, reserve: u64) -> DiskSpace {
        DiskSpace {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                reserve,
                claimed: Mutex::new(0),
            }),
        }
    }

    /// `(total, available)`: the filesystem's size and what writers may still use, that
    /// is free space less the reserve and the bytes claimed but not yet written.
    pub fn usable(&self) -> Result<(u64, u64)> {
        let claimed = *self.lock()?;
        let (total, avail) = fsutil::disk_space(&self.inner.root)?;
        Ok((
            total,
            avail
                .saturating_sub(self.inner.reserve)
                .saturating_sub(claimed),
        ))
    }

    /// Claims `bytes`, or fails with `NoSpace` if they would cut into the reserve.
    pub fn claim(&self, bytes: u64) -> Result<Claim> {
        let mut claim = Claim {
            space: self.clone(),
            bytes: 0,
        };
        claim.grow(bytes)?;
        Ok(claim)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, u64>> {
        self.inner
            .claimed
            .lock()
            .map_err(|_| ServerError::Internal("the disk space lock was poisoned".into()))
    }
}

impl Claim {
    /// Bytes still claimed.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Claims `more` bytes in addition, or fails (keeping what was claimed) with `NoSpace`.
    pub fn grow(&mut self, more: u64) -> Result<()> {
        let mut claimed = self.space.lock()?;
        let (_, avail) = fsutil::disk_space(&self.space.inner.root)?;
        let needed = self
            .space
            .inner
            .reserve
            .saturating_add(*claimed)
            .saturating_add(more);
        if avail < needed {
            return Err(ServerError::NoSpace(format!(
                "{} free, {} reserved, {} claimed by other writes, {more} needed",
                avail, self.space.inner.reserve, *claimed
            )));
        }
        *claimed += more;
        self.bytes += more;
        Ok(())
    }

    /// Marks `bytes` of the claim as written: the filesystem counts them from now on.
    pub fn consume(&mut self, bytes: u64) {
        let bytes = bytes.min(self.bytes);
        if let Ok(mut claimed) = self.space.lock() {
            *claimed = claimed.saturating_sub(bytes);
        }
        self.bytes -= bytes;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let bytes = self.bytes;
        self.consume(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_add_up_against_the_reserve_and_are_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, avail) = fsutil::disk_space(dir.path()).expect("statvfs");
        // Leave 10 MiB above the reserve (the free space of the test's filesystem may
        // move a little meanwhile; the margins are far larger than that).
        let space = DiskSpace::new(dir.path(), avail - (10 << 20));
        let a = space.claim(6 << 20).expect("first claim fits");
        let err = space
            .claim(6 << 20)
            .expect_err("second claim would cut into the reserve");
        assert!(matches!(err, ServerError::NoSpace(_)), "{err}");
        drop(a);
        let mut b = space.claim(6 << 20).expect("the first claim was returned");
        b.consume(6 << 20);
        assert_eq!(b.bytes(), 0);
        space
            .claim(6 << 20)
            .expect("consumed bytes are no longer claimed");
    }
}
