//! The accept loop: a connection limit, accept errors retried with backoff, and graceful
//! shutdown that stops accepting, tells every session to end and waits for them.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::SinkExt;
use sharefs_protocol::{ErrorBody, ErrorCode, Frame, FrameCodec, ServerMessage};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::Framed;

use crate::config::ServerConfig;
use crate::error::Result;
use crate::hub::Hub;
use crate::login::Logins;
use crate::session;
use crate::store::Store;
use crate::threads::SessionThreads;
use crate::users::UserDb;

/// State shared by all connections; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shared {
    pub config: Arc<ServerConfig>,
    pub store: Store,
    pub users: UserDb,
    pub hub: Hub,
    /// Bounds the bytes of file data buffered for reads across the whole server, in KiB.
    pub read_budget: Arc<Semaphore>,
    /// Where reads that miss the page cache run.
    pub misses: Arc<ReadMisses>,
    /// Login throttling, password checks and their log.
    pub logins: Arc<Logins>,
    /// Live connections per peer address.
    per_addr: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Uploads in progress per user, across connections.
    uploads: Arc<Mutex<HashMap<String, usize>>>,
    /// Open handles per user, across connections.
    handles: Arc<Mutex<HashMap<String, usize>>>,
    /// File descriptors open handles may hold, server-wide: what the process may open,
    /// less a reserve for connections, uploads and the store's own files.
    pub fds: Arc<Semaphore>,
    /// Per user, the bytes of replies all their connections may have queued.
    reply_allowances: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

/// Descriptors kept out of the handles' budget besides one per connection: uploads, the
/// store's journals and packs, the listener, logs.
const FD_RESERVE: usize = 256;

/// How many descriptors open handles may hold: what is left of the process's limit after
/// every connection and [`FD_RESERVE`]; at least a quarter of the limit.
fn handle_fd_budget(max_connections: usize) -> usize {
    let limit = fd_limit();
    let budget = limit.saturating_sub(max_connections + FD_RESERVE);
    if budget < limit / 4 {
        tracing::warn!(
            limit,
            max_connections,
            "the open-file limit is low for this many connections; raise it (ulimit -n) or lower --max-connections"
        );
        return limit / 4;
    }
    budget
}

/// The process's limit on open files.
fn fd_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// Raises the soft limit on open files to the hard one, as servers do.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// How long reads that missed the page cache have been taking, to decide where the next
/// small one runs. While the disk answers them quickly (an SSD: tens of microseconds, about
/// what handing a read to the blocking pool and back costs) it runs in place on the
/// session thread; otherwise on the blocking pool, so a slow disk does not hold up the
/// other connections of a session thread. A disk that turns slow costs one read's wait:
/// the average then sends the next ones to the pool until reads are fast again.
#[derive(Debug, Default)]
pub struct ReadMisses {
    /// Moving average of recent miss times in nanoseconds (each new one weighs 1/8).
    average_ns: AtomicU64,
}

impl ReadMisses {
    /// Reads up to this size may run in place.
    const IN_PLACE_MAX_LEN: usize = 64 * 1024;
    /// ...while misses have been taking less than this on average.
    const IN_PLACE_BELOW: Duration = Duration::from_micros(200);

    pub fn in_place(&self, len: usize) -> bool {
        len <= Self::IN_PLACE_MAX_LEN
            && self.average_ns.load(Ordering::Relaxed) < Self::IN_PLACE_BELOW.as_nanos() as u64
    }

    pub fn record(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        // Racing updates may lose one sample; the average stays an average.
        let old = self.average_ns.load(Ordering::Relaxed);
        let new = old - old / 8 + took / 8;
        self.average_ns.store(new, Ordering::Relaxed);
    }
}

/// A counted slot (a connection of an address, an upload of a user); freed on drop.
#[derive(Debug)]
pub struct Slot<K: std::hash::Hash + Eq + Clone> {
    table: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Slot<K> {
    fn take(table: &Arc<Mutex<HashMap<K, usize>>>, key: K, max: usize) -> Option<Slot<K>> {
        let mut t = table.lock().ok()?;
        let n = t.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            table: table.clone(),
            key,
        })
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.lock() {
            if let Some(n) = t.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    t.remove(&self.key);
                }
            }
        }
    }
}

impl Shared {
    pub fn open(config: ServerConfig) -> Result<Shared> {
        crate::fsutil::make_data_dir_private(&config.data_dir)?;
        let store = Store::open(&config.data_dir, config.disk_reserve)?;
        let hub = Hub::open(
            &config.data_dir,
            config.coalesce_window,
            config.max_pending_notifications,
        )?;
        let users = UserDb::new(&config.data_dir);
        let read_budget = Arc::new(Semaphore::new((config.read_buffer_budget / 1024).max(1)));
        let logins = Arc::new(Logins::new(config.login.clone()));
        let config_max_connections = config.max_connections;
        Ok(Shared {
            config: Arc::new(config),
            store,
            users,
            hub,
            read_budget,
            misses: Arc::default(),
            logins,
            per_addr: Arc::default(),
            uploads: Arc::default(),
            handles: Arc::default(),
            fds: Arc::new(Semaphore::new(handle_fd_budget(config_max_connections))),
            reply_allowances: Arc::default(),
        })
    }

    /// A place for one more open handle of `user`, if under the per-user limit.
    pub fn handle_slot(&self, user: &str) -> Option<Slot<String>> {
        Slot::take(
            &self.handles,
            user.to_string(),
            self.config.max_handles_per_user,
        )
    }

    /// Handles `user` has open, across connections.
    pub fn handles_held(&self, user: &str) -> usize {
        self.handles
            .lock()
            .map_or(0, |t| t.get(user).copied().unwrap_or(0))
    }

    /// The bytes of replies all of `user`'s connections may have queued, shared by them.
    pub fn reply_allowance(&self, user: &str) -> Arc<Semaphore> {
        let size = self
            .config
            .user_reply_buffer
            .max(self.config.max_frame as usize);
        let Ok(mut all) = self.reply_allowances.lock() else {
            return Arc::new(Semaphore::new(size));
        };
        // Allowances nobody uses any more go; a user has few connections.
        if all.len() > 1024 {
            all.retain(|_, a| Arc::strong_count(a) > 1);
        }
        all.entry(user.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(size)))
            .clone()
    }

    /// An upload slot for `user`, if under the per-user limit.
    pub fn upload_slot(&self, user: &str) -> Option<Slot<String>> {
        Slot::take(
            &self.uploads,
            user.to_string(),
            self.config.max_uploads_per_user,
        )
    }
}

/// Serves connections from `listener` until `shutdown` completes, then ends every session
/// (aborting unfinished uploads; committed data is already durable) and returns.
pub async fn run(listener: TcpListener, config: ServerConfig, shutdown: impl Future) -> Result<()> {
    run_with(listener, config, shutdown, || {}).await
}

/// [`run`], calling `on_ready` once the data directory is open and connections are served.
pub async fn run_with(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future,
    on_ready: impl FnOnce(),
) -> Result<()> {
    let shared = Shared::open(config)?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, data = %shared.config.data_dir.display(), "serving");
    }
    match &shared.config.tls {
        Some(id) => tracing::info!(
            fingerprint = %id.fingerprint,
            cert = %id.cert_path.display(),
            "TLS on; clients pin this certificate fingerprint"
        ),
        None => tracing::warn!("TLS off (--plaintext): traffic and passwords travel in the clear"),
    }
    on_ready();
    let accounts = tokio::spawn(crate::accounts::watch(
        shared.users.clone(),
        shared.hub.clone(),
        crate::accounts::POLL,
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let threads = SessionThreads::start(shared.config.session_threads)?;
    let mut sessions = JoinSet::new();
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(10);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => { backoff = Duration::from_millis(10); a }
                    Err(e) => {
                        // Out of file descriptors and the like: wait and retry, never exit.
                        if crate::ratelog::CONNECTIONS.allow() {
                            tracing::warn!(error = %e, "accept failed; retrying");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let addr_slot = Slot::take(&shared.per_addr, peer.ip(), shared.config.max_connections_per_addr);
                match (limit.clone().try_acquire_owned(), addr_slot) {
                    (Ok(permit), Some(slot)) => {
                        let (thread, placement) = threads.place();
                        // The connection lives on its session thread from here on, its
                        // socket registered with that thread's reactor: readiness then
                        // wakes that thread directly instead of passing through this one.
                        let stream = match stream.into_std() {
                            Ok(s) => s,
                            Err(e) => {
                                if crate::ratelog::CONNECTIONS.allow() {
                                    tracing::warn!(%peer, error = %e, "cannot hand the connection over; closing");
                                }
                                continue;
                            }
                        };
                        let shared = shared.clone();
                        let stop = stop_rx.clone();
                        sessions.spawn_on(async move {
                            match TcpStream::from_std(stream) {
                                Ok(stream) => accept(stream, peer, shared, stop).await,
                                Err(e) => tracing::warn!(%peer, error = %e, "cannot register the connection; closing"),
                            }
                            drop((permit, slot, placement));
                        }, &thread);
                    }
                    (Ok(_), None) => {
                        if crate::ratelog::REFUSALS.allow() {
                            tracing::warn!(%peer, "too many connections from this address; refusing");
                        }
                        sessions.spawn(refuse_busy(stream, peer, shared.clone(), "too many connections from your address", refusing.clone()));
                    }
                    (Err(_), _) => {
                        if crate::ratelog::REFUSALS.allow() {
                            tracing::warn!(%peer, "connection limit reached; refusing");
                        }
                        sessions.spawn(refuse_busy(stream, peer, shared.clone(), "server has too many connections", refusing.clone()));
                    }
                }
            }
        }
    }
    tracing::info!(sessions = sessions.len(), "shutting down");
    accounts.abort();
    let _ = stop_tx.send(true);
    let drain = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("sessions did not end in time; aborting them");
        sessions.shutdown().await;
    }
    // Joining the threads waits for their last disk writes (bounded); off the async threads.
    let _ = tokio::task::spawn_blocking(move || drop(threads)).await;
    Ok(())
}

/// Refusals (a TLS handshake and a `busy` frame) in progress at once; past it, refused
/// connections are just closed.
const MAX_REFUSING: usize = 64;

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Sets up the transport (TLS, or plaintext) and serves the session on it. A client of the
/// wrong kind gets told so, in words it can read where possible. The first byte, the TLS
/// handshake, hello and login all have to be done within one handshake timeout.
async fn accept(stream: TcpStream, peer: SocketAddr, shared: Shared, stop: watch::Receiver<bool>) {
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let Some(transport) = transport(stream, peer, &shared, deadline).await else {
        return;
    };
    match transport {
        Transport::Tls(tls) => session::serve(tls, peer, shared, stop, deadline).await,
        Transport::Plain(stream) => session::serve(stream, peer, shared, stop, deadline).await,
    }
}

enum Transport {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

/// The transport the client asked for, if the server speaks it; `None` (after telling the
/// client where possible) if not, or if the client took past `deadline`.
async fn transport(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    deadline: tokio::time::Instant,
) -> Option<Transport> {
    let mut first = [0u8; 1];
    let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(n)) => n,
        Ok(Err(_)) => return None,
        Err(_) => {
            if crate::ratelog::CONNECTIONS.allow() {
                tracing::info!(%peer, "nothing received before the handshake timeout; closing");
            }
            return None;
        }
    };
    if peeked == 0 {
        return None;
    }
    let looks_tls = first[0] == TLS_HANDSHAKE;
    match &shared.config.tls {
        Some(identity) => {
            if !looks_tls {
                if crate::ratelog::CONNECTIONS.allow() {
                    tracing::warn!(%peer, "plaintext client on a TLS server; refusing");
                }
                let why = "this server requires TLS: connect without --plaintext";
                refuse(
                    stream,
                    shared.config.max_frame,
                    ErrorCode::ProtocolError,
                    why,
                )
                .await;
                return None;
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(identity.config.clone());
            match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => Some(Transport::Tls(Box::new(tls))),
                Ok(Err(e)) => {
                    if crate::ratelog::CONNECTIONS.allow() {
                        tracing::warn!(%peer, error = %e, "TLS handshake failed");
                    }
                    None
                }
                Err(_) => {
                    if crate::ratelog::CONNECTIONS.allow() {
                        tracing::info!(%peer, "TLS handshake timed out; closing");
                    }
                    None
                }
            }
        }
        None => {
            if looks_tls {
                // Answering in plaintext would only confuse its TLS stack: close.
                if crate::ratelog::CONNECTIONS.allow() {
                    tracing::warn!(%peer, "TLS client on a plaintext server (--plaintext); closing");
                }
                return None;
            }
            Some(Transport::Plain(stream))
        }
    }
}

/// How long a refused client gets to take its refusal (TLS handshake included).
const REFUSAL_TIME: Duration = Duration::from_secs(2);

/// Tells a client the server is too busy for it, over TLS if that is what it speaks, and
/// closes. Refusals in progress at once are bounded (`refusing`); past that, the
/// connection is just closed.
async fn refuse_busy(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Shared,
    why: &'static str,
    refusing: Arc<Semaphore>,
) {
    let Ok(_permit) = refusing.try_acquire_owned() else {
        return;
    };
    let deadline = tokio::time::Instant::now() + REFUSAL_TIME;
    let message = format!("{why}; try again later");
    let max_frame = shared.config.max_frame;
    match transport(stream, peer, &shared, deadline).await {
        Some(Transport::Tls(tls)) => refuse(tls, max_frame, ErrorCode::Busy, &message).await,
        Some(Transport::Plain(plain)) => refuse(plain, max_frame, ErrorCode::Busy, &message).await,
        None => {}
    }
}

/// Sends one connection-level error frame on `stream` and closes it.
async fn refuse<S>(stream: S, max_frame: u32, code: ErrorCode, message: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut framed = Framed::new(stream, FrameCodec::new(max_frame));
    let msg = ServerMessage::Error {
        id: None,
        error: ErrorBody::new(code, message),
    };
    if let Ok(frame) = Frame::new(&msg, bytes::Bytes::new()) {
        let send = async {
            framed.send(frame).await?;
            framed.close().await
        };
        let _ = tokio::time::timeout(REFUSAL_TIME, send).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_run_in_place_only_while_small_reads_are_fast() {
        let misses = ReadMisses::default();
        assert!(misses.in_place(4096));
        assert!(
            !misses.in_place(1024 * 1024),
            "large reads always go to the pool"
        );
        // One hard-disk seek sends the next reads to the pool...
        misses.record(Duration::from_millis(8));
        assert!(!misses.in_place(4096));
        // ...until reads (timed on the pool) are fast again.
        for _ in 0..40 {
            misses.record(Duration::from_micros(30));
        }
        assert!(misses.in_place(4096));
    }
}
