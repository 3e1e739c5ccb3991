//! `sharefs status`: what a running mount says of itself. The mount keeps `status.json`
//! in its cache directory current (rewritten at once when its connection goes down or
//! comes back, and at most a second after its uploads in progress change) and removes it
//! when it ends; the command reads it, and lists the uploads the mount kept in
//! `failed/` (see [`crate::failed`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::connection::Connection;
use crate::fs::FsCore;

/// How often the uploads in progress are looked at.
const PERIOD: Duration = Duration::from_secs(1);
/// Uploads listed by name at most (the count is always whole).
const MAX_LISTED: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub server: String,
    pub user: String,
    pub mountpoint: PathBuf,
    pub connected: bool,
    /// Since when (milliseconds since the epoch) the connection has been up, or down.
    pub since_ms: i64,
    /// Files written here whose content is not on the server yet.
    pub uploads: usize,
    /// The first [`MAX_LISTED`] of them.
    pub uploading: Vec<Upload>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    pub name: String,
    pub size: u64,
}

/// `status.json` of a mount's cache directory.
pub fn path(cache_dir: &Path) -> PathBuf {
    cache_dir.join("status.json")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Writes `status` whole (a reader never sees half of it).
fn write(cache_dir: &Path, status: &Status) -> io::Result<()> {
    let tmp = cache_dir.join("status.json.tmp");
    let text = serde_json::to_vec_pretty(status).map_err(io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path(cache_dir))
}

/// The status of the mount running with `cache_dir`, if one is: a file left by a mount
/// that died is ignored.
pub fn read(cache_dir: &Path) -> Option<Status> {
    let bytes = std::fs::read(path(cache_dir)).ok()?;
    let status: Status = serde_json::from_slice(&bytes).ok()?;
    let alive = i32::try_from(status.pid)
        .ok()
        // SAFETY: signal 0 only checks that the process exists.
        .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
    alive.then_some(status)
}

/// Removes the mount's status (it is ending).
pub fn remove(cache_dir: &Path) {
    let _ = std::fs::remove_file(path(cache_dir));
}

/// Keeps the mount's `status.json` current until the runtime ends.
pub async fn keep(
    cache_dir: PathBuf,
    mountpoint: PathBuf,
    conn: Connection,
    core: Arc<FsCore<Connection>>,
) {
    let mut changes = conn.changes();
    let mut last: Option<Status> = None;
    loop {
        let connected = conn.connected();
        let since_ms = match &last {
            Some(s) if s.connected == connected => s.since_ms,
            _ => now_ms(),
        };
        let mut uploading: Vec<Upload> = core
            .uploads_in_progress()
            .into_iter()
            .map(|(name, size)| Upload { name, size })
            .collect();
        uploading.sort_by(|a, b| a.name.cmp(&b.name));
        let uploads = uploading.len();
        uploading.truncate(MAX_LISTED);
        let status = Status {
            pid: std::process::id(),
            server: conn.server().to_string(),
            user: conn.user().to_string(),
            mountpoint: mountpoint.clone(),
            connected,
            since_ms,
            uploads,
            uploading,
        };
        if last.as_ref() != Some(&status) {
            if let Err(e) = write(&cache_dir, &status) {
                tracing::warn!(dir = %cache_dir.display(), error = %e, "cannot write the mount's status");
            }
            last = Some(status);
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(PERIOD) => {}
        }
    }
}
