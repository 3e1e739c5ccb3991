//! One client connection: handshake and login, then a reader loop that dispatches requests
//! and a writer task that owns the sending half.
//!
//! Requests run as their own tasks (bounded per connection), so a slow read never delays a
//! listing and replies go out in completion order. Upload chunks are the exception: they are
//! written in arrival order by the reader loop itself, which gives natural back-pressure (a
//! client cannot send faster than the disk takes it) and lets the commit that follows them
//! know that every chunk is on disk. Nothing a client sends can reach an `unwrap`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sharefs_protocol::{
    ClientMessage, ErrorBody, ErrorCode, Event, Frame, FrameCodec, FrameError, FrameSink, Reply,
    Request, ServerMessage, FRAME_ROOM, LIST_PAGE, MAGIC, MIN_FRAME, VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::Framed;
use tracing::Instrument;

use crate::cutoff::Cutoff;
use crate::error::ServerError;
use crate::hub::EventSink;
use crate::server::{Shared, Slot};
use crate::store::{OpenFile, StagedUpload};

/// A reply on its way to the writer task, with the read-budget permit its payload holds.
struct Outgoing {
    msg: ServerMessage,
    payload: Bytes,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    fn new(msg: ServerMessage) -> Outgoing {
        Outgoing {
            msg,
            payload: Bytes::new(),
            _permit: None,
        }
    }
}

type Sink<S> = FrameSink<tokio::io::WriteHalf<S>>;
type Source<S> = Framed<tokio::io::ReadHalf<S>, FrameCodec>;

/// Serves one connection until the client leaves, breaks the protocol, or `stop` fires.
pub async fn serve<S>(stream: S, peer: SocketAddr, shared: Shared, stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!("conn", %peer, user = tracing::field::Empty);
    serve_inner(stream, peer, shared, stop, span.clone())
        .instrument(span)
        .await
}

async fn serve_inner<S>(
    stream: S,
    peer: SocketAddr,
    shared: Shared,
    stop: watch::Receiver<bool>,
    span: tracing::Span,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tracing::debug!("connected");
    let mut framed = Framed::new(stream, FrameCodec::new(shared.config.max_frame));
    let login = tokio::time::timeout(
        shared.config.handshake_timeout,
        handshake(&mut framed, &shared, peer),
    )
    .await;
    let (user, client, started) = match login {
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
            tracing::info!("handshake timed out; closing");
            return;
        }
    };
    span.record("user", user.as_str());
    let max_frame = framed.codec().max_frame() as u32;

    let (sink, source) = sharefs_protocol::frame::split(framed);
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(64);
    let (ev_tx, ev_rx) = mpsc::channel::<Event>(1024);
    let lagged = Arc::new(AtomicBool::new(false));
    let fenced = Arc::new(AtomicBool::new(false));
    let session_id = shared.hub.register(EventSink {
        user: user.clone(),
        tx: ev_tx,
        lagged: lagged.clone(),
        client,
        fenced: fenced.clone(),
    });
    let writer = tokio::spawn(write_loop(sink, out_rx, ev_rx, lagged).in_current_span());

    let mut session = Session {
        id: session_id,
        user: user.clone(),
        shared: shared.clone(),
        out: out_tx,
        uploads: HashMap::new(),
        handles: Arc::default(),
        next_id: Arc::new(AtomicU64::new(1)),
        in_flight: Arc::new(Semaphore::new(shared.config.max_in_flight)),
        tasks: JoinSet::new(),
        started,
        fenced,
        max_frame,
    };
    if session.greet().await {
        session.read_loop(source, stop).await;
    }
    // Unfinished uploads are dropped here, which deletes their temp files.
    let aborted = session.uploads.len();
    session.tasks.abort_all();
    shared.hub.unregister(session_id);
    drop(session);
    if aborted > 0 {
        tracing::info!(aborted, "discarded unfinished uploads");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    tracing::info!("disconnected");
}

/// Hello and login. Returns the user name, the client's id and when the server's `Hello`
/// was sent (request deadlines count from it), or the error to send before closing.
async fn handshake<S>(
    framed: &mut Framed<S, FrameCodec>,
    shared: &Shared,
    peer: SocketAddr,
) -> Result<(String, Option<u64>, Instant), ErrorBody>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let protocol = |m: &str| ErrorBody::new(ErrorCode::ProtocolError, m);
    let max_frame = match next_message(framed).await? {
        ClientMessage::Hello {
            magic,
            version,
            max_frame,
        } => {
            if magic != MAGIC {
                return Err(protocol("not a sharefs client"));
            }
            if version != VERSION {
                tracing::info!(version, "client speaks another protocol version");
                return Err(ErrorBody::new(
                    ErrorCode::VersionMismatch,
                    format!("server speaks protocol version {VERSION}, client {version}"),
                ));
            }
            // Never panics, whatever the configuration: at least the smallest frame a
            // chunk fits in, at most what the server allows.
            max_frame.max(MIN_FRAME).min(shared.config.max_frame)
        }
        _ => return Err(protocol("expected hello")),
    };
    let started = Instant::now();
    send(
        framed,
        &ServerMessage::Hello {
            magic: MAGIC.into(),
            version: VERSION,
            max_frame,
        },
    )
    .await?;
    framed.codec_mut().set_max_frame(max_frame);

    let (user, password, client) = match next_message(framed).await? {
        ClientMessage::Login {
            user,
            password,
            client,
        } => (user, password, client),
        _ => return Err(protocol("expected login")),
    };
    let user = crate::login::login(shared, peer, user, password).await?;
    send(framed, &ServerMessage::LoginOk { user: user.clone() }).await?;
    Ok((user, client, started))
}

async fn next_message<S>(framed: &mut Framed<S, FrameCodec>) -> Result<ClientMessage, ErrorBody>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match framed.next().await {
        Some(Ok(frame)) => frame
            .message()
            .map_err(|e| ErrorBody::new(ErrorCode::ProtocolError, e.to_string())),
        Some(Err(e)) => Err(frame_error_body(&e)),
        None => Err(ErrorBody::new(
            ErrorCode::ProtocolError,
            "connection closed",
        )),
    }
}

async fn send<S>(framed: &mut Framed<S, FrameCodec>, msg: &ServerMessage) -> Result<(), ErrorBody>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = Frame::new(msg, Bytes::new()).map_err(|e| frame_error_body(&e))?;
    framed.send(frame).await.map_err(|e| frame_error_body(&e))
}

fn frame_error_body(e: &FrameError) -> ErrorBody {
    let code = match e {
        FrameError::TooLarge { .. } => ErrorCode::TooLarge,
        _ => ErrorCode::ProtocolError,
    };
    ErrorBody::new(code, e.to_string())
}

/// Sends replies and pushed events; flushes when nothing more is queued, so bursts of small
/// replies share a write.
async fn write_loop<S>(
    mut sink: Sink<S>,
    mut out: mpsc::Receiver<Outgoing>,
    mut events: mpsc::Receiver<Event>,
    lagged: Arc<AtomicBool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut events_open = true;
    loop {
        let item = tokio::select! {
            biased;
            o = out.recv() => match o {
                Some(o) => o,
                None => break,
            },
            e = events.recv(), if events_open => match e {
                Some(event) => Outgoing::new(ServerMessage::Event { event }),
                None => { events_open = false; continue; }
            },
        };
        let mut batch = vec![item];
        if lagged.swap(false, Ordering::Relaxed) {
            batch.push(Outgoing::new(ServerMessage::Event {
                event: Event::Resync,
            }));
        }
        while batch.len() < 32 {
            match out.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        for o in batch {
            let frame = match Frame::new(&o.msg, o.payload) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode reply");
                    continue;
                }
            };
            if let Err(e) = sink.feed(frame).await {
                tracing::debug!(error = %e, "send failed");
                return;
            }
        }
        if out.is_empty() && sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

/// An upload of this session: idle, or writing its last chunk on the blocking pool while
/// the reader goes on decrypting the next one.
enum Upload {
    Idle(Box<StagedUpload>),
    Writing(tokio::task::JoinHandle<StagedUpload>),
}

impl Upload {
    /// The upload once its last write is done; `None` if that write task died.
    async fn settle(self) -> Option<StagedUpload> {
        match self {
            Upload::Idle(up) => Some(*up),
            Upload::Writing(task) => match task.await {
                Ok(up) => Some(up),
                Err(e) => {
                    tracing::error!(error = %e, "upload write task failed");
                    None
                }
            },
        }
    }
}

/// State of one logged-in connection.
struct Session {
    /// This session's id in the hub: its own changes are not echoed back to it.
    id: u64,
    user: String,
    shared: Shared,
    out: mpsc::Sender<Outgoing>,
    /// Uploads in progress, each with its slot of the per-user limit; owned by the reader
    /// loop, which writes their chunks in order.
    uploads: HashMap<u64, (Upload, Slot<String>)>,
    /// Open read handles, shared with request tasks. std `Mutex`: map operations only.
    handles: Arc<Mutex<HashMap<u64, Arc<OpenFile>>>>,
    next_id: Arc<AtomicU64>,
    /// When the server's `Hello` went out: request deadlines count from here.
    started: Instant,
    /// Set when a newer connection of the same client logged in (see [`Cutoff`]).
    fenced: Arc<AtomicBool>,
    in_flight: Arc<Semaphore>,
    tasks: JoinSet<()>,
    /// The frame size negotiated at the handshake: replies are sized to fit in it.
    max_frame: u32,
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
                    if self.out.send(Outgoing::new(msg)).await.is_err() {
                        return false;
                    }
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
        loop {
            let next = tokio::select! {
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
                    tracing::warn!(error = %e, "bad frame; closing connection");
                    self.fatal(frame_error_body(&e)).await;
                    return;
                }
            };
            let msg = match frame.message::<ClientMessage>() {
                Ok(msg) => msg,
                Err(e) => {
                    tracing::warn!(error = %e, "malformed message; closing connection");
                    self.fatal(ErrorBody::new(ErrorCode::ProtocolError, e.to_string()))
                        .await;
                    return;
                }
            };
            match msg {
                ClientMessage::Request {
                    id,
                    deadline_ms,
                    op,
                } => {
                    if self.fenced.load(Ordering::SeqCst) {
                        tracing::info!(
                            "replaced by a newer connection of the same client; closing"
                        );
                        return;
                    }
                    let deadline = deadline_ms.map(|ms| self.started + Duration::from_millis(ms));
                    let cutoff = Cutoff::new(deadline, self.fenced.clone());
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
        let _ = self
            .out
            .send(Outgoing::new(ServerMessage::Error { id: None, error }))
            .await;
    }

    async fn chunk(&mut self, upload: u64, offset: u64, data: Bytes) {
        let Some((state, slot)) = self.uploads.remove(&upload) else {
            tracing::debug!(upload, "chunk for an unknown upload ignored");
            return;
        };
        // One write in flight per upload: chunks stay in order, and this one is written
        // while the next is read.
        let Some(mut up) = state.settle().await else {
            return;
        };
        let task = tokio::task::spawn_blocking(move || {
            up.write_chunk(offset, &data);
            up
        });
        self.uploads.insert(upload, (Upload::Writing(task), slot));
    }

    async fn reply(&self, id: u64, result: Result<Reply, ServerError>) {
        let msg = match result {
            Ok(reply) => ServerMessage::Response { id, reply },
            Err(e) => ServerMessage::Error {
                id: Some(id),
                error: e.body(),
            },
        };
        let _ = self.out.send(Outgoing::new(msg)).await;
    }

    async fn dispatch(&mut self, id: u64, op: Request, payload: Bytes, cutoff: Cutoff) {
        match op {
            Request::UploadBegin { owner, name, size } => {
                let result = self.begin_upload(owner, name, size).await;
                self.reply(id, result).await;
            }
            Request::UploadCommit {
                upload,
                size,
                blake3,
            } => match self.uploads.remove(&upload) {
                Some((state, slot)) => {
                    let ctx = self.context();
                    self.spawn(id, async move {
                        // The upload counts against the user's limit until committed.
                        let _slot = slot;
                        let up = state
                            .settle()
                            .await
                            .ok_or_else(|| ServerError::Internal("upload write failed".into()))?;
                        let name = up.name().to_string();
                        let info = ctx
                            .blocking(move |shared| {
                                shared.store.commit_upload(up, size, &blake3, &cutoff)
                            })
                            .await?;
                        tracing::info!(file = %name, size, "upload committed");
                        ctx.changed(&info.name, Some(info.clone()));
                        Ok((Reply::File { file: info }, Bytes::new(), None))
                    })
                    .await
                }
                None => {
                    let e = ServerError::Protocol(format!("no upload {upload}"));
                    self.reply(id, Err(e)).await
                }
            },
            // Answered at once, without an in-flight slot: a busy session is still alive.
            Request::Ping => self.reply(id, Ok(Reply::Ok)).await,
            Request::UploadAbort { upload } => {
                let existed = self.uploads.remove(&upload).is_some();
                if existed {
                    tracing::info!(upload, "upload aborted");
                }
                self.reply(id, Ok(Reply::Ok)).await;
            }
            op => {
                let ctx = self.context();
                self.spawn(id, async move { ctx.handle(op, payload, cutoff).await })
                    .await
            }
        }
    }

    async fn begin_upload(
        &mut self,
        owner: String,
        name: String,
        size: Option<u64>,
    ) -> Result<Reply, ServerError> {
        let ctx = self.context();
        ctx.own(&owner, &name)?;
        let slot = self
            .shared
            .upload_slot(&self.user)
            .ok_or(ServerError::Busy("uploads in progress for this user"))?;
        let up = ctx
            .blocking(move |shared| {
                let quota = shared.users.get(&owner)?.and_then(|u| u.quota);
                shared.store.begin_upload(&owner, &name, size, quota)
            })
            .await?;
        let upload = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.uploads
            .insert(upload, (Upload::Idle(Box::new(up)), slot));
        Ok(Reply::UploadStarted { upload })
    }

    fn context(&self) -> Context {
        Context {
            session: self.id,
            user: self.user.clone(),
            shared: self.shared.clone(),
            handles: self.handles.clone(),
            next_id: self.next_id.clone(),
            max_frame: self.max_frame,
        }
    }

    /// Runs a request as its own task, holding an in-flight permit until its reply is queued.
    async fn spawn<F>(&mut self, id: u64, fut: F)
    where
        F: std::future::Future<
                Output = Result<(Reply, Bytes, Option<OwnedSemaphorePermit>), ServerError>,
            > + Send
            + 'static,
    {
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return;
        };
        let out = self.out.clone();
        self.tasks.spawn(
            async move {
                let outgoing = match fut.await {
                    Ok((reply, payload, budget)) => Outgoing {
                        msg: ServerMessage::Response { id, reply },
                        payload,
                        _permit: budget,
                    },
                    Err(e) => {
                        tracing::debug!(id, error = %e, "request failed");
                        Outgoing::new(ServerMessage::Error {
                            id: Some(id),
                            error: e.body(),
                        })
                    }
                };
                let _ = out.send(outgoing).await;
                drop(permit);
            }
            .in_current_span(),
        );
    }
}

/// What a request task needs of its session.
struct Context {
    session: u64,
    user: String,
    shared: Shared,
    handles: Arc<Mutex<HashMap<u64, Arc<OpenFile>>>>,
    next_id: Arc<AtomicU64>,
    max_frame: u32,
}

type Handled = Result<(Reply, Bytes, Option<OwnedSemaphorePermit>), ServerError>;

impl Context {
    /// Runs blocking storage work off the async threads.
    async fn blocking<T, F>(&self, f: F) -> Result<T, ServerError>
    where
        F: FnOnce(&Shared) -> Result<T, ServerError> + Send + 'static,
        T: Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| ServerError::Internal(format!("storage task failed: {e}")))?
    }

    fn changed(&self, name: &str, file: Option<sharefs_protocol::FileInfo>) {
        let event = Event::FileChanged {
            owner: self.user.clone(),
            name: name.to_string(),
            file,
        };
        self.shared.hub.broadcast_except(event, self.session);
    }

    /// Writes are allowed in the caller's own folder only, whatever the client sends.
    fn own(&self, owner: &str, name: &str) -> Result<(), ServerError> {
        if owner == self.user {
            Ok(())
        } else {
            Err(ServerError::PermissionDenied(format!("{owner}/{name}")))
        }
    }

    fn handles(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<u64, Arc<OpenFile>>>, ServerError> {
        self.handles
            .lock()
            .map_err(|_| ServerError::Internal("handle table poisoned".into()))
    }

    /// Most file or notification entries one reply carries: [`LIST_PAGE`], or fewer when
    /// the negotiated frame is small (an entry with a 255-byte name stays under 2 KiB of
    /// JSON, escapes included).
    fn entries_per_reply(&self) -> u32 {
        let room = self
            .max_frame
            .min(sharefs_protocol::MAX_HEADER)
            .saturating_sub(FRAME_ROOM);
        (room / 2048).clamp(1, LIST_PAGE)
    }

    /// Most file data one reply carries: the negotiated frame less room for the header.
    fn chunk_size(&self) -> u32 {
        sharefs_protocol::chunk_size(self.max_frame)
    }

    async fn require_user(&self, owner: String) -> Result<String, ServerError> {
        self.blocking(move |shared| match shared.users.get(&owner)? {
            Some(_) => Ok(owner),
            None => Err(ServerError::NoSuchUser(owner)),
        })
        .await
    }

    async fn handle(self, op: Request, payload: Bytes, cutoff: Cutoff) -> Handled {
        let reply = match op {
            Request::ListUsers => {
                let users = self
                    .blocking(|shared| Ok(shared.users.list()?.into_keys().collect()))
                    .await?;
                Reply::Users { users }
            }
            Request::ListFiles {
                owner,
                after,
                limit,
            } => {
                let owner = self.require_user(owner).await?;
                let limit = limit
                    .unwrap_or(LIST_PAGE)
                    .clamp(1, self.entries_per_reply()) as usize;
                let (files, more) = self
                    .blocking(move |s| s.store.list_page(&owner, after.as_deref(), limit))
                    .await?;
                Reply::Files { files, more }
            }
            Request::Stat { owner, name } => {
                let owner = self.require_user(owner).await?;
                let file = self.blocking(move |s| s.store.stat(&owner, &name)).await?;
                Reply::File { file }
            }
            Request::Open { owner, name, head } => {
                return self.open(owner, name, head, cutoff).await
            }
            Request::Read {
                handle,
                offset,
                len,
            } => return self.read(handle, offset, len).await,
            Request::Close { handle } => {
                self.handles()?.remove(&handle);
                Reply::Ok
            }
            Request::Put {
                owner,
                name,
                blake3,
            } => {
                self.own(&owner, &name)?;
                let size = payload.len() as u64;
                let file = self
                    .blocking(move |s| {
                        let quota = s.users.get(&owner)?.and_then(|u| u.quota);
                        s.store
                            .put(&owner, &name, &payload, &blake3, quota, &cutoff)
                    })
                    .await?;
                tracing::info!(file = %file.name, size, "upload committed");
                self.changed(&file.name, Some(file.clone()));
                Reply::File { file }
            }
            Request::Delete { owner, name } => {
                self.own(&owner, &name)?;
                let n = name.clone();
                self.blocking(move |s| s.store.delete(&owner, &n, &cutoff))
                    .await?;
                tracing::info!(file = %name, "deleted");
                self.changed(&name, None);
                Reply::Ok
            }
            Request::Rename { owner, from, to } => {
                self.own(&owner, &from)?;
                let f = from.clone();
                let file = self
                    .blocking(move |s| s.store.rename(&owner, &f, &to, &cutoff))
                    .await?;
                tracing::info!(from = %from, to = %file.name, "renamed");
                self.changed(&from, None);
                self.changed(&file.name, Some(file.clone()));
                Reply::File { file }
            }
            Request::Ack { ids } => {
                let user = self.user.clone();
                self.blocking(move |s| s.hub.ack(&user, &ids)).await?;
                Reply::Ok
            }
            Request::Notifications { recent } => {
                let user = self.user.clone();
                let recent = recent.min(1000).min(self.entries_per_reply());
                let (pending, recent) = self
                    .blocking(move |s| {
                        Ok((s.hub.pending(&user)?, s.hub.recent(&user, recent as usize)?))
                    })
                    .await?;
                Reply::Notifications { pending, recent }
            }
            Request::Ping => Reply::Ok,
            Request::StatFs => {
                let user = self.user.clone();
                let space = self
                    .blocking(move |s| {
                        let quota = s.users.get(&user)?.and_then(|u| u.quota);
                        s.store.space(&user, quota)
                    })
                    .await?;
                Reply::Space(space)
            }
            Request::UploadBegin { .. }
            | Request::UploadCommit { .. }
            | Request::UploadAbort { .. } => {
                return Err(ServerError::Internal("upload request misrouted".into()))
            }
        };
        Ok((reply, Bytes::new(), None))
    }

    async fn open(self, owner: String, name: String, head: u32, cutoff: Cutoff) -> Handled {
        // One's own small files open without a trip to the blocking pool (no disk access:
        // the folder is loaded and the pack is open); everything else takes the slow path.
        let quick = if owner == self.user {
            self.shared.store.try_open_packed(&owner, &name)
        } else {
            None
        };
        let open = match quick {
            Some(open) => open,
            None => self.open_slow(owner, name, cutoff).await?,
        };
        self.opened(open, head).await
    }

    async fn open_slow(
        &self,
        owner: String,
        name: String,
        cutoff: Cutoff,
    ) -> Result<OpenFile, ServerError> {
        let owner = self.require_user(owner).await?;
        let downloader = self.user.clone();
        self.blocking(move |s| {
            let open = s.store.open_read(&owner, &name)?;
            if owner != downloader {
                // A download the client gave up on must not notify anyone.
                cutoff.check()?;
                // Recorded durably before the reader gets a byte.
                s.hub
                    .record_download(&owner, &downloader, &name, open.info.size)?;
            }
            Ok(open)
        })
        .await
    }

    async fn opened(self, open: OpenFile, head: u32) -> Handled {
        if open.info.owner != self.user {
            tracing::info!(owner = %open.info.owner, file = %open.info.name, size = open.info.size, "download");
        }
        let file = open.info.clone();
        let head = (head.min(self.chunk_size()) as u64).min(file.size) as usize;
        let open = Arc::new(open);
        let (data, permit) = if head == 0 {
            (Bytes::new(), None)
        } else {
            let (data, permit) = self.read_budgeted(open.clone(), 0, head).await?;
            if data.len() != head {
                // The content ended early: a broken blob or pack, not a short file.
                return Err(ServerError::Internal(format!(
                    "{}/{}: read {} of {head} bytes",
                    file.owner,
                    file.name,
                    data.len()
                )));
            }
            (data, Some(permit))
        };
        // Registered only once the head is read, so a failed open leaves no handle; a file
        // that came whole with the reply needs none (handle 0): nothing to read later, no
        // close to wait for.
        let handle = if head as u64 == file.size {
            0
        } else {
            let handle = self.next_id.fetch_add(1, Ordering::Relaxed);
            self.handles()?.insert(handle, open);
            handle
        };
        Ok((Reply::Opened { handle, file }, data, permit))
    }

    async fn read(self, handle: u64, offset: u64, len: u32) -> Handled {
        let open = self
            .handles()?
            .get(&handle)
            .cloned()
            .ok_or_else(|| ServerError::Protocol(format!("no open handle {handle}")))?;
        let len = len.min(self.chunk_size()) as usize;
        let len = len.min(open.info.size.saturating_sub(offset) as usize);
        let (data, permit) = self.read_budgeted(open, offset, len).await?;
        Ok((Reply::Data, data, Some(permit)))
    }

    /// Reads under the server-wide read-buffer budget; the permit lives until the reply
    /// carrying the data has been written.
    async fn read_budgeted(
        &self,
        open: Arc<OpenFile>,
        offset: u64,
        len: usize,
    ) -> Result<(Bytes, OwnedSemaphorePermit), ServerError> {
        let kib = len.div_ceil(1024).max(1) as u32;
        let permit = self
            .shared
            .read_budget
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(|_| ServerError::Internal("read budget closed".into()))?;
        if let Some(data) = open.read_cached(offset, len) {
            return Ok((data, permit));
        }
        let misses = self.shared.misses.clone();
        let read = move || {
            let started = Instant::now();
            let data = open.read(offset, len);
            misses.record(started.elapsed());
            data
        };
        let data = if self.shared.misses.in_place(len) {
            read()?
        } else {
            tokio::task::spawn_blocking(read)
                .await
                .map_err(|e| ServerError::Internal(format!("read task failed: {e}")))??
        };
        Ok((data, permit))
    }
}
