//! The accept loop: a connection limit, accept errors retried with backoff, and graceful
//! shutdown that stops accepting, tells every session to end and waits for them.

use std::future::Future;
use std::sync::Arc;
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
use crate::session;
use crate::store::Store;
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
}

impl Shared {
    pub fn open(config: ServerConfig) -> Result<Shared> {
        let store = Store::open(&config.data_dir, config.disk_reserve)?;
        let hub = Hub::open(&config.data_dir, config.coalesce_window)?;
        let users = UserDb::new(&config.data_dir);
        let read_budget = Arc::new(Semaphore::new((config.read_buffer_budget / 1024).max(1)));
        Ok(Shared {
            config: Arc::new(config),
            store,
            users,
            hub,
            read_budget,
        })
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
    on_ready();
    let (stop_tx, stop_rx) = watch::channel(false);
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
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
                match limit.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let shared = shared.clone();
                        let stop = stop_rx.clone();
                        sessions.spawn(async move {
                            session::serve(stream, peer, shared, stop).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "connection limit reached; refusing");
                        sessions.spawn(refuse_busy(stream, shared.config.max_frame));
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
    Ok(())
}

async fn refuse_busy(stream: TcpStream, max_frame: u32) {
    let mut framed = Framed::new(stream, FrameCodec::new(max_frame));
    let msg = ServerMessage::Error {
        id: None,
        error: ErrorBody::new(
            ErrorCode::Busy,
            "server has too many connections; try again later",
        ),
    };
    if let Ok(frame) = Frame::new(&msg, bytes::Bytes::new()) {
        let _ = tokio::time::timeout(Duration::from_secs(2), framed.send(frame)).await;
    }
}
