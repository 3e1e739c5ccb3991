//! The connection to the cluster's PostgreSQL: a pool of connections, the runtime its
//! client runs on, and the schema brought up to date at open. Shared by the trees
//! ([`super::Cluster`]), the accounts ([`super::accounts`]) and the notifications
//! ([`super::notes`]); `sharefs-server user …` opens it alone, without the object store.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::error::{Result, ServerError};

use super::{pool_error, schema};

/// A cheap handle on the database; the runtime stops when the last handle goes.
#[derive(Clone)]
pub struct Db {
    pub(crate) pool: Pool,
    /// For connections of their own (the change feed's `LISTEN`).
    pub(crate) config: tokio_postgres::Config,
    /// This process among the nodes: what it announces carries it, so it can tell its own
    /// announcements from others'.
    pub(crate) node: u64,
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("host", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .finish()
    }
}

/// Where the database (and object store) clients run; always `Some` but in `drop`.
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        // Dropped from anywhere, an async context included: no waiting for its tasks.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Db {
    /// Connects to `url` (`postgres://user@host/db`; the password from the URL or
    /// `PGPASSWORD`) and applies the migrations the database lacks.
    pub fn open(url: &str) -> Result<Db> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sharefs-cluster")
            .enable_all()
            .build()?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| ServerError::Backend(format!("--metadata: {e}")))?;
        if config.get_password().is_none() {
            if let Ok(p) = std::env::var("PGPASSWORD") {
                config.password(p);
            }
        }
        config.connect_timeout(Duration::from_secs(5));
        let manager = Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| ServerError::Backend(format!("database pool: {e}")))?;
        let db = Db {
            pool,
            config,
            node: {
                use argon2::password_hash::rand_core::{OsRng, RngCore};
                OsRng.next_u64()
            },
            runtime: Arc::new(Runtime(Some(runtime))),
        };
        let pool = db.pool.clone();
        let version = db.run(async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            schema::migrate(&mut client).await
        })?;
        tracing::debug!(schema = version, "database open");
        Ok(db)
    }

    /// Runs `work` on the database's runtime and waits for it: storage calls are
    /// blocking, from any thread.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let runtime = self
            .runtime
            .0
            .as_ref()
            .ok_or_else(|| ServerError::Internal("the storage is closed".into()))?;
        let task = runtime.spawn(work);
        futures::executor::block_on(task)
            .map_err(|e| ServerError::Internal(format!("a storage task failed: {e}")))?
    }

    /// A handle on the database's runtime, if it still runs.
    pub(crate) fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.0.as_ref().map(|r| r.handle().clone())
    }

    /// Runs `work` in the background on the database's runtime.
    pub(crate) fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        if let Some(runtime) = self.runtime.0.as_ref() {
            runtime.spawn(work);
        }
    }

    /// A pooled connection.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_error)
    }
}
