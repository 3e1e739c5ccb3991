//! [`Connection`]: a [`RemoteClient`] that reconnects.
//!
//! A background task keeps one connection alive: it connects with exponential backoff,
//! publishes the live client, forwards its pushed events, and when the connection drops
//! publishes "none" and starts over. Callers wait for a live client at most
//! `op_timeout` and retry calls that failed because the connection dropped, until that
//! deadline; then they fail, so no caller waits forever on a dead server. Each new
//! connection has a new generation number: server-side handles from an older generation
//! are gone and must be reopened.
//!
//! One operation, one deadline: every call an operation makes, retries included, carries
//! the same deadline to the server, which refuses to run it once past. Every connection
//! logs in as this process's client id, which fences the older connections on the server,
//! so a retried request cannot also run from a connection that stalled. A heartbeat finds
//! a silent connection: when nothing has arrived for a beat, a ping goes out; when nothing
//! has arrived for two, the connection is dropped and replaced, well within one timeout.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sharefs_protocol::{EntryKind, ErrorCode, Event, FileInfo, Space};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::error::{ClientError, Result};
use crate::remote::{with_deadline, AttrChange, ConnectOptions, Move, RemoteClient, UploadTarget};
use crate::transfer;

tokio::task_local! {
    /// The deadline of the filesystem operation the current task works for.
    static OPERATION: Instant;
}

/// What the connection reports besides server events.
#[derive(Debug, Clone)]
pub enum ConnectionEvent {
    /// A server-pushed event.
    Server(Event),
    /// A new connection is up (after the first): anything cached may be stale.
    Reconnected,
    /// The connection dropped; reconnecting.
    Lost(String),
}

/// A server-side read handle and the connection generation it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteHandle {
    pub id: u64,
    pub generation: u64,
}

#[derive(Debug, Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    user: String,
    server: String,
    /// The live client and its generation, or `None` while reconnecting.
    live: watch::Receiver<Option<(RemoteClient, u64)>>,
    op_timeout: Duration,
    /// Set when an operation waited its whole timeout for a connection in vain; cleared
    /// when one is up again. Meanwhile an operation asks for a reconnect attempt at once
    /// and waits for it at most [`GAVE_UP_GRACE`] instead of a whole timeout more, so a
    /// command that makes several operations fails within about one.
    gave_up: Arc<AtomicBool>,
    /// Wakes the background task out of its backoff for an immediate attempt.
    retry_now: Arc<tokio::sync::Notify>,
    /// Ends the background task when the last handle is dropped.
    _stop: mpsc::Sender<()>,
}

impl Connection {
    /// Connects once (so bad credentials fail here, clearly) and then keeps the connection
    /// alive in the background. Events go to the returned receiver.
    pub async fn start(
        opts: ConnectOptions,
        op_timeout: Duration,
    ) -> Result<(Connection, mpsc::UnboundedReceiver<ConnectionEvent>)> {
        let client_id = client_id();
        let (client, events) = RemoteClient::connect_as(&opts, Some(client_id)).await?;
        let (live_tx, live) = watch::channel(Some((client.clone(), 1)));
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = mpsc::channel(1);
        let gave_up = Arc::new(AtomicBool::new(false));
        let retry_now = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(keep_alive(
            opts.clone(),
            client_id,
            client,
            events,
            Live {
                tx: live_tx,
                gave_up: gave_up.clone(),
                retry_now: retry_now.clone(),
            },
            ev_tx,
            stop_rx,
            op_timeout,
        ));
        Ok((
            Connection {
                inner: Arc::new(Inner {
                    server: opts.server,
                    user: opts.user,
                    live,
                    op_timeout,
                    gave_up,
                    retry_now,
                    _stop: stop_tx,
                }),
            },
            ev_rx,
        ))
    }

    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// Whether a connection is up now.
    pub fn connected(&self) -> bool {
        self.inner.live.borrow().is_some()
    }

    /// Changes when the connection goes down or comes back.
    pub fn changes(&self) -> watch::Receiver<Option<(RemoteClient, u64)>> {
        self.inner.live.clone()
    }

    pub fn user(&self) -> &str {
        &self.inner.user
    }

    pub fn op_timeout(&self) -> Duration {
        self.inner.op_timeout
    }

    /// Runs one operation: every call made inside `fut` (retries, reopens, several
    /// requests) shares one deadline, one operation timeout from now.
    pub async fn operation<F: std::future::Future>(&self, fut: F) -> F::Output {
        OPERATION
            .scope(Instant::now() + self.inner.op_timeout, fut)
            .await
    }

    /// The deadline of a call starting now: the operation's (never later than one
    /// timeout away), or one timeout away outside an operation.
    fn deadline(&self) -> Instant {
        current_operation().unwrap_or_else(|| Instant::now() + self.inner.op_timeout)
    }

    /// The deadline of an upload starting now: one timeout of its own, whatever the
    /// operation it belongs to (a `close()`) spent before it on waiting for an earlier
    /// upload or fetching unwritten parts of the file.
    fn upload_deadline(&self) -> Instant {
        Instant::now() + self.inner.op_timeout
    }

    /// Waits until `deadline` for a live client.
    async fn client(&self, deadline: Instant) -> Result<(RemoteClient, u64)> {
        let mut live = self.inner.live.clone();
        let usable =
            |c: &Option<(RemoteClient, u64)>| c.as_ref().is_some_and(|(c, _)| !c.is_closed());
        let mut until = deadline;
        if self.inner.gave_up.load(Ordering::SeqCst) && !usable(&live.borrow()) {
            self.inner.retry_now.notify_one();
            until = deadline.min(Instant::now() + GAVE_UP_GRACE);
        }
        let wait = live.wait_for(usable);
        let result = match tokio::time::timeout_at(until, wait).await {
            Ok(Ok(guard)) => guard
                .as_ref()
                .cloned()
                .ok_or_else(|| ClientError::Disconnected("no connection".into())),
            Ok(Err(_)) => Err(ClientError::Disconnected("connection task ended".into())),
            Err(_) => {
                self.inner.gave_up.store(true, Ordering::SeqCst);
                Err(ClientError::Timeout(self.inner.op_timeout))
            }
        };
        result
    }

    /// Runs `op` on a live client, retrying on connection loss until the deadline.
    pub async fn retry<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnMut(RemoteClient, u64) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        self.retry_until(self.deadline(), op).await
    }

    /// [`Connection::retry`] until `deadline`.
    async fn retry_until<T, F, Fut>(&self, deadline: Instant, mut op: F) -> Result<T>
    where
        F: FnMut(RemoteClient, u64) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        loop {
            let (client, generation) = self.client(deadline).await?;
            let attempt = with_deadline(deadline, op(client.clone(), generation));
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Err(e)) if e.is_connection_error() => {
                    tracing::debug!(error = %e, "call failed on a dropped connection; retrying");
                    // Wait for this connection to be replaced before retrying.
                    let _ = tokio::time::timeout_at(deadline, client.closed()).await;
                    continue;
                }
                Ok(result) => return result,
                Err(_) => return Err(ClientError::Timeout(self.inner.op_timeout)),
            }
        }
    }

    pub async fn list_users(&self) -> Result<Vec<String>> {
        self.retry(|c, _| async move { c.list_users().await }).await
    }

    pub async fn list(&self, owner: &str, dir: u64) -> Result<Vec<FileInfo>> {
        self.retry(|c, _| async move { c.list(owner, dir).await })
            .await
    }

    pub async fn lookup(&self, owner: &str, parent: u64, name: &str) -> Result<FileInfo> {
        self.retry(|c, _| async move { c.lookup(owner, parent, name).await })
            .await
    }

    pub async fn stat(&self, owner: &str, id: u64) -> Result<FileInfo> {
        self.retry(|c, _| async move { c.stat(owner, id).await })
            .await
    }

    /// Opens for reading; up to `head` bytes of the start come back with the handle.
    pub async fn open(
        &self,
        owner: &str,
        id: u64,
        head: u32,
    ) -> Result<(RemoteHandle, FileInfo, Bytes)> {
        self.retry(|c, generation| async move {
            let (handle, info, data) = c.open_with_head(owner, id, head).await?;
            Ok((
                RemoteHandle {
                    id: handle,
                    generation,
                },
                info,
                data,
            ))
        })
        .await
    }

    /// Reads through a handle. A handle of an older connection fails with `Disconnected`
    /// at once: the caller reopens.
    pub async fn read(&self, handle: RemoteHandle, offset: u64, len: u32) -> Result<Bytes> {
        let deadline = self.deadline();
        let (client, generation) = self.client(deadline).await?;
        if generation != handle.generation {
            return Err(ClientError::Disconnected(
                "handle of an earlier connection".into(),
            ));
        }
        let read = with_deadline(deadline, client.read(handle.id, offset, len));
        tokio::time::timeout_at(deadline, read)
            .await
            .map_err(|_| ClientError::Timeout(self.inner.op_timeout))?
    }

    /// Closes a handle; handles of dead connections are already gone, and handle 0 (a
    /// file that came whole with its `open`) was never kept.
    pub async fn close(&self, handle: RemoteHandle) {
        if handle.id == 0 {
            return;
        }
        let current = self.inner.live.borrow().clone();
        if let Some((client, generation)) = current {
            if generation == handle.generation {
                let _ = tokio::time::timeout(self.inner.op_timeout, client.close(handle.id)).await;
            }
        }
    }

    /// Uploads the content of `path` to `target` in the caller's tree, retrying from the
    /// start if the connection drops.
    pub async fn upload_file(&self, target: &UploadTarget, path: &Path) -> Result<FileInfo> {
        self.retry_until(self.upload_deadline(), |c, _| async move {
            let file = tokio::fs::File::open(path).await?;
            let size = file.metadata().await?.len();
            let reader = tokio::io::BufReader::with_capacity(1 << 20, file);
            transfer::upload(&c, target, reader, Some(size), |_| {}).await
        })
        .await
    }

    /// Uploads bytes held in memory (one round trip for small files).
    pub async fn upload_bytes(&self, target: &UploadTarget, data: Bytes) -> Result<FileInfo> {
        self.retry_until(self.upload_deadline(), |c, _| {
            let data = data.clone();
            async move {
                let size = data.len() as u64;
                transfer::upload(&c, target, &data[..], Some(size), |_| {}).await
            }
        })
        .await
    }

    /// Starts a streamed upload on the current connection.
    pub async fn upload_begin(&self, target: &UploadTarget) -> Result<RemoteHandle> {
        self.retry(|c, generation| async move {
            let id = c.upload_begin(target, None).await?;
            Ok(RemoteHandle { id, generation })
        })
        .await
    }

    /// `fut`, failing with `Timeout` after the operation timeout (no retry: for uploads,
    /// which live on one connection).
    async fn bounded<T>(&self, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let deadline = self.upload_deadline();
        tokio::time::timeout_at(deadline, with_deadline(deadline, fut))
            .await
            .map_err(|_| ClientError::Timeout(self.inner.op_timeout))?
    }

    /// Current live client if it is still the one of `generation`.
    fn client_of(&self, generation: u64) -> Result<RemoteClient> {
        match self.inner.live.borrow().as_ref() {
            Some((c, g)) if *g == generation && !c.is_closed() => Ok(c.clone()),
            _ => Err(ClientError::Disconnected(
                "upload of an earlier connection".into(),
            )),
        }
    }

    /// Sends a chunk of a streamed upload; fails at once if its connection is gone.
    pub async fn upload_chunk(&self, h: RemoteHandle, offset: u64, data: Bytes) -> Result<()> {
        let client = self.client_of(h.generation)?;
        self.bounded(client.send_chunk(h.id, offset, data)).await
    }

    pub async fn upload_commit(
        &self,
        h: RemoteHandle,
        size: u64,
        blake3: &str,
        mtime_ns: Option<i64>,
    ) -> Result<FileInfo> {
        let client = self.client_of(h.generation)?;
        self.bounded(client.upload_commit(h.id, size, blake3, mtime_ns))
            .await
    }

    /// Makes what the server received of a streamed upload durable; how many bytes.
    pub async fn upload_sync(&self, h: RemoteHandle) -> Result<u64> {
        let client = self.client_of(h.generation)?;
        self.bounded(client.upload_sync(h.id)).await
    }

    /// Takes up a streamed upload on a live connection after its own was lost: waits for
    /// one (within the operation timeout), and while the server still holds the upload
    /// for the connection that went (`busy`). Returns the upload on this connection and
    /// where its chunks continue.
    pub async fn upload_resume(&self, h: RemoteHandle) -> Result<(RemoteHandle, u64)> {
        let deadline = self.upload_deadline();
        let mut pause = Duration::from_millis(10);
        loop {
            let resumed = self
                .retry_until(deadline, |c, generation| async move {
                    let offset = c.upload_resume(h.id).await?;
                    Ok((
                        RemoteHandle {
                            id: h.id,
                            generation,
                        },
                        offset,
                    ))
                })
                .await;
            match resumed {
                Err(e)
                    if e.code() == Some(ErrorCode::Busy) && Instant::now() + pause < deadline =>
                {
                    tracing::debug!(upload = h.id, error = %e, "upload not let go yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// Reads back bytes the server received of a streamed upload.
    pub async fn upload_read(&self, h: RemoteHandle, offset: u64, len: u32) -> Result<Bytes> {
        let client = self.client_of(h.generation)?;
        self.bounded(client.upload_read(h.id, offset, len)).await
    }

    /// Version, size and BLAKE3 hash of one of the caller's files.
    pub async fn content_hash(&self, id: u64) -> Result<(u64, u64, String)> {
        self.retry(|c, _| async move { c.content_hash(id).await })
            .await
    }

    pub async fn upload_abort(&self, h: RemoteHandle) {
        if let Ok(client) = self.client_of(h.generation) {
            let _ = tokio::time::timeout(self.inner.op_timeout, client.upload_abort(h.id)).await;
        }
    }

    /// Removes `name` from `parent` in the caller's tree. A retry that finds it gone
    /// reports success: the first attempt ran before its connection was replaced.
    pub async fn remove(&self, parent: u64, name: &str, dir: bool) -> Result<()> {
        let owner = self.inner.user.clone();
        let owner = owner.as_str();
        let mut retried = false;
        self.retry(|c, _| {
            let again = std::mem::replace(&mut retried, true);
            async move {
                match c.remove(owner, parent, name, dir).await {
                    Err(e) if again && e.code() == Some(ErrorCode::NotFound) => Ok(()),
                    r => r,
                }
            }
        })
        .await
    }

    /// Moves an entry within the caller's tree. A retry that finds the source gone and
    /// the target present reports the target: the first attempt ran before its
    /// connection was replaced.
    pub async fn rename(&self, mv: &Move) -> Result<FileInfo> {
        let owner = self.inner.user.clone();
        let owner = owner.as_str();
        let mut retried = false;
        self.retry(|c, _| {
            let again = std::mem::replace(&mut retried, true);
            async move {
                match c.rename(mv).await {
                    Err(e) if again && e.code() == Some(ErrorCode::NotFound) => c
                        .lookup(owner, mv.new_parent, &mv.new_name)
                        .await
                        .map_err(|_| e),
                    r => r,
                }
            }
        })
        .await
    }

    /// Creates a directory. A retry that finds the name taken by a directory reports it:
    /// the first attempt ran before its connection was replaced.
    pub async fn mkdir(&self, parent: u64, name: &str, mode: u32) -> Result<FileInfo> {
        let owner = self.inner.user.clone();
        let owner = owner.as_str();
        let mut retried = false;
        self.retry(|c, _| {
            let again = std::mem::replace(&mut retried, true);
            async move {
                match c.mkdir(parent, name, mode).await {
                    Err(e) if again && e.code() == Some(ErrorCode::Exists) => {
                        match c.lookup(owner, parent, name).await {
                            Ok(info) if info.kind == EntryKind::Dir => Ok(info),
                            _ => Err(e),
                        }
                    }
                    r => r,
                }
            }
        })
        .await
    }

    /// Creates a symbolic link. A retry that finds the same link there reports it.
    pub async fn symlink(&self, parent: u64, name: &str, target: &str) -> Result<FileInfo> {
        let owner = self.inner.user.clone();
        let owner = owner.as_str();
        let mut retried = false;
        self.retry(|c, _| {
            let again = std::mem::replace(&mut retried, true);
            async move {
                match c.symlink(parent, name, target).await {
                    Err(e) if again && e.code() == Some(ErrorCode::Exists) => {
                        match c.lookup(owner, parent, name).await {
                            Ok(info) if info.target.as_deref() == Some(target) => Ok(info),
                            _ => Err(e),
                        }
                    }
                    r => r,
                }
            }
        })
        .await
    }

    /// Changes mode and times of an entry of the caller's tree (idempotent: retried as is).
    pub async fn setattr(&self, id: u64, change: AttrChange) -> Result<FileInfo> {
        self.retry(|c, _| async move { c.setattr(id, &change).await })
            .await
    }

    pub async fn statfs(&self) -> Result<Space> {
        self.retry(|c, _| async move { c.statfs().await }).await
    }

    /// Makes the user's changes answered so far durable. After a reconnect it syncs what
    /// the server has: lazy changes a server crash took away are gone either way.
    pub async fn sync(&self) -> Result<()> {
        self.retry(|c, _| async move { c.sync().await }).await
    }

    pub async fn ack(&self, ids: Vec<u64>) -> Result<()> {
        self.retry(|c, _| {
            let ids = ids.clone();
            async move { c.ack(ids).await }
        })
        .await
    }
}

/// The deadline of the operation the current task works for, if any: to hand on to
/// tasks it spawns (see [`in_operation`]).
pub fn current_operation() -> Option<Instant> {
    OPERATION.try_with(|d| *d).ok()
}

/// Runs `fut` (a task an operation spawned) under that operation's deadline, if any.
pub async fn in_operation<F: std::future::Future>(deadline: Option<Instant>, fut: F) -> F::Output {
    match deadline {
        Some(d) => OPERATION.scope(d, fut).await,
        None => fut.await,
    }
}

/// An id for this process's connections, different from every other client's.
fn client_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 40)
}

/// Drops `client`'s connection once nothing has arrived from the server for two beats,
/// pinging when it has been silent for one. Ends with the connection.
async fn heartbeat(client: RemoteClient, beat: Duration) {
    loop {
        tokio::select! {
            () = client.closed() => return,
            () = tokio::time::sleep(beat / 2) => {}
        }
        let silent = client.silent_for();
        if silent >= 2 * beat {
            tracing::warn!(
                ?silent,
                "no sign of life from the server; dropping the connection"
            );
            client.abort("no heartbeat from the server");
            return;
        }
        if silent >= beat {
            let c = client.clone();
            // Answered or failed with the connection; the reply itself is what counts.
            tokio::spawn(async move { c.ping().await });
        }
    }
}

/// The heartbeat's beat for an operation timeout: a dead connection is replaced after
/// two beats of silence (half the timeout), pings go out after one.
fn beat_for(op_timeout: Duration) -> Duration {
    (op_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(10))
}

/// How long an operation waits for a connection once one before it waited a whole
/// timeout in vain (see `Inner::gave_up`).
const GAVE_UP_GRACE: Duration = Duration::from_secs(1);

/// Where the background task publishes the live client.
struct Live {
    tx: watch::Sender<Option<(RemoteClient, u64)>>,
    /// Cleared when a connection is up again (see `Inner::gave_up`).
    gave_up: Arc<AtomicBool>,
    /// Notified by an operation that wants an attempt now.
    retry_now: Arc<tokio::sync::Notify>,
}

#[allow(clippy::too_many_arguments)]
async fn keep_alive(
    opts: ConnectOptions,
    client_id: u64,
    mut client: RemoteClient,
    mut events: crate::remote::EventStream,
    live: Live,
    out: mpsc::UnboundedSender<ConnectionEvent>,
    mut stop: mpsc::Receiver<()>,
    op_timeout: Duration,
) {
    let floor_period = op_timeout / 2;
    let beat = beat_for(op_timeout);
    // The timer floor: a timer always due within `floor_period` (half the operation
    // timeout). Every remote call arms a deadline one operation timeout away; when a new
    // timer is the runtime's earliest, tokio wakes its parked driver thread to re-arm, one
    // extra thread wake-up per request when requests come one at a time. With the floor
    // always earlier, a call's deadline never is, and costs no wake-up.
    let floor = tokio::time::sleep(floor_period);
    tokio::pin!(floor);
    let mut generation = 1;
    loop {
        tokio::spawn(heartbeat(client.clone(), beat));
        // Forward events until this connection ends.
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => { let _ = out.send(ConnectionEvent::Server(ev)); }
                    None => break,
                },
                () = &mut floor => floor.as_mut().reset(Instant::now() + floor_period),
                _ = stop.recv() => return,
            }
        }
        drop(client);
        let _ = live.tx.send(None);
        tracing::warn!(server = %opts.server, "connection lost; reconnecting");
        let _ = out.send(ConnectionEvent::Lost("connection lost".into()));
        let mut backoff = Duration::from_millis(50);
        loop {
            let attempt = tokio::select! {
                r = RemoteClient::connect_as(&opts, Some(client_id)) => r,
                _ = stop.recv() => return,
            };
            match attempt {
                Ok((c, e)) => {
                    client = c;
                    events = e;
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, ?backoff, "reconnect failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        () = live.retry_now.notified() => {}
                        _ = stop.recv() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        generation += 1;
        tracing::info!(server = %opts.server, generation, "reconnected");
        live.gave_up.store(false, Ordering::SeqCst);
        let _ = live.tx.send(Some((client.clone(), generation)));
        let _ = out.send(ConnectionEvent::Reconnected);
    }
}
