//! One client connection: handshake and login (`handshake`), then a reader loop that
//! dispatches requests and a writer task (`outbox`) that owns the sending half.
//!
//! Requests run as their own tasks (bounded per connection), so a slow read never delays a
//! listing and replies go out in completion order (`requests`). Upload chunks are the
//! exception: they are written in arrival order by the reader loop itself (`uploads`).
//! Nothing a client sends can reach an `unwrap`.

mod handshake;
mod requests;
mod uploads;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sharefs_protocol::{
    ClientMessage, ErrorBody, ErrorCode, Event, Frame, FrameCodec, FrameError, Reply, Request,
    ServerMessage,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::Framed;
use tracing::Instrument;

use crate::cutoff::Cutoff;
use crate::error::ServerError;
use crate::hub::{EndSignal, EventSink};
use crate::metrics::op_name;
use crate::outbox::{Outbox, Writer};
use crate::shared::{Shared, Slot};
use crate::storage::UploadTarget;
pub use handshake::version_mismatch;
use handshake::{frame_error_body, handshake};
use requests::{reply_room, Context, Handled, Handles, SMALL_REPLY};
use uploads::{idle_upload_sweep, Begin, Step, Upload};

type Source<S> = Framed<tokio::io::ReadHalf<S>, FrameCodec>;

/// Serves one connection until the client leaves, breaks the protocol, or `stop` fires.
/// Hello and login must be done by `deadline` (the connection's one handshake deadline,
/// counted from its accept).
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    shared: Shared,
    stop: watch::Receiver<bool>,
    deadline: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!("conn", %peer, user = tracing::field::Empty);
    serve_inner(stream, peer, shared, stop, deadline, span.clone())
        .instrument(span)
        .await
}

async fn serve_inner<S>(
    stream: S,
    peer: SocketAddr,
    shared: Shared,
    stop: watch::Receiver<bool>,
    deadline: tokio::time::Instant,
    span: tracing::Span,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tracing::debug!("connected");
    let mut framed = Framed::new(stream, FrameCodec::new(shared.config.max_frame));
    let login = tokio::time::timeout_at(deadline, handshake(&mut framed, &shared, peer)).await;
    let (user, password_hash, client, started) = match login {
        Ok(Ok(login)) => login,
        Ok(Err(err)) => {
            let msg = ServerMessage::Error {
                id: None,
                error: err,
            };
            if let Ok(frame) = Frame::new(&msg, Bytes::new()) {
                let _ = tokio::time::timeout(Duration::from_secs(2), framed.send(frame)).await;
            }
            return;
        }
        Err(_) => {
            if crate::ratelog::CONNECTIONS.allow() {
                tracing::info!("handshake timed out; closing");
            }
            return;
        }
    };
    span.record("user", user.as_str());
    let max_frame = framed.codec().max_frame();
    let (sink, source) = sharefs_protocol::frame::split(framed);
    let outbox = Outbox::new(
        shared.config.reply_buffer,
        shared.reply_allowance(&user),
        max_frame,
    );
    let (ev_tx, ev_rx) = mpsc::channel::<Event>(1024);
    let lagged = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let fenced = Arc::new(AtomicBool::new(false));
    let end = Arc::new(EndSignal::default());
    let session_id = shared.hub.register(EventSink {
        user: user.clone(),
        password_hash,
        end: end.clone(),
        tx: ev_tx,
        lagged: lagged.clone(),
        queued: queued.clone(),
        client,
        fenced: fenced.clone(),
    });
    let writer = Writer {
        sink,
        outbox: outbox.clone(),
        events: ev_rx,
        lagged,
        queued,
        reply_timeout: shared.config.reply_timeout,
    };
    let mut writer = tokio::spawn(writer.run().in_current_span());

    let mut session = Session {
        id: session_id,
        user: user.clone(),
        shared: shared.clone(),
        out: outbox.clone(),
        uploads: HashMap::new(),
        handles: Arc::default(),
        open_handles: Arc::new(Semaphore::new(shared.config.max_handles_per_connection)),
        max_frame,
        next_id: Arc::new(AtomicU64::new(1)),
        in_flight: Arc::new(Semaphore::new(shared.config.max_in_flight)),
        tasks: JoinSet::new(),
        started,
        fenced,
        end,
    };
    if session.greet().await {
        session.read_loop(source, stop).await;
    }
    // Unfinished uploads are dropped here, which keeps them for a resume (see
    // `store::parts`).
    let detached = session.uploads.len();
    session.tasks.abort_all();
    shared.hub.unregister(session_id);
    drop(session);
    if detached > 0 {
        tracing::info!(detached, "unfinished uploads kept for a resume");
    }
    outbox.finish();
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    tracing::info!("disconnected");
}

/// State of one logged-in connection.
struct Session {
    /// This session's id in the hub: its own changes are not echoed back to it.
    id: u64,
    user: String,
    shared: Shared,
    out: Outbox,
    /// Uploads in progress, each with its slot of the per-user limit and when it last
    /// received data; owned by the reader loop, which writes their chunks in order.
    uploads: HashMap<u64, (Upload, Slot<String>, Instant)>,
    /// Open read handles, shared with request tasks. std `Mutex`: map operations only.
    handles: Handles,
    /// This connection's share of open handles.
    open_handles: Arc<Semaphore>,
    /// The frame size agreed with the client.
    max_frame: usize,
    next_id: Arc<AtomicU64>,
    /// When the server's `Hello` went out: request deadlines count from here.
    started: Instant,
    /// Set when a newer connection of the same client logged in (see [`Cutoff`]).
    fenced: Arc<AtomicBool>,
    /// Fires when the session must end at once (its account was removed, its password
    /// changed), however idle the client.
    end: Arc<EndSignal>,
    in_flight: Arc<Semaphore>,
    tasks: JoinSet<()>,
}

impl Session {
    /// Sends every pending notification. False if the connection is gone.
    async fn greet(&mut self) -> bool {
        let hub = self.shared.hub.clone();
        let user = self.user.clone();
        let pending = tokio::task::spawn_blocking(move || hub.pending(&user)).await;
        match pending {
            Ok(Ok(pending)) => {
                if !pending.is_empty() {
                    tracing::info!(count = pending.len(), "re-sending pending notifications");
                }
                for notification in pending {
                    let msg = ServerMessage::Event {
                        event: Event::Notification { notification },
                    };
                    let Some(room) = self.out.reserve(SMALL_REPLY).await else {
                        return false;
                    };
                    self.out.send(room, None, &msg, Bytes::new());
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot read pending notifications"),
            Err(e) => tracing::error!(error = %e, "pending notification task failed"),
        }
        true
    }

    async fn read_loop<S>(&mut self, mut source: Source<S>, mut stop: watch::Receiver<bool>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let idle = self.shared.config.idle_timeout;
        let mut idle_uploads = idle_upload_sweep(self.shared.config.upload_idle_timeout);
        loop {
            let next = tokio::select! {
                biased;
                // Nobody is sending this connection's replies any more.
                _ = self.out.closed() => return,
                next = tokio::time::timeout(idle, source.next()) => match next {
                    Ok(next) => next,
                    Err(_) if self.tasks.is_empty() && self.uploads.is_empty() => {
                        tracing::info!(?idle, "idle; closing connection");
                        return;
                    }
                    Err(_) => continue,
                },
                _ = stop.changed() => {
                    tracing::info!("server shutting down; closing session");
                    return;
                }
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => continue,
                reason = self.end.ended() => {
                    tracing::info!(reason, "closing session");
                    if reason != crate::hub::REPLACED {
                        self.fatal(ErrorBody::new(ErrorCode::AuthFailed, reason)).await;
                    }
                    return;
                }
                _ = idle_uploads.tick(), if !self.uploads.is_empty() => {
                    self.drop_idle_uploads();
                    continue;
                }
            };
            let frame = match next {
                None => return,
                Some(Ok(frame)) => frame,
                // A client that goes away without a TLS goodbye is not a protocol error.
                Some(Err(FrameError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(error = %e, "connection closed without TLS close_notify");
                    return;
                }
                Some(Err(e)) => {
                    if crate::ratelog::CONNECTIONS.allow() {
                        tracing::warn!(error = %e, "bad frame; closing connection");
                    }
                    self.fatal(frame_error_body(&e)).await;
                    return;
                }
            };
            let msg = match frame.message::<ClientMessage>() {
                Ok(msg) => msg,
                Err(e) => {
                    if crate::ratelog::CONNECTIONS.allow() {
                        tracing::warn!(error = %e, "malformed message; closing connection");
                    }
                    self.fatal(ErrorBody::new(ErrorCode::ProtocolError, e.to_string()))
                        .await;
                    return;
                }
            };
            match msg {
                ClientMessage::Request {
                    id,
                    deadline_ms,
                    lazy,
                    op,
                } => {
                    if self.fenced.load(Ordering::SeqCst) {
                        tracing::info!(
                            "replaced by a newer connection of the same client; closing"
                        );
                        return;
                    }
                    let deadline = deadline_ms.map(|ms| self.started + Duration::from_millis(ms));
                    let cutoff = Cutoff::new(deadline, self.fenced.clone()).lazy(lazy);
                    if let Err(e) = cutoff.check() {
                        tracing::info!(id, error = %e, "request arrived too late; not run");
                        self.reply(id, Err(e)).await;
                        continue;
                    }
                    self.dispatch(id, op, frame.payload, cutoff).await
                }
                ClientMessage::Chunk { upload, offset } => {
                    self.chunk(upload, offset, frame.payload).await
                }
                ClientMessage::Hello { .. } | ClientMessage::Login { .. } => {
                    self.fatal(ErrorBody::new(
                        ErrorCode::ProtocolError,
                        "already logged in",
                    ))
                    .await;
                    return;
                }
            }
        }
    }

    async fn fatal(&self, error: ErrorBody) {
        if let Some(room) = self.out.reserve(SMALL_REPLY).await {
            let msg = ServerMessage::Error { id: None, error };
            self.out.send(room, None, &msg, Bytes::new());
        }
    }

    async fn reply(&self, id: u64, result: Result<Reply, ServerError>) {
        let msg = match result {
            Ok(reply) => ServerMessage::Response { id, reply },
            Err(e) => ServerMessage::Error {
                id: Some(id),
                error: e.body(),
            },
        };
        if let Some(room) = self.out.reserve(SMALL_REPLY).await {
            self.out.send(room, Some(id), &msg, Bytes::new());
        }
    }

    async fn dispatch(&mut self, id: u64, op: Request, payload: Bytes, cutoff: Cutoff) {
        let kind = op_name(&op);
        let arrived = Instant::now();
        match op {
            Request::UploadBegin {
                owner,
                parent,
                name,
                replace,
                size,
                mode,
            } => {
                let target = match replace {
                    Some(id) => UploadTarget::Replace(id),
                    None => UploadTarget::At { parent, name },
                };
                let begin = Begin {
                    owner,
                    target,
                    size,
                    mode,
                };
                let result = self.begin_upload(begin).await;
                let failed = result.is_err();
                self.reply(id, result).await;
                self.shared.metrics.request(kind, arrived.elapsed(), failed);
            }
            Request::UploadCommit {
                upload,
                size,
                blake3,
                mtime_ns,
            } => {
                self.commit_upload(id, upload, size, blake3, mtime_ns, cutoff)
                    .await
            }
            // Answered at once, without an in-flight slot: a busy session is still alive.
            Request::Ping => {
                self.reply(id, Ok(Reply::Ok)).await;
                self.shared.metrics.request(kind, arrived.elapsed(), false);
            }
            Request::UploadAbort { upload } => {
                self.abort_upload(id, upload).await;
                self.shared.metrics.request(kind, arrived.elapsed(), false);
            }
            Request::UploadResume { upload } => {
                let result = self.resume_upload(upload).await;
                let failed = result.is_err();
                self.reply(id, result).await;
                self.shared.metrics.request(kind, arrived.elapsed(), failed);
            }
            Request::UploadSync { upload } => {
                self.upload_step(id, upload, Step::Sync, arrived).await
            }
            Request::UploadRead {
                upload,
                offset,
                len,
            } => {
                let len = len.min(sharefs_protocol::CHUNK_SIZE) as usize;
                self.upload_step(id, upload, Step::Read { offset, len }, arrived)
                    .await
            }
            op => {
                let ctx = self.context();
                // A put's content is held until its reply is queued: it takes room too, so
                // the puts a connection has in flight are bounded by its allowance.
                let room = reply_room(&op) + payload.len();
                let metrics = self.shared.metrics.clone();
                self.spawn(id, room, async move {
                    let handled = ctx.handle(op, payload, cutoff).await;
                    metrics.request(kind, arrived.elapsed(), handled.is_err());
                    handled
                })
                .await
            }
        }
    }

    fn context(&self) -> Context {
        Context {
            session: self.id,
            user: self.user.clone(),
            shared: self.shared.clone(),
            handles: self.handles.clone(),
            open_handles: self.open_handles.clone(),
            max_frame: self.max_frame,
            next_id: self.next_id.clone(),
        }
    }

    /// Runs a request as its own task, holding an in-flight permit until its reply is
    /// queued. Waits first for the in-flight permit and for room in the reply queue for
    /// the largest reply `op` can have, so a client that does not read its replies is not
    /// read either.
    async fn spawn<F>(&mut self, id: u64, reply_room: usize, fut: F)
    where
        F: std::future::Future<Output = Handled> + Send + 'static,
    {
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return;
        };
        let Some(room) = self.out.reserve(reply_room).await else {
            return;
        };
        let out = self.out.clone();
        self.tasks.spawn(
            async move {
                match fut.await {
                    Ok((reply, payload)) => {
                        let msg = ServerMessage::Response { id, reply };
                        out.send(room, Some(id), &msg, payload);
                    }
                    Err(e) => {
                        tracing::debug!(id, error = %e, "request failed");
                        let msg = ServerMessage::Error {
                            id: Some(id),
                            error: e.body(),
                        };
                        out.send(room, Some(id), &msg, Bytes::new());
                    }
                };
                drop(permit);
            }
            .in_current_span(),
        );
    }
}
