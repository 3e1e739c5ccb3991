//! Server settings, with the defaults `sharefs-server serve` uses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sharefs_protocol::DEFAULT_MAX_FRAME;

use crate::throttle::LoginPolicy;
use crate::tls::TlsIdentity;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Largest frame accepted; a larger one closes the connection.
    pub max_frame: u32,
    /// TLS identity; `None` serves plaintext (`--plaintext`).
    pub tls: Option<TlsIdentity>,
    /// Connections served at once; more are refused with `busy`.
    pub max_connections: usize,
    /// Connections served at once from one IP address.
    pub max_connections_per_addr: usize,
    /// A logged-in connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Uploads one user may have in progress at once, across all connections.
    pub max_uploads_per_user: usize,
    /// An upload that receives no chunk for this long is dropped (its temp file, disk
    /// claim and quota reservation with it); its commit then fails.
    pub upload_idle_timeout: Duration,
    /// Pending notifications kept per user; older ones are folded into one digest.
    pub max_pending_notifications: usize,
    /// Login throttling.
    pub login: LoginPolicy,
    /// Unknown user names logging in create their account (trusted LANs only).
    pub open_registration: bool,
    /// Requests a connection may have in flight; more wait (TCP back-pressure).
    pub max_in_flight: usize,
    /// Time a new connection has to finish handshake and login.
    pub handshake_timeout: Duration,
    /// Repeated downloads of one file by one user within this window are one notification.
    pub coalesce_window: Duration,
    /// Bytes of read data the whole server buffers at once, across all connections.
    pub read_buffer_budget: usize,
    /// Free disk space uploads leave untouched.
    pub disk_reserve: u64,
    /// Threads connections are spread over (each connection stays on one); 0: one per core.
    pub session_threads: usize,
    /// Bytes of replies queued for one connection; past it, its requests are not read.
    pub reply_buffer: usize,
    /// Bytes of replies queued for all of one user's connections together.
    pub user_reply_buffer: usize,
    /// A connection whose peer takes no byte of its replies for this long is closed.
    pub reply_timeout: Duration,
    /// Files one connection may have open at once.
    pub max_handles_per_connection: usize,
    /// Files one user may have open at once, across connections.
    pub max_handles_per_user: usize,
    /// Where Prometheus metrics are served over HTTP (`GET /metrics`); `None`: nowhere.
    pub metrics: Option<SocketAddr>,
    /// Trees and contents in PostgreSQL and an object store (a cluster node); `None`: the
    /// embedded store under `data_dir`.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            data_dir: data_dir.into(),
            max_frame: DEFAULT_MAX_FRAME,
            tls: None,
            max_connections: 1024,
            max_connections_per_addr: 64,
            idle_timeout: Duration::from_secs(15 * 60),
            max_uploads_per_user: 16,
            upload_idle_timeout: Duration::from_secs(120),
            max_pending_notifications: 256,
            login: LoginPolicy::default(),
            open_registration: false,
            max_in_flight: 64,
            handshake_timeout: Duration::from_secs(10),
            coalesce_window: Duration::from_secs(5),
            read_buffer_budget: 32 * 1024 * 1024,
            disk_reserve: 64 * 1024 * 1024,
            session_threads: 0,
            reply_buffer: 8 * 1024 * 1024,
            user_reply_buffer: 32 * 1024 * 1024,
            reply_timeout: Duration::from_secs(20),
            max_handles_per_connection: 1024,
            max_handles_per_user: 4096,
            metrics: None,
            cluster: None,
        }
    }
}
