//! Download notifications on the desktop. Each one pushed by the server is logged, shown
//! as a freedesktop pop-up and acknowledged. A burst (twenty files copied at once) is
//! gathered for a moment and shown as one digest, not twenty pop-ups running off the
//! screen: notifications arriving within [`QUIET`] of each other are shown together, the
//! first at most [`GATHER_AT_MOST`] after it came. With no D-Bus or no notification
//! daemon they are logged and still acknowledged, so the server stops re-sending them;
//! the mount works on regardless.
//!
//! `desktop::text` words the pop-ups; `desktop::bus` keeps the one D-Bus connection.

pub mod bus;
pub mod text;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sharefs_protocol::Notification;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::connection::Connection;
use bus::DesktopBus;

pub use text::{human_size, popup, Popup};

/// Longest we wait for the notification daemon before giving up on showing one.
const SHOW_TIMEOUT: Duration = Duration::from_secs(5);
/// A notification arriving within this of the previous one joins its pop-up.
pub const QUIET: Duration = Duration::from_millis(300);
/// ...but the first of a pop-up is never held longer than this.
pub const GATHER_AT_MOST: Duration = Duration::from_secs(2);
/// Notifications in one pop-up at most (a digest names a few and counts the rest).
const MAX_BATCH: usize = 10_000;
/// Ids remembered as shown (the server may re-send one until it has our ack).
const REMEMBERED: usize = 100_000;

/// Shows notifications and acknowledges them, each id once.
pub struct Notifier {
    bus: DesktopBus,
    shown: HashSet<u64>,
    /// Where the owner's folders are mounted, for the "Open folder" action.
    mountpoint: Option<PathBuf>,
}

impl Notifier {
    pub fn new(mountpoint: Option<PathBuf>) -> Notifier {
        Notifier {
            bus: DesktopBus::default(),
            shown: HashSet::new(),
            mountpoint,
        }
    }

    /// Shows what arrives on `notes`, bursts gathered, until the channel closes.
    pub async fn run(mut self, conn: Connection, mut notes: mpsc::UnboundedReceiver<Notification>) {
        while let Some(first) = notes.recv().await {
            let until = Instant::now() + GATHER_AT_MOST;
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                let next = (Instant::now() + QUIET).min(until);
                match tokio::time::timeout_at(next, notes.recv()).await {
                    Ok(Some(n)) => batch.push(n),
                    Ok(None) | Err(_) => break,
                }
            }
            self.handle(&conn, batch).await;
        }
    }

    /// Shows the notifications of `batch` not shown before as one pop-up, and
    /// acknowledges them all.
    pub async fn handle(&mut self, conn: &Connection, batch: Vec<Notification>) {
        if self.shown.len() > REMEMBERED {
            self.shown.clear();
        }
        let fresh: Vec<Notification> = batch
            .iter()
            .filter(|n| self.shown.insert(n.id))
            .cloned()
            .collect();
        if !fresh.is_empty() {
            self.show(&fresh).await;
        }
        let ids: Vec<u64> = batch.iter().map(|n| n.id).collect();
        if let Err(e) = conn.ack(ids.clone()).await {
            tracing::warn!(count = ids.len(), error = %e, "cannot acknowledge notifications; they will come again");
            for id in ids {
                self.shown.remove(&id);
            }
        }
    }

    async fn show(&mut self, batch: &[Notification]) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        for n in batch {
            tracing::info!(
                id = n.id,
                "{}",
                popup(std::slice::from_ref(n), now_ms, false).summary
            );
        }
        let folder = self.folder(batch);
        let bus = &mut self.bus;
        let shown = tokio::time::timeout(SHOW_TIMEOUT, async {
            let markup = bus.markup().await?;
            bus.show(&popup(batch, now_ms, markup), folder).await
        })
        .await;
        match shown {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "no desktop notification shown (logged only)"),
            Err(_) => tracing::warn!("notification daemon did not answer; logged only"),
        }
    }

    /// The folder "Open folder" opens: where the file lies for one download, the
    /// owner's folder for a digest.
    fn folder(&self, batch: &[Notification]) -> Option<PathBuf> {
        let mountpoint = self.mountpoint.as_ref()?;
        let first = batch.first()?;
        // Names from the network: only plain names become part of a path.
        let plain = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('\0');
        if !plain(&first.owner) || first.owner.contains('/') {
            return None;
        }
        let owner = mountpoint.join(&first.owner);
        if let [n] = batch {
            if n.folded == 0 {
                if let Some((dir, _)) = n.file.rsplit_once('/') {
                    if dir.split('/').all(plain) {
                        return Some(owner.join(dir));
                    }
                }
            }
        }
        Some(owner)
    }
}
