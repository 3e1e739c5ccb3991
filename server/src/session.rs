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
    ClientMessage, ErrorBody, ErrorCode, Event, Frame, FrameCodec, FrameError, Reply, Request,
    ServerMessage, CHUNK_SIZE, FRAME_ROOM, LIST_PAGE, LIST_PAGE_BYTES, MAGIC, MIN_FRAME, VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::Framed;
use tracing::Instrument;

use crate::cutoff::Cutoff;
use crate::error::ServerError;
use crate::hub::{EndSignal, EventSink};
use crate::outbox::{Outbox, Writer};
use crate::server::{Shared, Slot};
use crate::store::{OpenFile, StagedUpload};

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
    let fenced = Arc::new(AtomicBool::new(false));
    let end = Arc::new(EndSignal::default());
    let session_id = shared.hub.register(EventSink {
        user: user.clone(),
        password_hash,
        end: end.clone(),
        tx: ev_tx,
        lagged: lagged.clone(),
        client,
        fenced: fenced.clone(),
    });
    let writer = Writer {
        sink,
        outbox: outbox.clone(),
        events: ev_rx,
        lagged,
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
    // Unfinished uploads are dropped here, which deletes their temp files.
    let aborted = session.uploads.len();
    session.tasks.abort_all();
    shared.hub.unregister(session_id);
    drop(session);
    if aborted > 0 {
        tracing::info!(aborted, "discarded unfinished uploads");
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

/// Hello and login. Returns the user name, the password hash the login matched, the
/// client's id and when the server's `Hello` was sent (request deadlines count from it), or the error to send before closing.
async fn handshake<S>(
    framed: &mut Framed<S, FrameCodec>,
    shared: &Shared,
    peer: SocketAddr,
) -> Result<(String, String, Option<u64>, Instant), ErrorBody>
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
                if crate::ratelog::CONNECTIONS.allow() {
                    tracing::info!(version, "client speaks another protocol version");
                }
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
    let (user, hash) = crate::login::login(shared, peer, user, password).await?;
    send(framed, &ServerMessage::LoginOk { user: user.clone() }).await?;
    Ok((user, hash, client, started))
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

/// How often uploads are checked for having gone without data for `bound`.
fn idle_upload_sweep(bound: Duration) -> tokio::time::Interval {
    let period = (bound / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut sweep = tokio::time::interval(period);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep
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
                    self.fatal(ErrorBody::new(ErrorCode::AuthFailed, reason)).await;
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

    /// Drops the uploads that received nothing for the configured bound: each holds a temp
    /// file, a disk claim and a quota reservation, which a client must not keep by
    /// stalling.
    fn drop_idle_uploads(&mut self) {
        let bound = self.shared.config.upload_idle_timeout;
        self.uploads.retain(|upload, (_, _, last)| {
            let keep = last.elapsed() < bound;
            if !keep {
                tracing::info!(
                    upload,
                    ?bound,
                    "upload received no data for too long; dropped"
                );
            }
            keep
        });
    }

    async fn fatal(&self, error: ErrorBody) {
        if let Some(room) = self.out.reserve(SMALL_REPLY).await {
            let msg = ServerMessage::Error { id: None, error };
            self.out.send(room, None, &msg, Bytes::new());
        }
    }

    async fn chunk(&mut self, upload: u64, offset: u64, data: Bytes) {
        let Some((state, slot, _)) = self.uploads.remove(&upload) else {
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
        self.uploads
            .insert(upload, (Upload::Writing(task), slot, Instant::now()));
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
                Some((state, slot, _)) => {
                    let ctx = self.context();
                    self.spawn(id, SMALL_REPLY, async move {
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
                        Ok((Reply::File { file: info }, Bytes::new()))
                    })
                    .await
                }
                None => {
                    let e = ServerError::Protocol(format!(
                        "no upload {upload} in progress (never begun, aborted, failed, or \
                         dropped after {} s without data)",
                        self.shared.config.upload_idle_timeout.as_secs()
                    ));
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
                // A put's content is held until its reply is queued: it takes room too, so
                // the puts a connection has in flight are bounded by its allowance.
                let room = reply_room(&op) + payload.len();
                self.spawn(
                    id,
                    room,
                    async move { ctx.handle(op, payload, cutoff).await },
                )
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
            .insert(upload, (Upload::Idle(Box::new(up)), slot, Instant::now()));
        Ok(Reply::UploadStarted { upload })
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

/// What a request task needs of its session.
struct Context {
    session: u64,
    user: String,
    shared: Shared,
    handles: Handles,
    open_handles: Arc<Semaphore>,
    max_frame: usize,
    next_id: Arc<AtomicU64>,
}

/// A reply and its payload (file data); the payload's memory is counted in the room the
/// reply takes in the queue.
type Handled = Result<(Reply, Bytes), ServerError>;

/// Room in the reply queue for replies without file data or long lists.
const SMALL_REPLY: usize = 8 * 1024;

/// The most room `op`'s reply can take in the reply queue.
fn reply_room(op: &Request) -> usize {
    match op {
        Request::Read { len, .. } => (*len).min(CHUNK_SIZE) as usize + SMALL_REPLY,
        Request::Open { head, .. } => (*head).min(CHUNK_SIZE) as usize + SMALL_REPLY,
        Request::ListFiles { .. } => LIST_PAGE_BYTES + SMALL_REPLY,
        Request::Notifications { .. } => NOTIFICATIONS_BYTES + SMALL_REPLY,
        // Waits for more room if the list of users is long.
        Request::ListUsers => 64 * 1024,
        Request::Stat { .. }
        | Request::Close { .. }
        | Request::Put { .. }
        | Request::Delete { .. }
        | Request::Rename { .. }
        | Request::Ack { .. }
        | Request::Ping
        | Request::StatFs
        | Request::UploadBegin { .. }
        | Request::UploadCommit { .. }
        | Request::UploadAbort { .. } => SMALL_REPLY,
    }
}

/// Most bytes of JSON the notifications of one `notifications` reply may take; the
/// oldest of the recent ones are left out past it.
const NOTIFICATIONS_BYTES: usize = 512 * 1024;

/// A connection's open handles: the file, and its place under the handle limits.
type HandleTable = HashMap<u64, (Arc<OpenFile>, HandleTicket)>;
type Handles = Arc<Mutex<HandleTable>>;

/// An open handle's place under the per-connection, per-user and server-wide limits;
/// given back when the handle is closed or its connection ends.
pub struct HandleTicket {
    _connection: OwnedSemaphorePermit,
    _user: Slot<String>,
    _fd: OwnedSemaphorePermit,
}

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

    fn handles(&self) -> Result<std::sync::MutexGuard<'_, HandleTable>, ServerError> {
        self.handles
            .lock()
            .map_err(|_| ServerError::Internal("handle table poisoned".into()))
    }

    /// Most file or notification entries one reply carries: [`LIST_PAGE`], or fewer when
    /// the negotiated frame is small (an entry with a 255-byte name stays under 2 KiB of
    /// JSON, escapes included).
    /// Most bytes of JSON a list in one reply may take: `bytes`, or less if the agreed
    /// frame is smaller.
    fn list_bytes(&self, bytes: usize) -> usize {
        let room = self.max_frame.saturating_sub(FRAME_ROOM as usize);
        bytes.min(room)
    }

    /// Most file data one reply carries: the negotiated frame less room for the header.
    fn chunk_size(&self) -> u32 {
        sharefs_protocol::chunk_size(u32::try_from(self.max_frame).unwrap_or(u32::MAX))
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
                let limit = limit.unwrap_or(LIST_PAGE).clamp(1, LIST_PAGE) as usize;
                let max_bytes = self.list_bytes(LIST_PAGE_BYTES);
                let (files, more) = self
                    .blocking(move |s| {
                        s.store
                            .list_page(&owner, after.as_deref(), limit, max_bytes)
                    })
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
                // Dropped outside the lock: closing the file is a system call.
                let closed = self.handles()?.remove(&handle);
                drop(closed);
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
                let (mut pending, mut recent) = self
                    .blocking(move |s| {
                        Ok((s.hub.pending(&user)?, s.hub.recent(&user, recent as usize)?))
                    })
                    .await?;
                // Whatever fits: the pending first (the newest of them if they cannot all),
                // then the newest of the recent.
                pending.reverse();
                let budget = self.list_bytes(NOTIFICATIONS_BYTES);
                pending.truncate(fitting(&pending, budget));
                pending.reverse();
                let left = budget.saturating_sub(json_len(&pending));
                recent.reverse();
                recent.truncate(fitting(&recent, left));
                recent.reverse();
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
        Ok((reply, Bytes::new()))
    }

    async fn open(self, owner: String, name: String, head: u32, cutoff: Cutoff) -> Handled {
        // Its place under the handle limits is taken before a file is opened, so a client
        // cannot hold more descriptors than its share even for a moment.
        let ticket = self.ticket()?;
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
        self.opened(open, head, ticket).await
    }

    /// A place for one more open handle, or the limit that is reached.
    fn ticket(&self) -> Result<HandleTicket, ServerError> {
        let config = &self.shared.config;
        let connection = self.open_handles.clone().try_acquire_owned().map_err(|_| {
            ServerError::TooManyOpen(format!(
                "{} open on this connection, the most it may have",
                config.max_handles_per_connection
            ))
        })?;
        let user = self.shared.handle_slot(&self.user).ok_or_else(|| {
            ServerError::TooManyOpen(format!(
                "{} open by {}, the most one user may have",
                config.max_handles_per_user, self.user
            ))
        })?;
        // The server's descriptors are shared fairly: a user may take one more only while
        // more than they hold is free, so however many users open all they may, one who
        // holds few still finds some.
        let short = || {
            tracing::debug!("the server's open-file budget is short; refusing an open");
            ServerError::TooManyOpen("the server is short of open files; close some".into())
        };
        if self.shared.fds.available_permits() < self.shared.handles_held(&self.user) {
            return Err(short());
        }
        let fd = self
            .shared
            .fds
            .clone()
            .try_acquire_owned()
            .map_err(|_| short())?;
        Ok(HandleTicket {
            _connection: connection,
            _user: user,
            _fd: fd,
        })
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

    async fn opened(self, open: OpenFile, head: u32, ticket: HandleTicket) -> Handled {
        // Each download is logged once by the hub when it records its notification
        // (repeats within the coalescing window are counted there, not logged again).
        if open.info.owner != self.user {
            tracing::debug!(owner = %open.info.owner, file = %open.info.name, size = open.info.size, "download");
        }
        let file = open.info.clone();
        let head = (head.min(self.chunk_size()) as u64).min(file.size) as usize;
        let open = Arc::new(open);
        let data = if head == 0 {
            Bytes::new()
        } else {
            let data = self.read_budgeted(open.clone(), 0, head).await?;
            if data.len() != head {
                // The content ended early: a broken blob or pack, not a short file.
                return Err(ServerError::Internal(format!(
                    "{}/{}: read {} of {head} bytes",
                    file.owner,
                    file.name,
                    data.len()
                )));
            }
            data
        };
        // Registered only once the head is read, so a failed open leaves no handle; a file
        // that came whole with the reply needs none (handle 0): nothing to read later, no
        // close to wait for.
        let handle = if head as u64 == file.size {
            0
        } else {
            let handle = self.next_id.fetch_add(1, Ordering::Relaxed);
            self.handles()?.insert(handle, (open, ticket));
            handle
        };
        Ok((Reply::Opened { handle, file }, data))
    }

    async fn read(self, handle: u64, offset: u64, len: u32) -> Handled {
        let open = self
            .handles()?
            .get(&handle)
            .map(|(open, _)| open.clone())
            .ok_or_else(|| ServerError::Protocol(format!("no open handle {handle}")))?;
        let len = len.min(self.chunk_size()) as usize;
        let len = len.min(open.info.size.saturating_sub(offset) as usize);
        let data = self.read_budgeted(open, offset, len).await?;
        Ok((Reply::Data, data))
    }

    /// Reads under the server-wide read-buffer budget, which bounds the data being read
    /// at once; once read, the data is counted in its reply's room in the queue.
    async fn read_budgeted(
        &self,
        open: Arc<OpenFile>,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ServerError> {
        let kib = len.div_ceil(1024).max(1) as u32;
        let permit = self
            .shared
            .read_budget
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(|_| ServerError::Internal("read budget closed".into()))?;
        if let Some(data) = open.read_cached(offset, len) {
            drop(permit);
            return Ok(data);
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
        drop(permit);
        Ok(data)
    }
}

/// How many of `items`, from the first, take at most `limit` bytes of JSON.
fn fitting<T: serde::Serialize>(items: &[T], limit: usize) -> usize {
    let mut total = 0;
    for (i, item) in items.iter().enumerate() {
        // The comma (or bracket) before each.
        total += json_len(item) + 1;
        if total > limit {
            return i;
        }
    }
    items.len()
}

fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX / 2, |v| v.len())
}
