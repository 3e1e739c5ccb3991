//! The accept loop: a connection limit, accept errors retried with backoff, and graceful
//! shutdown that stops accepting, tells every session to end and waits for them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use sharefs_protocol::{ErrorBody, ErrorCode, Frame, FrameCodec, ServerMessage};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::Framed;

use crate::config::ServerConfig;
use crate::error::Result;
use crate::metrics::counted::Counted;
use crate::session;
pub use crate::shared::raise_fd_limit;
use crate::shared::{Shared, Slot};
use crate::threads::SessionThreads;

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
    run_controlled(listener, config, shutdown, Arc::default(), on_ready).await
}

/// [`run_with`], re-reading the accounts at once (and logging it) each time `reload` is
/// notified, as the binary does on SIGHUP.
pub async fn run_controlled(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future,
    reload: Arc<Notify>,
    on_ready: impl FnOnce(),
) -> Result<()> {
    let shared = Shared::open(config)?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, data = %shared.config.data_dir.display(), "serving");
    }
    let metrics_listener = match shared.config.metrics {
        Some(addr) => {
            let l = TcpListener::bind(addr).await?;
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "serving metrics on http://{addr}/metrics");
            }
            Some(l)
        }
        None => None,
    };
    match &shared.config.tls {
        Some(id) => tracing::info!(
            fingerprint = %id.fingerprint,
            cert = %id.cert_path.display(),
            "TLS on; clients pin this certificate fingerprint"
        ),
        None => tracing::warn!("TLS off (--plaintext): traffic and passwords travel in the clear"),
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = metrics_listener.map(|l| {
        tokio::spawn(crate::metrics::endpoint::serve(
            l,
            shared.clone(),
            stop_rx.clone(),
        ))
    });
    on_ready();
    let accounts = tokio::spawn(crate::accounts::watch(
        shared.users.clone(),
        shared.hub.clone(),
        crate::accounts::POLL,
        reload,
    ));
    let expiry = tokio::spawn(expire_uploads(shared.clone()));
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
                        let open = shared.metrics.connection_accepted();
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
                            drop((permit, slot, placement, open));
                        }, &thread);
                    }
                    (Ok(_), None) => {
                        shared.metrics.connection_refused();
                        if crate::ratelog::REFUSALS.allow() {
                            tracing::warn!(%peer, "too many connections from this address; refusing");
                        }
                        sessions.spawn(refuse_busy(stream, peer, shared.clone(), "too many connections from your address", refusing.clone()));
                    }
                    (Err(_), _) => {
                        shared.metrics.connection_refused();
                        if crate::ratelog::LIMIT.allow() {
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
    expiry.abort();
    if let Some(m) = metrics {
        m.abort();
    }
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
    Tls(Box<tokio_rustls::server::TlsStream<Counted<TcpStream>>>),
    Plain(Counted<TcpStream>),
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
    let stream = Counted::new(stream, &shared.metrics);
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

/// Drops, every so often, the uploads no session resumed within the upload idle bound.
async fn expire_uploads(shared: Shared) {
    let bound = shared.config.upload_idle_timeout;
    let period = (bound / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = shared.store.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || store.expire_uploads(bound)).await {
            tracing::error!(error = %e, "upload expiry task failed");
        }
    }
}
