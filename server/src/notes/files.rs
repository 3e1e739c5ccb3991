//! Download notifications in files under the data directory, the embedded default:
//! ```text
//! notifications/<user>/pending/<id>.json   one file per unacknowledged notification
//! notifications/<user>/history.jsonl       every notification as recorded, appended
//! ```
//! A download is recorded (fsynced) before it is pushed, and stays pending until a session
//! of the owner acknowledges it. Repeated downloads of the same file by the same user
//! within the coalescing window update the pending record's count instead of creating a
//! new notification.
//!
//! A download never fails for want of disk space: a notification that cannot be written
//! (a full disk) is pushed all the same and kept in memory, a bounded number per owner,
//! until a later write succeeds; the history file is fsynced with each record.
//!
//! Pending notifications are bounded per owner: past the bound the oldest are folded into
//! one digest (see [`super`]). The digest is written (with a new id) before the records it
//! replaces are removed: a crash in between shows a few twice, never loses them. An index
//! of each owner's pending ids is kept in memory, read from disk at first use.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sharefs_protocol::Notification;

use super::{fold_into, NoteStore};
use crate::error::{Result, ServerError};
use crate::fsutil;

/// (owner, downloader, file): what makes two downloads "the same" for coalescing.
type DownloadKey = (String, String, String);

/// An owner's pending records on disk.
#[derive(Debug, Default)]
struct PendingIndex {
    /// Ids of pending notifications, digest excluded.
    ids: BTreeSet<u64>,
    /// The pending digest of folded notifications, if any.
    digest: Option<Notification>,
}

/// How often notifications waiting for disk space are tried again, at most.
const UNSAVED_RETRY: Duration = Duration::from_secs(1);

/// Notifications kept in memory per owner while the disk is full; past this the oldest
/// is dropped (and logged).
const UNSAVED_MAX_PER_OWNER: usize = 1024;

/// The notifications of one data directory.
#[derive(Debug)]
pub struct FileNotes {
    dir: PathBuf,
    tmp: PathBuf,
    window: Duration,
    next_id: AtomicU64,
    /// (owner, downloader, file) -> latest notification and when it last grew.
    recent: Mutex<HashMap<DownloadKey, (Notification, Instant)>>,
    /// Held by every write of notification files (records, history, those written out
    /// late), so appends and coalesced updates never interleave; holds when the unsaved
    /// ones were last tried, so a full disk costs one failing write a second, not one per
    /// download.
    writes: Mutex<Option<Instant>>,
    /// Notifications that could not be written yet (disk full), per owner, by id: shown
    /// as pending and written out by the next record or listing that can.
    unsaved: Mutex<HashMap<String, BTreeMap<u64, Notification>>>,
    /// Pending notifications kept per owner before the oldest are folded into a digest.
    max_pending: usize,
    /// Per owner, what is pending on disk; loaded at the owner's first new record.
    index: Mutex<HashMap<String, PendingIndex>>,
}

impl FileNotes {
    pub fn open(data_dir: &Path, window: Duration, max_pending: usize) -> Result<FileNotes> {
        let dir = data_dir.join("notifications");
        fsutil::create_dir_durable(&dir)?;
        // Its temp files go beside the store's.
        fsutil::create_dir_durable(&data_dir.join("tmp"))?;
        Ok(FileNotes {
            dir,
            tmp: data_dir.join("tmp"),
            window,
            next_id: AtomicU64::new(fsutil::now_ns().max(1) as u64),
            recent: Mutex::new(HashMap::new()),
            writes: Mutex::new(None),
            unsaved: Mutex::new(HashMap::new()),
            max_pending: max_pending.max(1),
            index: Mutex::new(HashMap::new()),
        })
    }

    fn pending_dir(&self, user: &str) -> PathBuf {
        self.dir.join(user).join("pending")
    }

    /// Writes `n` as pending (if `new`, or if its pending record still exists) and appends
    /// it to the history.
    fn save(&self, n: &Notification, new: bool) -> Result<()> {
        let pending_dir = self.pending_dir(&n.owner);
        fsutil::create_dir_durable(&pending_dir)?;
        let path = pending_dir.join(pending_name(n.id));
        if new || path.exists() {
            write_json(&self.tmp, &path, n)?;
        }
        if new {
            // Bounded before the history line: the pending record is what must not pile up.
            if let Err(e) = self.bound_pending(n) {
                tracing::warn!(owner = %n.owner, error = %e, "cannot fold old pending notifications");
            }
        }
        self.append_history(&n.owner, n)
    }

    fn index(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, PendingIndex>>> {
        self.index
            .lock()
            .map_err(|_| ServerError::Internal("notification index poisoned".into()))
    }

    /// Notes `n` (just written) as pending and, past the bound, folds the owner's oldest
    /// pending notifications into the digest. Called under the write lock.
    fn bound_pending(&self, n: &Notification) -> Result<()> {
        let owner = n.owner.as_str();
        let mut index = self.index()?;
        if !index.contains_key(owner) {
            let loaded = self.load_index(owner)?;
            index.insert(owner.to_string(), loaded);
        }
        let Some(mine) = index.get_mut(owner) else {
            return Ok(());
        };
        mine.ids.insert(n.id);
        let max = self.max_pending;
        if mine.ids.len() <= max {
            return Ok(());
        }
        // Fold down to 7/8 of the bound, so the digest is rewritten once per many records.
        let keep = max - max / 8;
        let fold: Vec<u64> = mine
            .ids
            .iter()
            .take(mine.ids.len() - keep)
            .copied()
            .collect();
        let dir = self.pending_dir(owner);
        let old_digest = mine.digest.as_ref().map(|d| d.id);
        let mut digest = mine
            .digest
            .clone()
            .unwrap_or_else(|| super::empty_digest(owner));
        for id in &fold {
            match read_notification(&dir.join(pending_name(*id))) {
                Ok(Some(folded)) => fold_into(&mut digest, &folded),
                // Acknowledged meanwhile: nothing to fold.
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(owner, id, error = %e, "unreadable notification folded unseen")
                }
            }
        }
        digest.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        digest.file = super::digest_text(digest.folded);
        if digest.folded > 0 {
            write_json(&self.tmp, &dir.join(pending_name(digest.id)), &digest)?;
        }
        for id in old_digest.iter().chain(&fold) {
            match fs::remove_file(dir.join(pending_name(*id))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            mine.ids.remove(id);
        }
        fsutil::sync_dir(&dir)?;
        tracing::info!(
            owner,
            folded = fold.len(),
            total = digest.folded,
            "too many pending notifications; the oldest are folded into a digest"
        );
        mine.digest = (digest.folded > 0).then_some(digest);
        Ok(())
    }

    /// What is pending on disk for `owner`.
    fn load_index(&self, owner: &str) -> Result<PendingIndex> {
        let mut index = PendingIndex::default();
        let entries = match fs::read_dir(self.pending_dir(owner)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(index),
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                match read_notification(&path) {
                    Ok(Some(n)) if n.folded > 0 => index.digest = Some(n),
                    Ok(Some(n)) => {
                        index.ids.insert(n.id);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "unreadable notification")
                    }
                }
            }
        }
        Ok(index)
    }

    fn writes(&self) -> Result<std::sync::MutexGuard<'_, Option<Instant>>> {
        self.writes
            .lock()
            .map_err(|_| ServerError::Internal("notification lock poisoned".into()))
    }

    fn unsaved(
        &self,
    ) -> Option<std::sync::MutexGuard<'_, HashMap<String, BTreeMap<u64, Notification>>>> {
        self.unsaved.lock().ok()
    }

    fn keep_unsaved(&self, n: Notification) {
        let Some(mut unsaved) = self.unsaved() else {
            return;
        };
        let mine = unsaved.entry(n.owner.clone()).or_default();
        mine.insert(n.id, n);
        if mine.len() > UNSAVED_MAX_PER_OWNER {
            if let Some((_, dropped)) = mine.pop_first() {
                tracing::error!(owner = %dropped.owner, id = dropped.id,
                    "too many notifications waiting for disk space; the oldest is dropped");
            }
        }
    }

    /// Updates `n` where it waits unsaved; whether it was there.
    fn update_unsaved(&self, n: &Notification) -> bool {
        let Some(mut unsaved) = self.unsaved() else {
            return false;
        };
        match unsaved.get_mut(&n.owner).and_then(|m| m.get_mut(&n.id)) {
            Some(kept) => {
                *kept = n.clone();
                true
            }
            None => false,
        }
    }

    /// Writes out what waits unsaved, until the first write that still fails; tried at
    /// most once per [`UNSAVED_RETRY`] unless `now` (a write just succeeded).
    fn save_unsaved(&self, tried: &mut Option<Instant>, now: bool) {
        let Some(mut unsaved) = self.unsaved() else {
            return;
        };
        let recently = tried.is_some_and(|t| t.elapsed() < UNSAVED_RETRY);
        if unsaved.is_empty() || (recently && !now) {
            return;
        }
        *tried = Some(Instant::now());
        for mine in unsaved.values_mut() {
            while let Some(entry) = mine.first_entry() {
                if self.save(entry.get(), true).is_err() {
                    return;
                }
                let n = entry.remove();
                tracing::info!(owner = %n.owner, id = n.id, "download notification recorded after all");
            }
        }
        unsaved.retain(|_, m| !m.is_empty());
    }

    fn append_history(&self, owner: &str, n: &Notification) -> Result<()> {
        let path = self.dir.join(owner).join("history.jsonl");
        // Bounded history: past 1 MiB the file becomes history.1.jsonl (replacing the one
        // before), so it never grows without end. `recent` reads the current file.
        if fs::metadata(&path).is_ok_and(|m| m.len() > HISTORY_MAX) {
            fs::rename(&path, self.dir.join(owner).join("history.1.jsonl"))?;
        }
        let mut line = serde_json::to_vec(n)
            .map_err(|e| ServerError::Internal(format!("cannot encode notification: {e}")))?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(fsutil::FILE_MODE)
            .open(&path)?;
        // A line torn by a crash would swallow the next record: start on a new line.
        let len = f.metadata()?.len();
        if len > 0 {
            use std::os::unix::fs::FileExt;
            let mut last = [0u8];
            f.read_exact_at(&mut last, len - 1)?;
            if last[0] != b'\n' {
                line.insert(0, b'\n');
            }
        }
        if let Err(e) = f.write_all(&line).and_then(|()| f.sync_data()) {
            let _ = f.set_len(len);
            return Err(e.into());
        }
        Ok(())
    }
}

impl NoteStore for FileNotes {
    /// Where the record cannot be written (a full disk) it is kept in memory until it can
    /// and returned all the same: the download goes on and its owner is told.
    fn record(
        &self,
        owner: &str,
        downloader: &str,
        file: &str,
        size: u64,
    ) -> Result<Option<Notification>> {
        let mut writes = self.writes()?;
        self.save_unsaved(&mut writes, false);
        let now = Instant::now();
        let now_ms = fsutil::now_ms();
        let key = (owner.to_string(), downloader.to_string(), file.to_string());
        let mut recent = self
            .recent
            .lock()
            .map_err(|_| ServerError::Internal("notification lock poisoned".into()))?;
        recent.retain(|_, (_, t)| now.duration_since(*t) < self.window);
        if let Some((n, t)) = recent.get_mut(&key) {
            n.count += 1;
            n.last_ms = now_ms;
            n.size = size;
            *t = now;
            let n = n.clone();
            drop(recent);
            // Still pending: update the record so a re-send carries the count. Already
            // acknowledged: the user has seen it; only the history learns the count.
            let still_unsaved = self.update_unsaved(&n);
            if !still_unsaved {
                if let Err(e) = self.save(&n, false) {
                    tracing::warn!(owner, downloader, file, error = %e, "cannot record a repeated download");
                }
            }
            tracing::debug!(
                owner,
                downloader,
                file,
                count = n.count,
                "download coalesced"
            );
            return Ok(None);
        }
        let n = Notification {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            downloader: downloader.to_string(),
            owner: owner.to_string(),
            file: file.to_string(),
            size,
            first_ms: now_ms,
            last_ms: now_ms,
            count: 1,
            folded: 0,
        };
        recent.insert(key, (n.clone(), now));
        drop(recent);
        match self.save(&n, true) {
            Ok(()) => {
                tracing::info!(
                    owner,
                    downloader,
                    file,
                    id = n.id,
                    "download notification recorded"
                );
                // There is room again: what waited for it goes too.
                self.save_unsaved(&mut writes, true);
            }
            Err(e) => {
                tracing::warn!(owner, downloader, file, id = n.id, error = %e,
                    "cannot record a download notification; kept in memory until it can be written");
                self.keep_unsaved(n.clone());
            }
        }
        Ok(Some(n))
    }

    /// All pending notifications of `user`, oldest first (those waiting for disk space
    /// included).
    fn pending(&self, user: &str) -> Result<Vec<Notification>> {
        self.save_unsaved(&mut *self.writes()?, false);
        let mut out: Vec<Notification> = self
            .unsaved()
            .and_then(|u| u.get(user).map(|m| m.values().cloned().collect()))
            .unwrap_or_default();
        let dir = self.pending_dir(user);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                match fs::read(&path).map(|b| serde_json::from_slice::<Notification>(&b)) {
                    // One whose history line failed is also waiting unsaved.
                    Ok(Ok(n)) if !out.iter().any(|u| u.id == n.id) => out.push(n),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(path = %path.display(), error = %e, "corrupt notification")
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "unreadable notification")
                    }
                }
            }
        }
        // The digest of the oldest comes first.
        out.sort_by_key(|n| (n.folded == 0, n.id));
        Ok(out)
    }

    /// Up to `limit` latest notifications of `user` (pending or not), newest last.
    fn recent(&self, user: &str, limit: usize) -> Result<Vec<Notification>> {
        let path = self.dir.join(user).join("history.jsonl");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        // Later lines for the same id carry a larger count: keep the last of each.
        let mut by_id: HashMap<u64, Notification> = HashMap::new();
        for line in text.lines() {
            if let Ok(n) = serde_json::from_str::<Notification>(line) {
                by_id.insert(n.id, n);
            }
        }
        let mut all: Vec<Notification> = by_id.into_values().collect();
        all.sort_by_key(|n| n.id);
        let skip = all.len().saturating_sub(limit);
        Ok(all.split_off(skip))
    }

    /// Acknowledges `user`'s notifications; ids that are not pending are ignored.
    fn ack(&self, user: &str, ids: &[u64]) -> Result<usize> {
        if let Some(mut unsaved) = self.unsaved() {
            if let Some(mine) = unsaved.get_mut(user) {
                for id in ids {
                    mine.remove(id);
                }
            }
        }
        if let Ok(mut index) = self.index() {
            if let Some(mine) = index.get_mut(user) {
                for id in ids {
                    mine.ids.remove(id);
                    if mine.digest.as_ref().is_some_and(|d| d.id == *id) {
                        mine.digest = None;
                    }
                }
            }
        }
        let dir = self.pending_dir(user);
        let mut removed = 0;
        for id in ids {
            match fs::remove_file(dir.join(pending_name(*id))) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        if removed > 0 {
            fsutil::sync_dir(&dir)?;
        }
        Ok(removed)
    }
}

const HISTORY_MAX: u64 = 1 << 20;

fn pending_name(id: u64) -> String {
    format!("{id:016x}.json")
}

/// The notification recorded at `path`; `None` if there is none (any more).
fn read_notification(path: &Path) -> Result<Option<Notification>> {
    fsutil::read_json(path)
}

fn write_json(tmp: &Path, path: &Path, n: &Notification) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(n)
        .map_err(|e| ServerError::Internal(format!("cannot encode notification: {e}")))?;
    fsutil::write_atomic(tmp, path, &bytes)?;
    Ok(())
}
