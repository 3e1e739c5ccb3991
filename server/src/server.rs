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
        let hub = Hub::open(&config.data_dir, config.coalesce_window)?;
        let users = UserDb::new(&config.data_dir);
        let read_budget = Arc::new(Semaphore::new((config.read_buffer_budget / 1024).max(1)));
        let logins = Arc::new(Logins::new(config.login.clone()));
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
        })
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
    let (stop_tx, stop_rx) = watch::channel(false);
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
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
                        tracing::warn!(error = %e, "accept failed; retrying");
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
                                tracing::warn!(%peer, error = %e, "cannot hand the connection over; closing");
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
                        tracing::warn!(%peer, "too many connections from this address; refusing");
                        sessions.spawn(refuse_busy(stream, shared.config.max_frame, "too many connections from your address"));
                    }
                    (Err(_), _) => {
                        tracing::warn!(%peer, "connection limit reached; refusing");
                        sessions.spawn(refuse_busy(stream, shared.config.max_frame, "server has too many connections"));
                    }
                }
            }
        }
    }
    tracing::info!(sessions = sessions.len(), "shutting down");
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

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Sets up the transport (TLS, or plaintext) and serves the session on it. A client of the
/// wrong kind gets told so, in words it can read where possible.
async fn accept(stream: TcpStream, peer: SocketAddr, shared: Shared, stop: watch::Receiver<bool>) {
    let timeout = shared.config.handshake_timeout;
    let mut first = [0u8; 1];
    let peeked = match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(n)) => n,
        Ok(Err(_)) => return,
        Err(_) => {
            tracing::info!(%peer, "nothing received before the handshake timeout; closing");
            return;
        }
    };
    if peeked == 0 {
        return;
    }
    let looks_tls = first[0] == TLS_HANDSHAKE;
    match &shared.config.tls {
        Some(identity) => {
            if !looks_tls {
                tracing::warn!(%peer, "plaintext client on a TLS server; refusing");
                let why = "this server requires TLS: connect without --plaintext";
                refuse(
                    stream,
                    shared.config.max_frame,
                    ErrorCode::ProtocolError,
                    why,
                )
                .await;
                return;
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(identity.config.clone());
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => session::serve(tls, peer, shared, stop).await,
                Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "TLS handshake timed out; closing"),
            }
        }
        None => {
            if looks_tls {
                // Answering in plaintext would only confuse its TLS stack: close.
                tracing::warn!(%peer, "TLS client on a plaintext server (--plaintext); closing");
                return;
            }
            session::serve(stream, peer, shared, stop).await
        }
    }
}

async fn refuse_busy(stream: TcpStream, max_frame: u32, why: &str) {
    let message = format!("{why}; try again later");
    refuse(stream, max_frame, ErrorCode::Busy, &message).await
}

/// Sends one connection-level error frame in plaintext and closes.
async fn refuse(stream: TcpStream, max_frame: u32, code: ErrorCode, message: &str) {
    let mut framed = Framed::new(stream, FrameCodec::new(max_frame));
    let msg = ServerMessage::Error {
        id: None,
        error: ErrorBody::new(code, message),
    };
    if let Ok(frame) = Frame::new(&msg, bytes::Bytes::new()) {
        let _ = tokio::time::timeout(Duration::from_secs(2), framed.send(frame)).await;
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
