//! Download notifications on the desktop. Each one pushed by the server is logged, shown
//! as a freedesktop pop-up and acknowledged. The first of a burst is shown at once; what
//! follows within [`QUIET`] of the previous one (for at most [`GATHER_AT_MOST`] after the
//! first) joins it: the pop-up is replaced in place by one digest (twenty files copied at
//! once are one pop-up, not twenty running off the screen). With no D-Bus or no
//! notification daemon they are logged and still acknowledged, so the server stops
//! re-sending them; the mount works on regardless.
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
/// ...for this long after the first at most; later ones start a new pop-up.
pub const GATHER_AT_MOST: Duration = Duration::from_secs(2);
/// Notifications in one pop-up at most (a digest names a few and counts the rest).
const MAX_BATCH: usize = 10_000;
/// Ids remembered as shown (the server may re-send one until it has our ack).
const REMEMBERED: usize = 100_000;

/// The pop-up of one burst: the notifications it shows and the id the daemon gave it.
#[derive(Debug, Default)]
pub struct Burst {
    notes: Vec<Notification>,
    popup: u32,
}

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
            let mut popup = Burst::default();
            self.handle(&conn, &mut popup, vec![first]).await;
            let mut more = Vec::new();
            while popup.notes.len() + more.len() < MAX_BATCH {
                let next = (Instant::now() + QUIET).min(until);
                match tokio::time::timeout_at(next, notes.recv()).await {
                    Ok(Some(n)) => more.push(n),
                    Ok(None) | Err(_) => break,
                }
            }
            if !more.is_empty() {
                self.handle(&conn, &mut popup, more).await;
            }
        }
    }

    /// Shows the notifications of `batch` not shown before in `burst`'s pop-up (a new
    /// one, or the burst's replaced by the digest of all its notifications), and
    /// acknowledges them all.
    pub async fn handle(&mut self, conn: &Connection, burst: &mut Burst, batch: Vec<Notification>) {
        if self.shown.len() > REMEMBERED {
            self.shown.clear();
        }
        let fresh: Vec<Notification> = batch
            .iter()
            .filter(|n| self.shown.insert(n.id))
            .cloned()
            .collect();
        if !fresh.is_empty() {
            let now_ms = now_ms();
            for n in &fresh {
                tracing::info!(
                    id = n.id,
                    "{}",
                    popup(std::slice::from_ref(n), now_ms, false).summary
                );
            }
            burst.notes.extend(fresh);
            burst.popup = self.show(&burst.notes, burst.popup).await;
        }
        let ids: Vec<u64> = batch.iter().map(|n| n.id).collect();
        if let Err(e) = conn.ack(ids.clone()).await {
            tracing::warn!(count = ids.len(), error = %e, "cannot acknowledge notifications; they will come again");
            for id in ids {
                self.shown.remove(&id);
            }
        }
    }

    /// Shows `batch` as one pop-up, replacing pop-up `replaces` (0: none); returns the
    /// pop-up's id (0 if none was shown).
    async fn show(&mut self, batch: &[Notification], replaces: u32) -> u32 {
        let now_ms = now_ms();
        let folder = self.folder(batch);
        let bus = &mut self.bus;
        let shown = tokio::time::timeout(SHOW_TIMEOUT, async {
            let markup = bus.markup().await?;
            bus.show(&popup(batch, now_ms, markup), folder, replaces)
                .await
        })
        .await;
        match shown {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "no desktop notification shown (logged only)");
                0
            }
            Err(_) => {
                tracing::warn!("notification daemon did not answer; logged only");
                0
            }
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

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
