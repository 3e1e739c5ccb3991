//! [`RemoteClient`]: one multiplexed connection to a server.
//!
//! The handle is cheap to clone. Two tasks own the socket: a writer fed by a bounded queue
//! (back-pressure for uploads) and a reader that routes each reply to the waiter registered
//! under its request id and each pushed event to the event stream. When the connection
//! drops, every waiter fails with `Disconnected` at once; nothing waits forever on a dead
//! socket. Reconnecting is the caller's business (see the mount's retry layer).
//!
//! A call made inside [`with_deadline`] carries that deadline to the server, less a
//! margin for the server to finish what it started, in the server's terms: milliseconds
//! since the server's `Hello`, which reached us after the server sent it, so the server
//! counts no less time than we do. The server refuses the request once it is past, so a
//! request we gave up on never runs later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sharefs_protocol::{
    ClientMessage, ErrorCode, Event, FileInfo, Frame, FrameCodec, FrameError, Notification, Reply,
    Request, ServerMessage, Space, DEFAULT_MAX_FRAME, MAGIC, VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::Framed;

/// The sending half of a connection, whatever the transport (TCP or TLS).
type FrameSink = std::pin::Pin<Box<dyn futures::Sink<Frame, Error = FrameError> + Send>>;

use crate::error::{ClientError, Result};
use crate::tls::{self, TrustOptions};

type Waiter = oneshot::Sender<Result<(Reply, Bytes)>>;

/// Read buffer between the TLS stream and its socket. rustls asks its transport for at
/// most 4 KiB past what it holds, so without one a large download costs a `recv` per few
/// KiB (100 per MiB measured; 24 with this buffer).
const TLS_READ_BUFFER: usize = 64 * 1024;

tokio::task_local! {
    /// The deadline of the operation the current task works for.
    static DEADLINE: Instant;
}

/// Runs `fut` with every call it makes carrying `deadline` to the server.
pub async fn with_deadline<F: std::future::Future>(deadline: Instant, fut: F) -> F::Output {
    DEADLINE.scope(deadline, fut).await
}

tokio::task_local! {
    /// Whether the changes the current task asks for may be answered before they are
    /// durable (the protocol's `lazy`).
    static LAZY: bool;
}

/// Runs `fut` with every change it asks for marked `lazy`: answered by the server once
/// made, made durable by the next change that waits, a [`RemoteClient::sync`], or within
/// the protocol's `LAZY_SYNC_MS`. The server makes content durable before it answers
/// whatever this says.
pub async fn lazily<F: std::future::Future>(fut: F) -> F::Output {
    LAZY.scope(true, fut).await
}

/// Whether the current task runs inside [`lazily`].
pub fn is_lazy() -> bool {
    LAZY.try_with(|l| *l).unwrap_or(false)
}

/// What is left of a deadline for the server to finish a request it started, at most.
const COMMIT_MARGIN: Duration = Duration::from_secs(1);

/// Pushed events of one connection. Ends when the connection does.
pub type EventStream = mpsc::UnboundedReceiver<Event>;

/// Where to connect and as whom.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub server: String,
    pub user: String,
    pub password: String,
    pub connect_timeout: Duration,
    /// `None`: plaintext (`--plaintext`).
    pub tls: Option<TrustOptions>,
}

#[derive(Debug, Clone)]
pub struct RemoteClient {
    inner: Arc<Inner>,
}

struct Inner {
    user: String,
    /// Largest data chunk a frame of this connection carries (from the negotiated frame
    /// size): larger reads and upload chunks are split.
    chunk_size: u32,
    /// Callers write their frames themselves, one at a time (no writer task to wake: a
    /// request leaves from the thread that makes it). A frame, once queued, is complete
    /// in the codec's buffer, so a caller cancelled mid-flush leaves the next one to push
    /// the rest; at most one frame (up to 1 MiB) is ever buffered per connection.
    sink: tokio::sync::Mutex<FrameSink>,
    /// In-flight requests; `None` once the connection is closed, so no waiter can be added
    /// after the last ones were failed. std `Mutex`: never held across an await.
    waiters: Mutex<Option<HashMap<u64, Waiter>>>,
    next_id: AtomicU64,
    /// When the server's `Hello` arrived: request deadlines are sent relative to it.
    hello_at: Instant,
    /// When a frame last arrived, in milliseconds after `hello_at` (see
    /// [`RemoteClient::silent_for`]).
    heard_ms: AtomicU64,
    /// Becomes `true` when the connection is gone.
    closed: watch::Receiver<bool>,
    closed_tx: watch::Sender<bool>,
}

impl Drop for Inner {
    /// Ends the connection cleanly (TLS close_notify) when the last handle goes.
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let idle: FrameSink = Box::pin(futures::sink::drain().sink_map_err(|e| match e {}));
        let mut sink = std::mem::replace(self.sink.get_mut(), idle);
        runtime.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), sink.close()).await;
        });
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("user", &self.user).finish()
    }
}

impl Inner {
    /// Writes one frame; a failure closes the connection for every caller.
    async fn send(&self, frame: Frame) -> Result<()> {
        if *self.closed.borrow() {
            return Err(ClientError::Disconnected("connection closed".into()));
        }
        let mut sink = self.sink.lock().await;
        match sink.send(frame).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let err = match e {
                    FrameError::Io(e) => ClientError::Disconnected(e.to_string()),
                    other => ClientError::Protocol(other.to_string()),
                };
                self.fail_all(err.clone());
                Err(err)
            }
        }
    }

    /// Fails every waiting call with `err` and marks the connection closed.
    fn fail_all(&self, err: ClientError) {
        let waiters = self.waiters.lock().ok().and_then(|mut w| w.take());
        for (_, w) in waiters.into_iter().flatten() {
            let _ = w.send(Err(err.clone()));
        }
        let _ = self.closed_tx.send(true);
    }
}

impl RemoteClient {
    /// Connects over TCP and logs in.
    pub async fn connect(opts: &ConnectOptions) -> Result<(RemoteClient, EventStream)> {
        Self::connect_as(opts, None).await
    }

    /// [`RemoteClient::connect`] as the client process `client`: logging in fences that
    /// client's older connections, so nothing they still carry runs after this one is up.
    ///
    /// `opts.server` may list several servers (`n1:7070,n2:7070`, the nodes of a
    /// cluster): they are tried in turn, from the one that last answered, until one
    /// takes the login; a refusal of the login itself (a wrong password, a certificate
    /// that does not match) is not retried elsewhere.
    pub async fn connect_as(
        opts: &ConnectOptions,
        client: Option<u64>,
    ) -> Result<(RemoteClient, EventStream)> {
        /// The list position of the server that last answered, shared by all
        /// connections of the process.
        static LAST_GOOD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let servers: Vec<&str> = opts
            .server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if servers.len() < 2 {
            return Self::connect_one(opts, client).await;
        }
        let first = LAST_GOOD.load(std::sync::atomic::Ordering::Relaxed) % servers.len();
        let mut last_error = None;
        for i in 0..servers.len() {
            let at = (first + i) % servers.len();
            let one = ConnectOptions {
                server: servers[at].to_string(),
                ..opts.clone()
            };
            match Self::connect_one(&one, client).await {
                Ok(connected) => {
                    LAST_GOOD.store(at, std::sync::atomic::Ordering::Relaxed);
                    return Ok(connected);
                }
                Err(e @ ClientError::Connect { .. }) => {
                    tracing::info!(server = servers[at], error = %e, "server unreachable; trying the next");
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| ClientError::Connect {
            addr: opts.server.clone(),
            reason: "no server given".into(),
        }))
    }

    /// Connects to one server.
    async fn connect_one(
        opts: &ConnectOptions,
        client: Option<u64>,
    ) -> Result<(RemoteClient, EventStream)> {
        let connect_err = |reason: String| ClientError::Connect {
            addr: opts.server.clone(),
            reason,
        };
        let stream = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(&opts.server))
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let Some(trust) = &opts.tls else {
            tracing::warn!(server = %opts.server, "TLS off (--plaintext): password and data travel in the clear");
            let login = Self::handshake_as(stream, &opts.user, &opts.password, client);
            return match tokio::time::timeout(opts.connect_timeout, login).await {
                Ok(Err(ClientError::Disconnected(_))) => Err(connect_err(
                    "the server closed the connection (it may expect TLS: drop --plaintext)".into(),
                )),
                Ok(r) => r,
                Err(_) => Err(connect_err("no answer to the handshake".into())),
            };
        };
        let tls = tls::connector(&opts.server, trust).map_err(ClientError::Tls)?;
        let stream = tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, stream);
        let handshake = tls.connector.connect(tls.server_name.clone(), stream);
        let stream = match tokio::time::timeout(opts.connect_timeout, handshake).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let refused = tls.failure.lock().ok().and_then(|mut f| f.take());
                return Err(match refused {
                    Some(why) => ClientError::Tls(why),
                    None => connect_err(format!(
                        "TLS handshake failed: {e} (if the server runs with --plaintext, use --plaintext too)"
                    )),
                });
            }
            Err(_) => return Err(connect_err("no answer to the TLS handshake".into())),
        };
        let (_, session) = stream.get_ref();
        tracing::debug!(
            version = ?session.protocol_version(),
            suite = ?session.negotiated_cipher_suite().map(|s| s.suite()),
            "TLS established"
        );
        tokio::time::timeout(
            opts.connect_timeout,
            Self::handshake_as(stream, &opts.user, &opts.password, client),
        )
        .await
        .map_err(|_| connect_err("no answer to the handshake".into()))?
    }

    /// Runs the handshake and login on an established stream (TCP or TLS).
    pub async fn handshake<S>(
        stream: S,
        user: &str,
        password: &str,
    ) -> Result<(RemoteClient, EventStream)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::handshake_as(stream, user, password, None).await
    }

    async fn handshake_as<S>(
        stream: S,
        user: &str,
        password: &str,
        client: Option<u64>,
    ) -> Result<(RemoteClient, EventStream)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut framed = Framed::new(stream, FrameCodec::new(DEFAULT_MAX_FRAME));
        send_now(
            &mut framed,
            &ClientMessage::Hello {
                magic: MAGIC.into(),
                version: VERSION,
                max_frame: DEFAULT_MAX_FRAME,
            },
        )
        .await?;
        let hello = recv_now(&mut framed).await?;
        let hello_at = Instant::now();
        let max_frame = match hello {
            ServerMessage::Hello {
                magic,
                version,
                max_frame,
            } => {
                if magic != MAGIC {
                    return Err(ClientError::Protocol("not a sharefs server".into()));
                }
                if version != VERSION {
                    return Err(ClientError::Protocol(format!(
                        "server speaks protocol version {version}, this client {VERSION}"
                    )));
                }
                framed.codec_mut().set_max_frame(max_frame);
                max_frame
            }
            other => return Err(unexpected(other)),
        };
        send_now(
            &mut framed,
            &ClientMessage::Login {
                user: user.into(),
                password: password.into(),
                client,
            },
        )
        .await?;
        match recv_now(&mut framed).await? {
            ServerMessage::LoginOk { .. } => {}
            other => return Err(unexpected(other)),
        }

        let (sink, source) = sharefs_protocol::frame::split(framed);
        let (closed_tx, closed) = watch::channel(false);
        let inner = Arc::new(Inner {
            user: user.to_string(),
            chunk_size: sharefs_protocol::chunk_size(max_frame),
            sink: tokio::sync::Mutex::new(Box::pin(sink)),
            waiters: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
            hello_at,
            heard_ms: AtomicU64::new(0),
            closed,
            closed_tx,
        });
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let dropped = inner.closed.clone();
        tokio::spawn(read_loop(source, Arc::downgrade(&inner), ev_tx, dropped));
        Ok((RemoteClient { inner }, ev_rx))
    }

    pub fn user(&self) -> &str {
        &self.inner.user
    }

    /// Largest data chunk one frame of this connection carries: 1 MiB, or less when the
    /// server negotiated smaller frames. [`RemoteClient::read`] and
    /// [`RemoteClient::send_chunk`] split larger ones.
    pub fn chunk_size(&self) -> u32 {
        self.inner.chunk_size
    }

    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    /// How long nothing has arrived from the server.
    pub fn silent_for(&self) -> Duration {
        let heard = self.inner.hello_at
            + Duration::from_millis(self.inner.heard_ms.load(Ordering::Relaxed));
        Instant::now().saturating_duration_since(heard)
    }

    /// Drops the connection: every call in flight fails with `Disconnected(reason)` and
    /// the event stream ends.
    pub fn abort(&self, reason: &str) {
        self.inner
            .fail_all(ClientError::Disconnected(reason.to_string()));
    }

    /// Completes when the connection is gone.
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Sends a request and waits for its reply.
    pub async fn call(&self, op: Request, payload: Bytes) -> Result<(Reply, Bytes)> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self
                .inner
                .waiters
                .lock()
                .map_err(|_| ClientError::Disconnected("client state poisoned".into()))?;
            match waiters.as_mut() {
                Some(w) => w.insert(id, tx),
                None => return Err(ClientError::Disconnected("connection closed".into())),
            };
        }
        let deadline_ms = DEADLINE.try_with(|d| *d).ok().map(|d| {
            let now = Instant::now();
            let margin = COMMIT_MARGIN.min(d.saturating_duration_since(now) / 4);
            (d - margin)
                .saturating_duration_since(self.inner.hello_at)
                .as_millis() as u64
        });
        let lazy = is_lazy();
        let frame = Frame::new(
            &ClientMessage::Request {
                id,
                deadline_ms,
                lazy,
                op,
            },
            payload,
        )
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let Err(e) = self.inner.send(frame).await {
            if let Ok(mut w) = self.inner.waiters.lock() {
                if let Some(w) = w.as_mut() {
                    w.remove(&id);
                }
            }
            return Err(e);
        }
        rx.await
            .map_err(|_| ClientError::Disconnected("connection closed".into()))?
    }

    /// Sends upload data (no reply; a failure surfaces at commit), in as many chunk
    /// frames as the negotiated frame size needs.
    pub async fn send_chunk(&self, upload: u64, mut offset: u64, mut data: Bytes) -> Result<()> {
        let chunk = self.inner.chunk_size as usize;
        loop {
            let piece = data.split_to(chunk.min(data.len()));
            let len = piece.len() as u64;
            let frame = Frame::new(&ClientMessage::Chunk { upload, offset }, piece)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            self.inner.send(frame).await?;
            offset += len;
            if data.is_empty() {
                return Ok(());
            }
        }
    }

    async fn call_empty(&self, op: Request) -> Result<Reply> {
        Ok(self.call(op, Bytes::new()).await?.0)
    }

    /// A round trip that does nothing: proof the connection is alive.
    pub async fn ping(&self) -> Result<()> {
        self.call_empty(Request::Ping).await.map(|_| ())
    }

    /// Makes every change of the user's tree answered so far durable (see [`lazily`]).
    pub async fn sync(&self) -> Result<()> {
        match self.call_empty(Request::Sync).await? {
            Reply::Ok => Ok(()),
            other => Err(wrong_reply(other)),
        }
    }

    pub async fn list_users(&self) -> Result<Vec<String>> {
        match self.call_empty(Request::ListUsers).await? {
            Reply::Users { users } => Ok(users),
            other => Err(wrong_reply(other)),
        }
    }

    /// All entries of directory `dir` of `owner`'s tree, sorted by name (fetched page by
    /// page).
    pub async fn list(&self, owner: &str, dir: u64) -> Result<Vec<FileInfo>> {
        let mut all: Vec<FileInfo> = Vec::new();
        loop {
            let after = all.last().map(|f| f.name.clone());
            let op = Request::List {
                owner: owner.into(),
                dir,
                after,
                limit: None,
            };
            match self.call_empty(op).await? {
                Reply::Files { files, more } => {
                    let empty = files.is_empty();
                    all.extend(files);
                    if !more || empty {
                        return Ok(all);
                    }
                }
                other => return Err(wrong_reply(other)),
            }
        }
    }

    /// The entry `name` in directory `parent`.
    pub async fn lookup(&self, owner: &str, parent: u64, name: &str) -> Result<FileInfo> {
        file_reply(
            self.call_empty(Request::Lookup {
                owner: owner.into(),
                parent,
                name: name.into(),
            })
            .await?,
        )
    }

    /// The entry `id`, wherever it now is.
    pub async fn stat(&self, owner: &str, id: u64) -> Result<FileInfo> {
        file_reply(
            self.call_empty(Request::Stat {
                owner: owner.into(),
                id,
            })
            .await?,
        )
    }

    /// The entry at `path` in `owner`'s tree ("" is the folder itself).
    pub async fn resolve(&self, owner: &str, path: &str) -> Result<FileInfo> {
        file_reply(
            self.call_empty(Request::Resolve {
                owner: owner.into(),
                path: path.into(),
            })
            .await?,
        )
    }

    /// Opens a file for reading (a download when `owner` is someone else).
    pub async fn open(&self, owner: &str, id: u64) -> Result<(u64, FileInfo)> {
        let (handle, file, _) = self.open_with_head(owner, id, 0).await?;
        Ok((handle, file))
    }

    /// Opens a file and returns up to `head` bytes from its start with the handle.
    pub async fn open_with_head(
        &self,
        owner: &str,
        id: u64,
        head: u32,
    ) -> Result<(u64, FileInfo, Bytes)> {
        let op = Request::Open {
            owner: owner.into(),
            id,
            head,
        };
        match self.call(op, Bytes::new()).await? {
            (Reply::Opened { handle, file }, data) => Ok((handle, file, data)),
            (other, _) => Err(wrong_reply(other)),
        }
    }

    /// Reads up to `len` bytes at `offset` (short only at the end of the file). A read
    /// larger than [`RemoteClient::chunk_size`] goes out as several requests at once.
    pub async fn read(&self, handle: u64, offset: u64, len: u32) -> Result<Bytes> {
        let chunk = self.inner.chunk_size;
        if len <= chunk {
            return self.read_one(handle, offset, len).await;
        }
        let pieces = (0..len.div_ceil(chunk)).map(|i| {
            let start = i * chunk;
            self.read_one(handle, offset + u64::from(start), chunk.min(len - start))
        });
        let mut out = bytes::BytesMut::with_capacity(len as usize);
        for piece in futures::future::try_join_all(pieces).await? {
            let short = piece.len() < chunk as usize;
            out.extend_from_slice(&piece);
            if short {
                break;
            }
        }
        Ok(out.freeze())
    }

    async fn read_one(&self, handle: u64, offset: u64, len: u32) -> Result<Bytes> {
        self.call_data(Request::Read {
            handle,
            offset,
            len,
        })
        .await
    }

    /// A request answered with `data`: its bytes.
    async fn call_data(&self, op: Request) -> Result<Bytes> {
        match self.call(op, Bytes::new()).await? {
            (Reply::Data, data) => Ok(data),
            (other, _) => Err(wrong_reply(other)),
        }
    }

    pub async fn close(&self, handle: u64) -> Result<()> {
        self.call_empty(Request::Close { handle }).await.map(|_| ())
    }

    /// Starts an upload into the caller's tree, to `target`.
    pub async fn upload_begin(&self, target: &UploadTarget, size: Option<u64>) -> Result<u64> {
        match self
            .call_empty(Request::UploadBegin {
                owner: self.inner.user.clone(),
                parent: target.parent,
                name: target.name.clone(),
                replace: target.replace,
                size,
                mode: target.mode,
            })
            .await?
        {
            Reply::UploadStarted { upload, .. } => Ok(upload),
            other => Err(wrong_reply(other)),
        }
    }

    /// Makes what the server received of `upload` durable; returns how many bytes that is.
    pub async fn upload_sync(&self, upload: u64) -> Result<u64> {
        match self.call_empty(Request::UploadSync { upload }).await? {
            Reply::UploadDurable { durable } => Ok(durable),
            other => Err(wrong_reply(other)),
        }
    }

    /// Takes up an upload a lost connection left; returns where its chunks continue.
    pub async fn upload_resume(&self, upload: u64) -> Result<u64> {
        match self.call_empty(Request::UploadResume { upload }).await? {
            Reply::UploadStarted { offset, .. } => Ok(offset),
            other => Err(wrong_reply(other)),
        }
    }

    /// Reads back up to `len` (at most one chunk) bytes the server received of `upload`.
    pub async fn upload_read(&self, upload: u64, offset: u64, len: u32) -> Result<Bytes> {
        let len = len.min(self.inner.chunk_size);
        self.call_data(Request::UploadRead {
            upload,
            offset,
            len,
        })
        .await
    }

    /// The version, size and hex BLAKE3 hash of one of the caller's files.
    pub async fn content_hash(&self, id: u64) -> Result<(u64, u64, String)> {
        match self
            .call_empty(Request::ContentHash {
                owner: self.inner.user.clone(),
                id,
            })
            .await?
        {
            Reply::ContentHash {
                version,
                size,
                blake3,
            } => Ok((version, size, blake3)),
            other => Err(wrong_reply(other)),
        }
    }

    pub async fn upload_commit(
        &self,
        upload: u64,
        size: u64,
        blake3: &str,
        mtime_ns: Option<i64>,
    ) -> Result<FileInfo> {
        file_reply(
            self.call_empty(Request::UploadCommit {
                upload,
                size,
                blake3: blake3.into(),
                mtime_ns,
            })
            .await?,
        )
    }

    pub async fn upload_abort(&self, upload: u64) -> Result<()> {
        self.call_empty(Request::UploadAbort { upload })
            .await
            .map(|_| ())
    }

    /// Uploads a whole small file to `target` in one round trip.
    pub async fn put_small(&self, target: &UploadTarget, data: Bytes) -> Result<FileInfo> {
        let blake3 = blake3::hash(&data).to_hex().to_string();
        file_reply(
            self.call(
                Request::Put {
                    owner: self.inner.user.clone(),
                    parent: target.parent,
                    name: target.name.clone(),
                    replace: target.replace,
                    blake3,
                    mode: target.mode,
                    mtime_ns: target.mtime_ns,
                },
                data,
            )
            .await?
            .0,
        )
    }

    /// Creates directory `name` in `parent` of the caller's tree.
    pub async fn mkdir(&self, parent: u64, name: &str, mode: u32) -> Result<FileInfo> {
        let reply = self
            .call_empty(Request::Mkdir {
                owner: self.inner.user.clone(),
                parent,
                name: name.into(),
                mode,
            })
            .await?;
        self.entry_reply(reply, parent, name).await
    }

    /// Creates the symbolic link `name` in `parent` of the caller's tree.
    pub async fn symlink(&self, parent: u64, name: &str, target: &str) -> Result<FileInfo> {
        let reply = self
            .call_empty(Request::Symlink {
                owner: self.inner.user.clone(),
                parent,
                name: name.into(),
                target: target.into(),
            })
            .await?;
        self.entry_reply(reply, parent, name).await
    }

    /// Removes `name` from `parent` of `owner`'s tree (the server refuses anything but
    /// one's own): a file or link, or an empty directory when `dir`.
    pub async fn remove(&self, owner: &str, parent: u64, name: &str, dir: bool) -> Result<()> {
        self.call_empty(Request::Remove {
            owner: owner.into(),
            parent,
            name: name.into(),
            dir,
        })
        .await
        .map(|_| ())
    }

    /// Moves `name` in `parent` to `new_name` in `new_parent`, within the caller's tree.
    pub async fn rename(&self, mv: &Move) -> Result<FileInfo> {
        let reply = self
            .call_empty(Request::Rename {
                owner: self.inner.user.clone(),
                parent: mv.parent,
                name: mv.name.clone(),
                new_parent: mv.new_parent,
                new_name: mv.new_name.clone(),
                noreplace: mv.noreplace,
            })
            .await?;
        self.entry_reply(reply, mv.new_parent, &mv.new_name).await
    }

    /// Changes an entry's mode and times; `None`s are kept.
    pub async fn setattr(&self, id: u64, change: &AttrChange) -> Result<FileInfo> {
        let reply = self
            .call_empty(Request::SetAttr {
                owner: self.inner.user.clone(),
                id,
                mode: change.mode,
                atime_ns: change.atime_ns,
                mtime_ns: change.mtime_ns,
            })
            .await?;
        match reply {
            Reply::Ok => self.stat(&self.inner.user, id).await,
            other => file_reply(other),
        }
    }

    /// The entry a change answered with, or (a server that answers `ok`) looked up.
    async fn entry_reply(&self, reply: Reply, parent: u64, name: &str) -> Result<FileInfo> {
        match reply {
            Reply::Ok => self.lookup(&self.inner.user, parent, name).await,
            other => file_reply(other),
        }
    }

    pub async fn ack(&self, ids: Vec<u64>) -> Result<()> {
        self.call_empty(Request::Ack { ids }).await.map(|_| ())
    }

    pub async fn notifications(
        &self,
        recent: u32,
    ) -> Result<(Vec<Notification>, Vec<Notification>)> {
        match self.call_empty(Request::Notifications { recent }).await? {
            Reply::Notifications { pending, recent } => Ok((pending, recent)),
            other => Err(wrong_reply(other)),
        }
    }

    pub async fn statfs(&self) -> Result<Space> {
        match self.call_empty(Request::StatFs).await? {
            Reply::Space(space) => Ok(space),
            other => Err(wrong_reply(other)),
        }
    }
}

/// Where an upload goes and what it sets besides the content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadTarget {
    /// The directory that holds (or is to hold) the file.
    pub parent: u64,
    pub name: String,
    /// The file to make a new version of, wherever it then is; `None` creates or replaces
    /// `name` in `parent`.
    pub replace: Option<u64>,
    pub mode: Option<u32>,
    pub mtime_ns: Option<i64>,
}

impl UploadTarget {
    /// A new file (or the file there) `name` in `parent`.
    pub fn at(parent: u64, name: &str) -> UploadTarget {
        UploadTarget {
            parent,
            name: name.into(),
            ..UploadTarget::default()
        }
    }
}

/// A rename within the caller's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub parent: u64,
    pub name: String,
    pub new_parent: u64,
    pub new_name: String,
    /// Fail with `exists` instead of replacing what is at the new place.
    pub noreplace: bool,
}

/// A change of mode and times (`None`: kept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttrChange {
    pub mode: Option<u32>,
    pub atime_ns: Option<i64>,
    pub mtime_ns: Option<i64>,
}

impl AttrChange {
    pub fn is_empty(&self) -> bool {
        self.mode.is_none() && self.atime_ns.is_none() && self.mtime_ns.is_none()
    }
}

fn file_reply(reply: Reply) -> Result<FileInfo> {
    match reply {
        Reply::File { file } => Ok(file),
        other => Err(wrong_reply(other)),
    }
}

fn wrong_reply(reply: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {reply:?}"))
}

fn unexpected(msg: ServerMessage) -> ClientError {
    match msg {
        ServerMessage::Error { error, .. } => ClientError::Remote(error),
        other => ClientError::Protocol(format!("unexpected message {other:?}")),
    }
}

async fn send_now<S>(framed: &mut Framed<S, FrameCodec>, msg: &ClientMessage) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = Frame::new(msg, Bytes::new()).map_err(|e| ClientError::Protocol(e.to_string()))?;
    framed
        .send(frame)
        .await
        .map_err(|e| ClientError::Disconnected(e.to_string()))
}

async fn recv_now<S>(framed: &mut Framed<S, FrameCodec>) -> Result<ServerMessage>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match framed.next().await {
        Some(Ok(frame)) => frame
            .message()
            .map_err(|e| ClientError::Protocol(e.to_string())),
        Some(Err(e)) => Err(ClientError::Protocol(e.to_string())),
        None => Err(ClientError::Disconnected(
            "server closed the connection during the handshake".into(),
        )),
    }
}

async fn read_loop<S>(
    mut source: Framed<tokio::io::ReadHalf<S>, FrameCodec>,
    inner: std::sync::Weak<Inner>,
    events: mpsc::UnboundedSender<Event>,
    mut dropped: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let reason = loop {
        let next = tokio::select! {
            next = source.next() => next,
            // The client was dropped (its sender went with it) or aborted: close the
            // connection.
            changed = dropped.changed() => {
                if changed.is_err() || *dropped.borrow() {
                    return;
                }
                continue;
            }
        };
        let frame = match next {
            Some(Ok(frame)) => frame,
            Some(Err(FrameError::Io(e))) => break ClientError::Disconnected(e.to_string()),
            // A frame we cannot decode will not decode on a new connection either: not
            // worth retrying.
            Some(Err(e)) => break ClientError::Protocol(e.to_string()),
            None => break ClientError::Disconnected("server closed the connection".into()),
        };
        let msg = match sharefs_protocol::decode::server_message(&frame.header) {
            Ok(m) => m,
            Err(e) => break ClientError::Protocol(format!("malformed message from server: {e}")),
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let heard = Instant::now().saturating_duration_since(inner.hello_at);
        inner
            .heard_ms
            .store(heard.as_millis() as u64, Ordering::Relaxed);
        let (id, result) = match msg {
            ServerMessage::Response { id, reply } => (id, Ok((reply, frame.payload))),
            ServerMessage::Error {
                id: Some(id),
                error,
            } => (id, Err(ClientError::Remote(error))),
            ServerMessage::Error { id: None, error } => {
                break if error.code == ErrorCode::Busy {
                    ClientError::Disconnected(format!("server busy: {error}"))
                } else {
                    ClientError::Remote(error)
                };
            }
            ServerMessage::Event { event } => {
                let _ = events.send(event);
                continue;
            }
            other => break ClientError::Protocol(format!("unexpected message {other:?}")),
        };
        let waiter = inner
            .waiters
            .lock()
            .ok()
            .and_then(|mut w| w.as_mut().and_then(|w| w.remove(&id)));
        if let Some(w) = waiter {
            let _ = w.send(result);
        }
    };
    tracing::debug!(%reason, "connection ended");
    if let Some(inner) = inner.upgrade() {
        inner.fail_all(reason);
    }
}
