//! Download notifications as they are kept until their owner acknowledges them: the
//! interface, and what both kinds of keeping share.
//!
//! A download is recorded durably before it is pushed. Repeated downloads of the same file
//! by the same user within the coalescing window (5 s) update the record's
//! count instead of making a new notification (and are not pushed again). Pending
//! notifications are bounded per owner (`--max-pending-notifications`): past the bound
//! the oldest are folded into one digest notification that says how many it stands for,
//! so someone who opens thousands of a user's files leaves a bounded number of records
//! and of pop-ups at the next login; the history keeps every one, bounded in its own way.
//!
//! # Layout
//! - [`files`]: in files under the data directory (the embedded default).
//! - the cluster's, in PostgreSQL: [`crate::cluster::notes`].

pub mod files;

use sharefs_protocol::Notification;

use crate::error::Result;

/// Where download notifications are kept.
pub trait NoteStore: std::fmt::Debug + Send + Sync {
    /// Records a download of `owner`'s `file` by `downloader`; returns the notification to
    /// push, `None` when the download was coalesced into one pushed before. Blocking.
    fn record(
        &self,
        owner: &str,
        downloader: &str,
        file: &str,
        size: u64,
    ) -> Result<Option<Notification>>;
    /// All pending notifications of `user`, oldest first (a digest of folded ones first).
    fn pending(&self, user: &str) -> Result<Vec<Notification>>;
    /// Up to `limit` latest notifications of `user` (pending or not), newest last.
    fn recent(&self, user: &str, limit: usize) -> Result<Vec<Notification>>;
    /// Acknowledges `user`'s notifications `ids`; returns how many were pending.
    fn ack(&self, user: &str, ids: &[u64]) -> Result<usize>;
}

/// A digest of `owner`'s notifications that holds none yet, to fold them into.
pub fn empty_digest(owner: &str) -> Notification {
    Notification {
        id: 0,
        downloader: String::new(),
        owner: owner.to_string(),
        file: String::new(),
        size: 0,
        first_ms: i64::MAX,
        last_ms: i64::MIN,
        count: 0,
        folded: 0,
    }
}

/// The text of a digest's `file`.
pub fn digest_text(folded: u32) -> String {
    format!("{folded} more files, not shown one by one")
}

/// Adds `n` (a notification or a digest) to `digest`.
pub fn fold_into(digest: &mut Notification, n: &Notification) {
    if digest.folded == 0 {
        digest.downloader = n.downloader.clone();
    } else if digest.downloader != n.downloader {
        // Not a user name (those have no spaces): nobody is named wrongly.
        digest.downloader = "several users".into();
    }
    digest.folded = digest.folded.saturating_add(n.folded.max(1));
    digest.count = digest.count.saturating_add(n.count);
    digest.size = digest.size.saturating_add(n.size);
    digest.first_ms = digest.first_ms.min(n.first_ms);
    digest.last_ms = digest.last_ms.max(n.last_ms);
}
