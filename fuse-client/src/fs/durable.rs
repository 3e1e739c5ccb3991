//! Changes answered before they are durable, and the points that make them durable.
//!
//! A `mkdir`, a `symlink`, a `chmod` or `utimes`, and the empty file a `create` makes are
//! sent `lazy` (see `crate::remote::lazily`): the server answers once the change is made,
//! before its fdatasync, which the next durable change of the user's tree (an upload at
//! `close()`, an unlink, a rename), a `sync` request or the server itself (within the
//! protocol's `LAZY_SYNC_MS`) does. As on a local disk, such a change is durable once a
//! later `fsync()` returns; here `close()` gives the same promise, so a `close()` that has
//! nothing to upload, an `fsync()` and a directory's `fsync()` send a `sync` when a lazy
//! change may still be in the server's page cache.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::FsResult;
use super::remote::Remote;
use super::FsCore;

/// Counts of lazy changes answered, and of those known durable.
#[derive(Debug, Default)]
pub struct LazyChanges {
    answered: AtomicU64,
    durable: AtomicU64,
}

impl LazyChanges {
    /// Counts one lazy change answered.
    fn answered(&self) {
        self.answered.fetch_add(1, Ordering::SeqCst);
    }

    /// Where the count is now: a durable change sent after this covers them.
    pub fn mark(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }

    /// The lazy changes up to `mark` are durable.
    pub fn durable_up_to(&self, mark: u64) {
        self.durable.fetch_max(mark, Ordering::SeqCst);
    }

    fn all_durable(&self, mark: u64) -> bool {
        self.durable.load(Ordering::SeqCst) >= mark
    }

    /// Runs a change that may be answered before it is durable, and counts it.
    pub async fn lazily<T, E>(&self, change: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        let result = crate::remote::lazily(change).await;
        if result.is_ok() {
            self.answered();
        }
        result
    }
}

impl<R: Remote> FsCore<R> {
    /// Makes the lazy changes answered so far durable, with a `sync` if no durable change
    /// has since.
    pub(super) async fn make_durable(&self) -> FsResult<()> {
        let mark = self.lazy.mark();
        if self.lazy.all_durable(mark) {
            return Ok(());
        }
        self.remote.sync().await?;
        self.lazy.durable_up_to(mark);
        Ok(())
    }
}
