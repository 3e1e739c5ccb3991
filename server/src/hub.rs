//! The notification hub: durable download notifications and the registry of live sessions
//! that receive pushed events.
//!
//! Layout under the data directory:
//! ```text
//! notifications/<user>/pending/<id>.json   one file per unacknowledged notification
//! notifications/<user>/history.jsonl       every notification as recorded, appended
//! ```
//! A download is recorded (fsynced) before it is pushed, and stays pending until a session
//! of the owner acknowledges it; login re-sends everything pending. Repeated downloads of
//! the same file by the same user within the coalescing window update the pending record's
//! count instead of creating a new notification.
//!
//! A download never fails for want of disk space: a notification that cannot be written
//! (a full disk) is pushed all the same and kept in memory, a bounded number per owner,
//! until a later write succeeds; the history file is fsynced with each record.
//!
//! Pending notifications are bounded per owner (`--max-pending-notifications`): past the
//! bound the oldest are folded into one digest notification that says how many it stands
//! for, so someone who opens thousands of a user's files leaves a bounded number of records
//! on disk and of pop-ups at the next login (the history keeps every one, rotating as
//! usual). The digest is written (with a new id) before the records it replaces are
//! removed: a crash in between shows a few twice, never loses them. An index of each
//! owner's pending ids is kept in memory, read from disk at first use.
//!
//! Pushing never blocks: each session has a bounded event queue and a session that falls
//! behind gets a `Resync` event instead of an unbounded backlog (its pending notifications
//! stay on disk).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use sharefs_protocol::{Event, Notification};
use tokio::sync::{mpsc, Notify};

use crate::error::{Result, ServerError};
use crate::fsutil;
use crate::store::Published;

/// Ends a live session from outside: its reader waits for this beside the socket, so it
/// ends also when the client is silent.
#[derive(Debug, Default)]
pub struct EndSignal {
    reason: OnceLock<&'static str>,
    notify: Notify,
}

impl EndSignal {
    /// Tells the session to end, saying why; false if it was told already.
    pub fn end(&self, reason: &'static str) -> bool {
        let first = self.reason.set(reason).is_ok();
        self.notify.notify_one();
        first
    }

    /// Completes, with the reason, once the session is told to end.
    pub async fn ended(&self) -> &'static str {
        loop {
            if let Some(reason) = self.reason.get() {
                return reason;
            }
            // `notify_one` leaves a permit if nobody waits yet: a signal sent between the
            // check above and this wait is not missed.
            self.notify.notified().await;
        }
    }
}

/// Why a session ends when a newer one of the same client logged in.
pub const REPLACED: &str = "replaced by a newer connection of the same client";

/// Where a live session receives events.
#[derive(Debug)]
pub struct EventSink {
    pub user: String,
    /// The password hash the session logged in with: it ends when the account's changes
    /// or the account goes.
    pub password_hash: String,
    /// Ends the session (see [`Hub::end_sessions`]).
    pub end: Arc<EndSignal>,
    pub tx: mpsc::Sender<Event>,
    /// Set when an event could not be queued; the session then sends `Resync`.
    pub lagged: Arc<AtomicBool>,
    /// Bytes of the events queued for the session (see [`event_size`]), at most
    /// [`EVENT_QUEUE_BYTES`]: an entry's event may carry a 4 KiB link target, so a count
    /// of events alone would not bound them.
    pub queued: Arc<AtomicUsize>,
    /// The client process this session belongs to, if it said (see `Login::client`).
    pub client: Option<u64>,
    /// Set when a newer session of the same user and client registers.
    pub fenced: Arc<AtomicBool>,
}

/// Most bytes of events queued for one session; past it the session gets `Resync`.
pub const EVENT_QUEUE_BYTES: usize = 512 * 1024;

/// What an event is counted as in a session's queue: its strings and room for the rest.
pub fn event_size(event: &Event) -> usize {
    const FIXED: usize = 256;
    match event {
        Event::Changed { owner, file, from } => {
            FIXED
                + owner.len()
                + file.owner.len()
                + file.name.len()
                + file.target.as_ref().map_or(0, String::len)
                + from.as_ref().map_or(0, |f| f.name.len())
        }
        Event::Removed { owner, name, .. } => FIXED + owner.len() + name.len(),
        Event::Notification { notification: n } => {
            FIXED + n.downloader.len() + n.owner.len() + n.file.len()
        }
        Event::UsersChanged | Event::Resync => FIXED,
    }
}

impl EventSink {
    /// Queues `event` without blocking, within the session's byte budget; marks the
    /// session lagged (it will get `Resync`) when it does not fit.
    fn offer(&self, event: &Event) {
        let size = event_size(event);
        let fits = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + size <= EVENT_QUEUE_BYTES).then_some(q + size)
            })
            .is_ok();
        if !fits {
            self.lagged.store(true, Ordering::Relaxed);
            return;
        }
        if self.tx.try_send(event.clone()).is_err() {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            self.lagged.store(true, Ordering::Relaxed);
        }
    }
}

/// (owner, downloader, file): what makes two downloads "the same" for coalescing.
type DownloadKey = (String, String, String);

#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

#[derive(Debug)]
struct HubInner {
    /// Download notifications recorded, and acknowledged by their owner (for metrics).
    recorded: Counter,
    delivered: Counter,
    dir: PathBuf,
    tmp: PathBuf,
    window: Duration,
    next_id: AtomicU64,
    /// std `Mutex`: held only for map updates and non-blocking `try_send`s.
    sessions: Mutex<HashMap<u64, EventSink>>,
    next_session: AtomicU64,
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

impl Hub {
    pub fn open(data_dir: &Path, window: Duration, max_pending: usize) -> Result<Hub> {
        let dir = data_dir.join("notifications");
        fsutil::create_dir_durable(&dir)?;
        // Its temp files go beside the store's (a cluster node has no store there).
        fsutil::create_dir_durable(&data_dir.join("tmp"))?;
        Ok(Hub {
            inner: Arc::new(HubInner {
                recorded: Counter::default(),
                delivered: Counter::default(),
                dir,
                tmp: data_dir.join("tmp"),
                window,
                next_id: AtomicU64::new(fsutil::now_ns().max(1) as u64),
                sessions: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                recent: Mutex::new(HashMap::new()),
                writes: Mutex::new(None),
                unsaved: Mutex::new(HashMap::new()),
                max_pending: max_pending.max(1),
                index: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The counters of notifications recorded and delivered (acknowledged), to be
    /// registered as metrics.
    pub fn counters(&self) -> (Counter, Counter) {
        (self.inner.recorded.clone(), self.inner.delivered.clone())
    }

    fn pending_dir(&self, user: &str) -> PathBuf {
        self.inner.dir.join(user).join("pending")
    }

    /// Registers a live session; returns its id for [`Hub::unregister`]. Older sessions
    /// of the same user and client are fenced: whatever they still receive must not run.
    pub fn register(&self, sink: EventSink) -> u64 {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.inner.sessions.lock() {
            if sink.client.is_some() {
                for old in s
                    .values()
                    .filter(|o| o.user == sink.user && o.client == sink.client)
                {
                    old.fenced.store(true, Ordering::SeqCst);
                    // Its client gave up on it: end it now, letting go of its uploads for
                    // the new one to resume.
                    old.end.end(REPLACED);
                }
            }
            s.insert(id, sink);
        }
        id
    }

    pub fn unregister(&self, id: u64) {
        if let Ok(mut s) = self.inner.sessions.lock() {
            s.remove(&id);
        }
    }

    /// Ends every live session for which `why` gives a reason (logged, and told to the
    /// client). Returns how many were told now (not already ending).
    pub fn end_sessions(&self, why: impl Fn(&EventSink) -> Option<&'static str>) -> usize {
        let Ok(sessions) = self.inner.sessions.lock() else {
            return 0;
        };
        let mut ended = 0;
        for (id, sink) in sessions.iter() {
            if let Some(reason) = why(sink) {
                if sink.end.end(reason) {
                    tracing::info!(user = %sink.user, session = id, reason, "ending session");
                    ended += 1;
                }
            }
        }
        ended
    }

    /// Pushes an event to the sessions `to` selects, never blocking.
    fn push(&self, event: &Event, to: impl Fn(u64, &EventSink) -> bool) {
        let Ok(sessions) = self.inner.sessions.lock() else {
            return;
        };
        for (_, sink) in sessions.iter().filter(|(id, s)| to(**id, s)) {
            sink.offer(event);
        }
    }

    /// Tells every session that a file changed.
    pub fn broadcast(&self, event: Event) {
        self.push(&event, |_, _| true);
    }

    /// Tells every session but `origin` (which made the change and knows it) that a file
    /// changed.
    pub fn broadcast_except(&self, event: Event, origin: u64) {
        self.push(&event, |id, _| id != origin);
    }

    /// Pushes the events of a change of `owner`'s tree to every session but `origin`
    /// (which made the change and knows it): the owner's sessions get each event as it
    /// is, other users' sessions only the form they may see (none for a change in a part
    /// of the tree closed to them).
    pub fn publish(&self, owner: &str, origin: u64, events: &[Published]) {
        let Ok(sessions) = self.inner.sessions.lock() else {
            return;
        };
        for (id, sink) in sessions.iter() {
            if *id == origin {
                continue;
            }
            for p in events {
                let event = if sink.user == owner {
                    &p.owner
                } else {
                    match &p.others {
                        Some(e) => e,
                        None => continue,
                    }
                };
                sink.offer(event);
            }
        }
    }

    /// Records a download of `owner`'s `file` by `downloader` durably, then pushes it to
    /// the owner's sessions. Blocking (fsync). Where the record cannot be written (a full
    /// disk) it is pushed anyway and kept in memory until it can; the download goes on.
    pub fn record_download(
        &self,
        owner: &str,
        downloader: &str,
        file: &str,
        size: u64,
    ) -> Result<()> {
        let mut writes = self.writes()?;
        self.save_unsaved(&mut writes, false);
        let now = Instant::now();
        let now_ms = fsutil::now_ms();
        let key = (owner.to_string(), downloader.to_string(), file.to_string());
        let mut recent = self
            .inner
            .recent
            .lock()
            .map_err(|_| ServerError::Internal("notification lock poisoned".into()))?;
        recent.retain(|_, (_, t)| now.duration_since(*t) < self.inner.window);
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
            return Ok(());
        }
        let n = Notification {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
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
        self.inner.recorded.inc();
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
        self.push(&Event::Notification { notification: n }, |_, s| {
            s.user == owner
        });
        Ok(())
    }

    /// Writes `n` as pending (if `new`, or if its pending record still exists) and appends
    /// it to the history.
    fn save(&self, n: &Notification, new: bool) -> Result<()> {
        let pending_dir = self.pending_dir(&n.owner);
        fsutil::create_dir_durable(&pending_dir)?;
        let path = pending_dir.join(pending_name(n.id));
        if new || path.exists() {
            write_json(&self.inner.tmp, &path, n)?;
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
        self.inner
            .index
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
        let max = self.inner.max_pending;
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
        let mut digest = mine.digest.clone().unwrap_or_else(|| Notification {
            id: 0,
            downloader: String::new(),
            owner: owner.to_string(),
            file: String::new(),
            size: 0,
            first_ms: i64::MAX,
            last_ms: i64::MIN,
            count: 0,
            folded: 0,
        });
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
        digest.id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        digest.file = format!("{} more files, not shown one by one", digest.folded);
        if digest.folded > 0 {
            write_json(&self.inner.tmp, &dir.join(pending_name(digest.id)), &digest)?;
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
        self.inner
            .writes
            .lock()
            .map_err(|_| ServerError::Internal("notification lock poisoned".into()))
    }

    fn unsaved(
        &self,
    ) -> Option<std::sync::MutexGuard<'_, HashMap<String, BTreeMap<u64, Notification>>>> {
        self.inner.unsaved.lock().ok()
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
        let path = self.inner.dir.join(owner).join("history.jsonl");
        // Bounded history: past 1 MiB the file becomes history.1.jsonl (replacing the one
        // before), so it never grows without end. `recent` reads the current file.
        if fs::metadata(&path).is_ok_and(|m| m.len() > HISTORY_MAX) {
            fs::rename(&path, self.inner.dir.join(owner).join("history.1.jsonl"))?;
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

    /// All pending notifications of `user`, oldest first (those waiting for disk space
    /// included).
    pub fn pending(&self, user: &str) -> Result<Vec<Notification>> {
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
    pub fn recent(&self, user: &str, limit: usize) -> Result<Vec<Notification>> {
        let path = self.inner.dir.join(user).join("history.jsonl");
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
    pub fn ack(&self, user: &str, ids: &[u64]) -> Result<()> {
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
        let mut removed = false;
        for id in ids {
            match fs::remove_file(dir.join(pending_name(*id))) {
                Ok(()) => {
                    removed = true;
                    self.inner.delivered.inc();
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        if removed {
            fsutil::sync_dir(&dir)?;
        }
        Ok(())
    }
}

const HISTORY_MAX: u64 = 1 << 20;

fn pending_name(id: u64) -> String {
    format!("{id:016x}.json")
}

/// Adds `n` (a notification or a digest) to `digest`.
fn fold_into(digest: &mut Notification, n: &Notification) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_coalesce_ack_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let hub = Hub::open(dir.path(), Duration::from_secs(60), 256).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        hub.register(EventSink {
            user: "alice".into(),
            password_hash: String::new(),
            end: Arc::default(),
            tx,
            lagged: Arc::default(),
            queued: Arc::default(),
            client: None,
            fenced: Arc::default(),
        });
        hub.record_download("alice", "bob", "f", 3).unwrap();
        hub.record_download("alice", "bob", "f", 3).unwrap();
        hub.record_download("alice", "carol", "f", 3).unwrap();
        assert!(matches!(rx.try_recv(), Ok(Event::Notification { .. })));
        assert!(matches!(rx.try_recv(), Ok(Event::Notification { .. })));
        assert!(rx.try_recv().is_err());

        let hub = Hub::open(dir.path(), Duration::from_secs(60), 256).unwrap();
        let pending = hub.pending("alice").unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(
            (pending[0].downloader.as_str(), pending[0].count),
            ("bob", 2)
        );
        hub.ack("alice", &[pending[0].id]).unwrap();
        assert_eq!(hub.pending("alice").unwrap().len(), 1);
        assert_eq!(hub.recent("alice", 10).unwrap().len(), 2);
        assert!(hub.pending("bob").unwrap().is_empty());
    }

    /// Events of fat entries stop queueing at the byte budget, not at a count, and the
    /// session is told to resync.
    #[test]
    fn a_session_queue_is_bounded_in_bytes() {
        use sharefs_protocol::{EntryKind, FileInfo};
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let hub = Hub::open(dir.path(), Duration::from_secs(60), 256).unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let lagged = Arc::new(AtomicBool::new(false));
        let queued = Arc::new(AtomicUsize::new(0));
        hub.register(EventSink {
            user: "bob".into(),
            password_hash: String::new(),
            end: Arc::default(),
            tx,
            lagged: lagged.clone(),
            queued: queued.clone(),
            client: None,
            fenced: Arc::default(),
        });
        let file = FileInfo {
            owner: "alice".into(),
            id: 2,
            parent: 1,
            name: "l".into(),
            kind: EntryKind::Symlink,
            mode: 0o777,
            size: 4095,
            mtime_ns: 0,
            atime_ns: 0,
            ctime_ns: 0,
            version: 1,
            target: Some("t".repeat(4095)),
        };
        let event = Event::Changed {
            owner: "alice".into(),
            file,
            from: None,
        };
        let published = Published {
            owner: event.clone(),
            others: Some(event.clone()),
        };
        for _ in 0..1000 {
            hub.publish("alice", 0, std::slice::from_ref(&published));
        }
        let mut got = 0;
        while rx.try_recv().is_ok() {
            got += 1;
        }
        assert!(
            got > 0 && got * event_size(&event) <= EVENT_QUEUE_BYTES,
            "{got}"
        );
        assert!(got < 1000);
        assert!(lagged.load(Ordering::Relaxed));
        assert!(queued.load(Ordering::Relaxed) <= EVENT_QUEUE_BYTES);
    }
}
