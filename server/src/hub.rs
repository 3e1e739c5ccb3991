//! The notification hub: the registry of live sessions that receive pushed events, and
//! the front of the download notifications kept in a [`NoteStore`] (files under the data
//! directory, or a cluster's database).
//!
//! A download is recorded durably before it is pushed, and stays pending until a session
//! of the owner acknowledges it; login re-sends everything pending (see [`crate::notes`]).
//!
//! Pushing never blocks: each session has a bounded event queue and a session that falls
//! behind gets a `Resync` event instead of an unbounded backlog (its pending notifications
//! stay stored).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use sharefs_protocol::{Event, Notification};
use tokio::sync::{mpsc, Notify};

use crate::error::Result;
use crate::notes::files::FileNotes;
use crate::notes::NoteStore;
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

#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    /// Download notifications recorded, and acknowledged by their owner (for metrics).
    recorded: Counter,
    delivered: Counter,
    /// Where notifications are kept until acknowledged.
    notes: Arc<dyn NoteStore>,
    /// std `Mutex`: held only for map updates and non-blocking `try_send`s.
    sessions: Mutex<HashMap<u64, EventSink>>,
    next_session: AtomicU64,
}

impl std::fmt::Debug for HubInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("notes", &self.notes).finish()
    }
}

impl Hub {
    /// A hub keeping notifications in `notes`.
    pub fn new(notes: Arc<dyn NoteStore>) -> Hub {
        Hub {
            inner: Arc::new(HubInner {
                recorded: Counter::default(),
                delivered: Counter::default(),
                notes,
                sessions: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
            }),
        }
    }

    /// A hub keeping notifications in files under `data_dir` (the embedded default).
    pub fn open(data_dir: &Path, window: Duration, max_pending: usize) -> Result<Hub> {
        let notes = FileNotes::open(data_dir, window, max_pending)?;
        Ok(Hub::new(Arc::new(notes)))
    }

    /// The counters of notifications recorded and delivered (acknowledged), to be
    /// registered as metrics.
    pub fn counters(&self) -> (Counter, Counter) {
        (self.inner.recorded.clone(), self.inner.delivered.clone())
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
    /// the owner's sessions (on every node, for a cluster's). Blocking (fsync, or a
    /// database transaction).
    pub fn record_download(
        &self,
        owner: &str,
        downloader: &str,
        file: &str,
        size: u64,
    ) -> Result<()> {
        if let Some(n) = self.inner.notes.record(owner, downloader, file, size)? {
            self.inner.recorded.inc();
            self.deliver(n);
        }
        Ok(())
    }

    /// Pushes a recorded notification to its owner's sessions here.
    pub fn deliver(&self, notification: Notification) {
        let owner = notification.owner.clone();
        self.push(&Event::Notification { notification }, |_, s| {
            s.user == owner
        });
    }

    /// All pending notifications of `user`, oldest first (a digest of folded ones first).
    pub fn pending(&self, user: &str) -> Result<Vec<Notification>> {
        self.inner.notes.pending(user)
    }

    /// Up to `limit` latest notifications of `user` (pending or not), newest last.
    pub fn recent(&self, user: &str, limit: usize) -> Result<Vec<Notification>> {
        self.inner.notes.recent(user, limit)
    }

    /// Acknowledges `user`'s notifications; ids that are not pending are ignored.
    pub fn ack(&self, user: &str, ids: &[u64]) -> Result<()> {
        let acked = self.inner.notes.ack(user, ids)?;
        self.inner.delivered.inc_by(acked as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_coalesce_ack_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
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
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
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
