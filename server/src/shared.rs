//! The state every connection shares: configuration, storage, accounts, the hub, and the
//! server-wide and per-user limits (connections per address, uploads and open handles per
//! user, descriptors, read buffers, reply allowances). Its own module so that the accept
//! loop (`server`) and the sessions (`session`) both use it without using each other.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::cluster::accounts::PgAccounts;
use crate::cluster::notes::PgNotes;
use crate::cluster::{Cluster, Db};
use crate::config::ServerConfig;
use crate::error::Result;
use crate::hub::Hub;
use crate::login::Logins;
use crate::metrics::Metrics;
use crate::storage::SharedStorage;
use crate::store::Store;
use crate::users::{UserDb, Users};

/// State shared by all connections; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shared {
    pub config: Arc<ServerConfig>,
    /// The tree and contents of every user, behind the storage interfaces.
    pub store: SharedStorage,
    pub users: Users,
    pub hub: Hub,
    /// Bounds the bytes of file data buffered for reads across the whole server, in KiB.
    pub read_budget: Arc<Semaphore>,
    /// Where reads that miss the page cache run.
    pub misses: Arc<ReadMisses>,
    /// Login throttling, password checks and their log.
    pub logins: Arc<Logins>,
    /// What the server counts, scraped through `--metrics`.
    pub metrics: Arc<Metrics>,
    /// Live connections per peer address.
    pub(crate) per_addr: Arc<Mutex<HashMap<IpAddr, usize>>>,
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
    pub(crate) fn take(
        table: &Arc<Mutex<HashMap<K, usize>>>,
        key: K,
        max: usize,
    ) -> Option<Slot<K>> {
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
        let (store, users, hub): (SharedStorage, Users, Hub) = match &config.cluster {
            Some(cluster) => {
                // Trees, accounts and notifications in the database, shared by the nodes.
                let db = Db::open(&cluster.metadata)?;
                let store = Cluster::open(db.clone(), cluster)?;
                let hub = Hub::new(Arc::new(PgNotes::new(
                    db.clone(),
                    config.coalesce_window,
                    config.max_pending_notifications,
                )));
                let local = hub.clone();
                store.deliver_notes(Arc::new(move |n| local.deliver(n)));
                (Arc::new(store), Arc::new(PgAccounts::new(db)), hub)
            }
            None => (
                Arc::new(Store::open(&config.data_dir, config.disk_reserve)?),
                Arc::new(UserDb::new(&config.data_dir)),
                Hub::open(
                    &config.data_dir,
                    config.coalesce_window,
                    config.max_pending_notifications,
                )?,
            ),
        };
        let remote_hub = hub.clone();
        store.watch(Arc::new(move |owner: &str, events| {
            // Changes made through other nodes: to every session here that may see them.
            remote_hub.publish(owner, 0, &events)
        }));
        let read_budget = Arc::new(Semaphore::new((config.read_buffer_budget / 1024).max(1)));
        let logins = Arc::new(Logins::new(config.login.clone()));
        let config_max_connections = config.max_connections;
        let metrics = Arc::new(Metrics::new(hub.counters()));
        Ok(Shared {
            config: Arc::new(config),
            store,
            users,
            hub,
            read_budget,
            misses: Arc::default(),
            logins,
            metrics,
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

    /// Uploads in progress, all users together.
    pub fn uploads_in_progress(&self) -> usize {
        self.uploads.lock().map_or(0, |t| t.values().sum())
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
