//! What the server counts, in Prometheus types: events are counted where they happen
//! (connections, logins, requests, bytes on the wire), while levels that the server
//! already keeps (connections open, uploads in progress, pending notifications, what each
//! user stores) are read when scraped rather than kept twice. The HTTP side is
//! [`endpoint`]; byte counting on the sockets is [`counted`].

pub mod counted;
pub mod endpoint;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use sharefs_protocol::Request;

use crate::shared::Shared;

/// How a login ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    Ok,
    /// Wrong password, unknown user, invalid name or password.
    Failed,
    /// Refused by the throttle without checking the password.
    Throttled,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UserLabel {
    user: String,
}

type Histograms = Family<OpLabel, Histogram, fn() -> Histogram>;

/// The server's metrics and their registry; one per server, shared through [`Shared`].
pub struct Metrics {
    registry: Registry,
    connections_accepted: Counter,
    connections_refused: Counter,
    connections_open: Gauge,
    logins: Family<OutcomeLabel, Counter>,
    request_seconds: Histograms,
    request_errors: Family<OpLabel, Counter>,
    pub(crate) bytes_in: Counter<u64, AtomicU64>,
    pub(crate) bytes_out: Counter<u64, AtomicU64>,
    uploads_in_progress: Gauge,
    notifications_pending: Gauge,
    user_stored: Family<UserLabel, Gauge>,
    user_files: Family<UserLabel, Gauge>,
    user_quota: Family<UserLabel, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Request latency buckets: 100 µs to about 52 s, doubling.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

impl Metrics {
    /// Registers every metric; `notifications` are the hub's own counters of download
    /// notifications recorded and delivered (acknowledged).
    pub fn new(notifications: (Counter, Counter)) -> Metrics {
        let mut registry = Registry::with_prefix("sharefs");
        let metrics = Metrics {
            connections_accepted: Counter::default(),
            connections_refused: Counter::default(),
            connections_open: Gauge::default(),
            logins: Family::default(),
            request_seconds: Family::new_with_constructor(request_histogram),
            request_errors: Family::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            uploads_in_progress: Gauge::default(),
            notifications_pending: Gauge::default(),
            user_stored: Family::default(),
            user_files: Family::default(),
            user_quota: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections_accepted",
            "Connections accepted and served",
            metrics.connections_accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused for a connection limit",
            metrics.connections_refused.clone(),
        );
        r.register(
            "connections_open",
            "Connections being served",
            metrics.connections_open.clone(),
        );
        r.register(
            "logins",
            "Login attempts by outcome (ok, failed, throttled)",
            metrics.logins.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time from a request's arrival to its reply being queued, per operation",
            Unit::Seconds,
            metrics.request_seconds.clone(),
        );
        r.register(
            "request_errors",
            "Requests answered with an error, per operation",
            metrics.request_errors.clone(),
        );
        r.register_with_unit(
            "received",
            "Bytes received from clients (TLS included)",
            Unit::Bytes,
            metrics.bytes_in.clone(),
        );
        r.register_with_unit(
            "sent",
            "Bytes sent to clients (TLS included)",
            Unit::Bytes,
            metrics.bytes_out.clone(),
        );
        r.register(
            "uploads_in_progress",
            "Uploads begun and not yet committed or aborted",
            metrics.uploads_in_progress.clone(),
        );
        r.register(
            "notifications_recorded",
            "Download notifications recorded for file owners",
            notifications.0,
        );
        r.register(
            "notifications_delivered",
            "Download notifications acknowledged by their owner's client",
            notifications.1,
        );
        r.register(
            "notifications_pending",
            "Download notifications not yet acknowledged",
            metrics.notifications_pending.clone(),
        );
        r.register_with_unit(
            "user_stored",
            "Bytes of file contents each user stores",
            Unit::Bytes,
            metrics.user_stored.clone(),
        );
        r.register(
            "user_entries",
            "Files, directories and symbolic links in each user's tree",
            metrics.user_files.clone(),
        );
        r.register_with_unit(
            "user_quota",
            "Each user's quota, for users who have one",
            Unit::Bytes,
            metrics.user_quota.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    pub fn connection_accepted(&self) -> OpenConnection {
        self.connections_accepted.inc();
        self.connections_open.inc();
        OpenConnection(self.connections_open.clone())
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    pub fn login(&self, outcome: LoginOutcome) {
        let outcome = match outcome {
            LoginOutcome::Ok => "ok",
            LoginOutcome::Failed => "failed",
            LoginOutcome::Throttled => "throttled",
        };
        self.logins.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Counts a request of `op` that took `took`, and whether it failed.
    pub fn request(&self, op: &'static str, took: Duration, failed: bool) {
        let label = OpLabel { op };
        self.request_seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if failed {
            self.request_errors.get_or_create(&label).inc();
        }
    }

    /// The metrics in the Prometheus text format, levels read from `shared` first.
    /// Blocking: reads users, notification folders and trees.
    pub fn scrape(&self, shared: &Shared) -> String {
        self.refresh(shared);
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }

    fn refresh(&self, shared: &Shared) {
        self.uploads_in_progress
            .set(i64::try_from(shared.uploads_in_progress()).unwrap_or(i64::MAX));
        let users = match shared.users.list() {
            Ok(users) => users,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the users");
                return;
            }
        };
        // Users removed since the last scrape go.
        self.user_stored.clear();
        self.user_files.clear();
        self.user_quota.clear();
        let mut pending = 0usize;
        for (user, record) in users {
            pending += shared.hub.pending(&user).map_or(0, |p| p.len());
            let label = UserLabel { user: user.clone() };
            if let Some(q) = record.quota {
                self.user_quota
                    .get_or_create(&label)
                    .set(i64::try_from(q).unwrap_or(i64::MAX));
            }
            // A user who never connected has no folder: a scrape must not create one (a
            // cluster's read of a tree never writes).
            if shared.config.cluster.is_none()
                && !shared.config.data_dir.join("files").join(&user).is_dir()
            {
                continue;
            }
            if let Ok(space) = shared.store.usage(&user, record.quota) {
                let set = |f: &Family<UserLabel, Gauge>, v: u64| {
                    f.get_or_create(&label)
                        .set(i64::try_from(v).unwrap_or(i64::MAX));
                };
                set(&self.user_stored, space.used);
                set(&self.user_files, space.files);
            }
        }
        self.notifications_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }
}

/// A served connection, counted as open until dropped.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The name of a request's operation, as the protocol spells it; a new operation must be
/// named here to be counted.
pub fn op_name(op: &Request) -> &'static str {
    match op {
        Request::ListUsers => "list_users",
        Request::List { .. } => "list",
        Request::Lookup { .. } => "lookup",
        Request::Stat { .. } => "stat",
        Request::Resolve { .. } => "resolve",
        Request::Open { .. } => "open",
        Request::Read { .. } => "read",
        Request::Close { .. } => "close",
        Request::UploadBegin { .. } => "upload_begin",
        Request::UploadCommit { .. } => "upload_commit",
        Request::UploadAbort { .. } => "upload_abort",
        Request::UploadSync { .. } => "upload_sync",
        Request::UploadResume { .. } => "upload_resume",
        Request::UploadRead { .. } => "upload_read",
        Request::ContentHash { .. } => "content_hash",
        Request::Put { .. } => "put",
        Request::Mkdir { .. } => "mkdir",
        Request::Symlink { .. } => "symlink",
        Request::Remove { .. } => "remove",
        Request::Rename { .. } => "rename",
        Request::SetAttr { .. } => "set_attr",
        Request::Ack { .. } => "ack",
        Request::Notifications { .. } => "notifications",
        Request::StatFs => "stat_fs",
        Request::Ping => "ping",
        Request::Sync => "sync",
    }
}

/// Metrics shared by every connection.
pub type SharedMetrics = Arc<Metrics>;
