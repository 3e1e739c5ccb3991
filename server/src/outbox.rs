//! A connection's outgoing side: a reply queue bounded in bytes, and the writer that sends
//! it and the pushed events.
//!
//! A request is only read off the socket once the allowance for its largest possible reply
//! is taken from the queue ([`Outbox::reserve`]); a client that stops reading its replies
//! therefore stops being read (TCP back-pressure on its requests) instead of growing the
//! server. Replies are encoded by the task that made them: one that cannot be encoded, or
//! does not fit in a frame, goes out as an error reply for its request, never as a dead
//! connection.
//!
//! The room is taken from the connection's allowance and from its user's (shared by all of
//! that user's connections), so the bytes queued for clients that do not read are bounded
//! per user: a user's stalled connections hold up only that user. A peer that takes no byte
//! for the reply timeout is disconnected, which returns its room. When the writer ends for
//! any reason the reader is told ([`Outbox::closed`]), so a connection never lives on with
//! nobody sending its replies.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::SinkExt;
use sharefs_protocol::{
    ErrorBody, ErrorCode, Event, Frame, FrameError, FrameSink, ServerMessage, MAX_HEADER,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How often the writer looks at its progress while the peer is not taking bytes.
const WATCH_TICK: Duration = Duration::from_millis(100);
/// Bytes of a frame beyond its header and payload: the two length prefixes.
const FRAME_OVERHEAD: usize = 8;

/// An encoded reply in the queue, with the room it takes.
struct Queued {
    frame: Frame,
    _room: Reservation,
}

/// Room in the reply queue, taken before a request runs: from the connection's allowance
/// and from its user's.
pub struct Reservation {
    connection: OwnedSemaphorePermit,
    user: OwnedSemaphorePermit,
}

impl Reservation {
    fn size(&self) -> usize {
        self.connection.num_permits()
    }

    /// Gives back what is beyond `size`.
    fn shrink_to(&mut self, size: usize) {
        let extra = self.size().saturating_sub(size);
        if extra > 0 {
            drop(self.connection.split(extra));
            drop(self.user.split(extra));
        }
    }
}

/// The queue of one connection's replies; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Mutex<VecDeque<Queued>>,
    wake: Notify,
    /// Bytes that replies may take in this connection's queue; closed when the writer ends.
    connection: Arc<Semaphore>,
    /// Bytes that replies may take in the queues of all of the user's connections.
    user: Arc<Semaphore>,
    /// The most one reservation may take: a whole frame.
    max_frame: usize,
    /// Set when the reader is done: the writer sends what is queued, then ends.
    finished: AtomicBool,
    /// Cancelled when the writer has ended, for whatever reason.
    closed: CancellationToken,
}

impl Outbox {
    /// A queue that holds at most `capacity` bytes of replies for a connection whose
    /// frames are at most `max_frame`, taking them from the user's allowance `user` too.
    /// Both allowances hold at least one whole frame, so any reply fits.
    pub fn new(capacity: usize, user: Arc<Semaphore>, max_frame: usize) -> Outbox {
        Outbox {
            inner: Arc::new(Inner {
                queue: Mutex::new(VecDeque::new()),
                wake: Notify::new(),
                connection: Arc::new(Semaphore::new(capacity.max(max_frame))),
                user,
                max_frame,
                finished: AtomicBool::new(false),
                closed: CancellationToken::new(),
            }),
        }
    }

    /// Takes room for `bytes` (at most a frame), waiting while the queue or the user's
    /// queues are full. `None` once the writer has ended.
    pub async fn reserve(&self, bytes: usize) -> Option<Reservation> {
        let n = u32::try_from(bytes.clamp(1, self.inner.max_frame)).ok()?;
        let connection = self
            .inner
            .connection
            .clone()
            .acquire_many_owned(n)
            .await
            .ok()?;
        let user = tokio::select! {
            user = self.inner.user.clone().acquire_many_owned(n) => user.ok()?,
            _ = self.closed() => return None,
        };
        Some(Reservation { connection, user })
    }

    /// Encodes `msg` with `payload` and queues it in the room taken for it. A reply that
    /// cannot be sent (larger than a frame, or than its room) is replaced by an error
    /// reply to request `id`.
    pub fn send(
        &self,
        mut room: Reservation,
        id: Option<u64>,
        msg: &ServerMessage,
        payload: Bytes,
    ) {
        let frame = match self.encode(msg, payload, room.size()) {
            Ok(frame) => frame,
            Err(error) => {
                if crate::ratelog::CONNECTIONS.allow() {
                    tracing::warn!(?id, message = %error.message, "reply cannot be sent; answering with an error");
                }
                let msg = ServerMessage::Error { id, error };
                match Frame::new(&msg, Bytes::new()) {
                    Ok(frame) => frame,
                    Err(_) => return,
                }
            }
        };
        room.shrink_to(frame_size(&frame));
        match self.inner.queue.lock() {
            Ok(mut q) => q.push_back(Queued { frame, _room: room }),
            Err(_) => return,
        }
        self.inner.wake.notify_one();
    }

    /// The frame for a reply, or why it cannot be sent in `room` bytes.
    fn encode(&self, msg: &ServerMessage, payload: Bytes, room: usize) -> Result<Frame, ErrorBody> {
        let frame = Frame::new(msg, payload)
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("cannot encode: {e}")))?;
        let size = frame_size(&frame);
        if size > room || frame.header.len() > MAX_HEADER as usize {
            return Err(ErrorBody::new(
                ErrorCode::TooLarge,
                format!("the reply would take {size} bytes, more than it may ({room})"),
            ));
        }
        Ok(frame)
    }

    /// Tells the writer to send what is queued and end.
    pub fn finish(&self) {
        self.inner.finished.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    /// Completes once the writer has ended.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.closed.clone().cancelled_owned()
    }

    fn pop(&self) -> Option<Queued> {
        self.inner.queue.lock().ok()?.pop_front()
    }

    fn is_empty(&self) -> bool {
        self.inner.queue.lock().map_or(true, |q| q.is_empty())
    }

    /// The writer has ended: no more room, the queue's given back, the reader told.
    fn end(&self) {
        self.inner.connection.close();
        self.inner.closed.cancel();
        if let Ok(mut q) = self.inner.queue.lock() {
            q.clear();
        }
    }
}

fn frame_size(frame: &Frame) -> usize {
    frame.header.len() + frame.payload.len() + FRAME_OVERHEAD
}

/// Why the writer ended early.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the client took no reply bytes for {0:?}")]
    Stalled(Duration),
    #[error("send failed: {0}")]
    Send(#[from] FrameError),
}

/// The sending half of a connection: its replies and the events pushed to it.
pub struct Writer<S> {
    pub sink: FrameSink<tokio::io::WriteHalf<S>>,
    pub outbox: Outbox,
    pub events: mpsc::Receiver<Event>,
    /// Set by the hub when events for this session were dropped.
    pub lagged: Arc<AtomicBool>,
    /// Bytes of the events queued, shared with the hub, which stops queueing past its
    /// budget; given back as each event is taken.
    pub queued: Arc<std::sync::atomic::AtomicUsize>,
    /// A peer that takes no byte for this long is given up.
    pub reply_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Writer<S> {
    /// Sends replies and events until the reader finishes (then what is queued) or the
    /// peer fails or stalls; then ends the outbox, which tells the reader.
    pub async fn run(mut self) {
        match self.send_all().await {
            Ok(()) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), self.sink.close()).await;
            }
            Err(WriteError::Stalled(t)) => {
                if crate::ratelog::CONNECTIONS.allow() {
                    tracing::warn!(timeout = ?t, "client stopped taking its replies; closing the connection");
                }
            }
            Err(e) => tracing::debug!(error = %e, "connection's writer ended"),
        }
        self.outbox.end();
    }

    async fn send_all(&mut self) -> Result<(), WriteError> {
        let progress = self.sink.progress();
        let mut events_open = true;
        loop {
            if self.lagged.swap(false, Ordering::Relaxed) {
                self.event(Event::Resync, &progress).await?;
            }
            if let Some(item) = self.outbox.pop() {
                // The room is given back once the frame is in the sink, which holds at
                // most one frame beyond what it gathers.
                self.feed(item.frame, &progress).await?;
                continue;
            }
            if let Ok(event) = self.events.try_recv() {
                self.event(event, &progress).await?;
                continue;
            }
            // Nothing more queued: what was gathered goes out now.
            watched(self.sink.flush(), &progress, self.reply_timeout).await?;
            if self.outbox.inner.finished.load(Ordering::SeqCst) && self.outbox.is_empty() {
                return Ok(());
            }
            tokio::select! {
                _ = self.outbox.inner.wake.notified() => {}
                e = self.events.recv(), if events_open => match e {
                    Some(event) => self.event(event, &progress).await?,
                    None => events_open = false,
                },
            }
        }
    }

    async fn event(&mut self, event: Event, progress: &AtomicU64) -> Result<(), WriteError> {
        if !matches!(event, Event::Resync) {
            self.queued
                .fetch_sub(crate::hub::event_size(&event), Ordering::AcqRel);
        }
        let frame = Frame::new(&ServerMessage::Event { event }, Bytes::new())?;
        self.feed(frame, progress).await
    }

    async fn feed(&mut self, frame: Frame, progress: &AtomicU64) -> Result<(), WriteError> {
        watched(self.sink.feed(frame), progress, self.reply_timeout).await
    }
}

/// Runs a send on the sink, failing it once the peer has taken no byte for `timeout`.
async fn watched<F>(send: F, progress: &AtomicU64, timeout: Duration) -> Result<(), WriteError>
where
    F: Future<Output = Result<(), FrameError>>,
{
    tokio::pin!(send);
    let mut last = progress.load(Ordering::Relaxed);
    let mut since = Instant::now();
    loop {
        tokio::select! {
            r = &mut send => return r.map_err(WriteError::from),
            _ = tokio::time::sleep(WATCH_TICK) => {
                let now = progress.load(Ordering::Relaxed);
                if now != last {
                    last = now;
                    since = Instant::now();
                } else if since.elapsed() >= timeout {
                    return Err(WriteError::Stalled(timeout));
                }
            }
        }
    }
}
