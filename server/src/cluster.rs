//! The scale-out storage: user trees in PostgreSQL, contents in an S3-compatible object
//! store, so that several server nodes sharing the two serve the same users. A node keeps
//! no state of its own beyond caches: each tree it serves is cached in memory (the same
//! [`Tree`] the embedded store keeps), brought up to date from the database before every
//! answer, and changed only inside a database transaction that locks the tree's row.
//!
//! - Reads ask the database for the tree's sequence number (one indexed row) and, if the
//!   cache is behind, apply the changes it missed from `sharefs_changes` (or reload the
//!   tree when those were trimmed); then they answer from the cache with the checks the
//!   embedded store makes ([`crate::store::access`]).
//! - A change locks the tree's row (`SELECT … FOR UPDATE`), catches up, plans its ops on
//!   the cache with the embedded store's checks (`Tree::plan_*`), writes them as row
//!   upserts and deletes plus one `sharefs_changes` record, bumps the sequence and
//!   commits; only then is the cache changed. Changes to one tree are serialised across
//!   nodes by the row lock; different trees never wait on each other.
//! - Contents ([`objects`]) are written before the transaction that names them; a
//!   replaced or removed content is recorded in `sharefs_doomed` by that transaction and
//!   deleted after [`DOOMED_GRACE`]; blocks that no row names (a node died between the
//!   two) are collected once older than [`ORPHAN_AGE`].
//! - Uploads ([`uploads`]) are durable block by block and recorded in `sharefs_uploads`,
//!   so another node can resume one whose node died.
//!
//! # Layout
//! - [`schema`]: the tables, and the migrations that make them.
//! - [`rows`]: entries as rows, ops as statements.
//! - [`objects`]: contents as block objects.
//! - [`readahead`]: blocks fetched ahead of sequential readers.
//! - [`uploads`]: uploads, commits, reads (the [`BlobStore`] side).
//! - [`feed`]: changes and notifications made through other nodes, pushed to this node's
//!   sessions.
//! - [`db`]: the database connection pool, its runtime, the schema at open.
//! - [`accounts`]: the accounts, shared by the nodes.
//! - [`notes`]: download notifications, shared by the nodes.

pub mod accounts;
pub mod db;
pub mod feed;
pub mod notes;
pub mod objects;
pub mod readahead;
pub mod rows;
pub mod schema;
pub mod uploads;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sharefs_protocol::{FileInfo, Space};
use tokio::sync::Mutex as AsyncMutex;

use crate::cutoff::Cutoff;
use crate::error::{Result, ServerError};
use crate::fsutil;
use crate::storage::MetaStore;
use crate::store::tree::{Node, Op, Tree};
use crate::store::{access, changes, events, Caller, Published};
pub use db::Db;
use objects::Objects;

/// How long a content nothing names any more stays readable for handles opened before.
pub const DOOMED_GRACE: Duration = Duration::from_secs(600);
/// Blocks no row names are deleted once this old (seconds): older than any upload or
/// commit in progress can be.
pub const ORPHAN_AGE: u64 = 24 * 3600;
/// The room an object store is said to have, without a quota.
const UNBOUNDED: u64 = 1 << 50;
/// How often a node looks for blocks no row names.
pub const ORPHAN_SCAN_EVERY: Duration = Duration::from_secs(3600);
/// Changes kept per tree for nodes catching up; one further behind reloads the tree.
pub(crate) const CHANGES_KEPT: i64 = 4096;

/// Where a cluster's metadata and contents live.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `postgres://user@host/db` (a password from `PGPASSWORD` or the URL).
    pub metadata: String,
    /// The bucket, from `s3://bucket`.
    pub bucket: String,
    /// The S3 endpoint (`http://host:port`); AWS's when absent.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// The bytes fetched ahead of sequential readers, all readers together.
    pub read_ahead: u64,
}

/// One user's tree as this node last saw it.
#[derive(Debug)]
pub(crate) struct Cached {
    tree: Tree,
    /// The sequence number of the last change applied; -1: not loaded.
    seq: i64,
}

type Folder = Arc<AsyncMutex<Cached>>;

pub(crate) struct Inner {
    pub(crate) db: Db,
    pub(crate) objects: Objects,
    /// The node's budget for blocks fetched ahead of readers.
    pub(crate) read_ahead: readahead::Budget,
    folders: Mutex<HashMap<String, Folder>>,
    /// Where the events of other nodes' changes go.
    sink: Mutex<Option<feed::Sink>>,
    /// Where notifications recorded by other nodes go.
    note_sink: Mutex<Option<feed::NoteSink>>,
    /// When this node last looked for blocks no row names.
    orphans_scanned: Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("db", &self.db)
            .field("objects", &self.objects)
            .finish()
    }
}

/// The cluster storage: both storage traits over PostgreSQL and an object store.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub(crate) inner: Arc<Inner>,
}

/// A database error, as the storage reports it.
pub fn pg_error(e: tokio_postgres::Error) -> ServerError {
    ServerError::Backend(format!("database: {e}"))
}

pub(crate) fn pool_error(e: deadpool_postgres::PoolError) -> ServerError {
    ServerError::Backend(format!("database: {e}"))
}

impl Cluster {
    /// Opens the trees in `db` and the contents in the bucket `config` names, and checks
    /// the bucket.
    pub fn open(db: Db, config: &ClusterConfig) -> Result<Cluster> {
        let mut s3 = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region);
        if let Some(endpoint) = &config.endpoint {
            s3 = s3
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let (Some(k), Some(s)) = (&config.access_key, &config.secret_key) {
            s3 = s3.with_access_key_id(k).with_secret_access_key(s);
        }
        let s3 = s3
            .build()
            .map_err(|e| ServerError::Backend(format!("object store: {e}")))?;
        let inner = Arc::new(Inner {
            db,
            objects: Objects::new(Arc::new(s3)),
            read_ahead: readahead::Budget::new(config.read_ahead),
            folders: Mutex::default(),
            sink: Mutex::default(),
            note_sink: Mutex::default(),
            orphans_scanned: Mutex::default(),
        });
        let cluster = Cluster { inner };
        let objects = cluster.inner.objects.clone();
        cluster.run(async move { objects.contents().await.map(|_| ()) })?;
        tracing::info!("cluster storage open");
        Ok(cluster)
    }

    /// Runs `work` on the database's runtime and waits for it: storage calls are
    /// blocking, from any thread.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        self.inner.db.run(work)
    }

    fn folder(&self, owner: &str) -> Result<Folder> {
        sharefs_protocol::name::check_user_name(owner).map_err(ServerError::InvalidName)?;
        let mut folders = self
            .inner
            .folders
            .lock()
            .map_err(|_| ServerError::Internal("the folder table lock was poisoned".into()))?;
        Ok(folders
            .entry(owner.to_string())
            .or_insert_with(|| {
                Arc::new(AsyncMutex::new(Cached {
                    tree: Tree::empty(0),
                    seq: -1,
                }))
            })
            .clone())
    }

    /// Runs `read` on `owner`'s tree, brought up to date first.
    fn read<T: Send + 'static>(
        &self,
        owner: &str,
        read: impl FnOnce(&Tree) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let folder = self.folder(owner)?;
        let pool = self.inner.db.pool.clone();
        let owner = owner.to_string();
        let this = self.clone();
        self.run(async move {
            let mut cached = folder.lock().await;
            let client = pool.get().await.map_err(pool_error)?;
            match folder_seq(&client, &owner).await? {
                Some(seq) => {
                    let remote = catch_up(&client, &owner, &mut cached, seq).await?;
                    this.announce(&owner, remote);
                }
                // Nobody wrote to it yet: a root alone.
                None => {
                    if cached.seq != 0 {
                        cached.tree = Tree::empty(fsutil::now_ns());
                        cached.seq = 0;
                    }
                }
            }
            read(&cached.tree)
        })
    }

    /// Plans a change of `owner`'s tree with `plan` (on the up-to-date tree, under the
    /// tree's row lock) and commits it; returns what `plan` returned and the events.
    pub(crate) fn change<T: Send + 'static>(
        &self,
        owner: &str,
        cutoff: &Cutoff,
        plan: impl FnOnce(&mut Tree) -> Result<(Vec<Op>, T)> + Send + 'static,
    ) -> Result<(T, Vec<Published>)> {
        self.change_ending(owner, cutoff, plan, None)
    }

    /// [`Cluster::change`], ending the upload `upload` in the same transaction. The
    /// contents the change drops (removed or replaced files) are doomed in it too.
    pub(crate) fn change_ending<T: Send + 'static>(
        &self,
        owner: &str,
        cutoff: &Cutoff,
        plan: impl FnOnce(&mut Tree) -> Result<(Vec<Op>, T)> + Send + 'static,
        upload: Option<u64>,
    ) -> Result<(T, Vec<Published>)> {
        let folder = self.folder(owner)?;
        let pool = self.inner.db.pool.clone();
        let owner = owner.to_string();
        let cutoff = cutoff.clone();
        let this = self.clone();
        self.run(async move {
            let mut cached = folder.lock().await;
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg_error)?;
            let row = tx
                .query_opt(
                    "SELECT seq, next_id FROM sharefs_folders WHERE owner = $1 FOR UPDATE",
                    &[&owner],
                )
                .await
                .map_err(pg_error)?;
            let (seq, next_id) = match row {
                Some(row) => (row.get::<_, i64>(0), row.get::<_, i64>(1)),
                None => {
                    // The tree's first change: its row and its root, made now (a node
                    // racing to do the same waits on the row, then finds it).
                    let root = Tree::empty(fsutil::now_ns());
                    let nodes: Vec<Op> = root.nodes().cloned().map(Op::Put).collect();
                    let made = tx
                        .execute(
                            "INSERT INTO sharefs_folders (owner, seq, next_id) VALUES ($1, 0, $2)
                             ON CONFLICT (owner) DO NOTHING",
                            &[&owner, &rows::big(root.next_id())],
                        )
                        .await
                        .map_err(pg_error)?;
                    if made == 1 {
                        rows::apply(&tx, &owner, &nodes).await?;
                    }
                    let row = tx
                        .query_one(
                            "SELECT seq, next_id FROM sharefs_folders WHERE owner = $1 FOR UPDATE",
                            &[&owner],
                        )
                        .await
                        .map_err(pg_error)?;
                    (row.get::<_, i64>(0), row.get::<_, i64>(1))
                }
            };
            let remote = catch_up(&tx, &owner, &mut cached, seq).await?;
            this.announce(&owner, remote);
            cached.tree.raise_next_id(rows::unbig(next_id));
            cutoff.check()?;
            let (ops, out) = plan(&mut cached.tree)?;
            if ops.is_empty() {
                return Ok((out, Vec::new()));
            }
            rows::apply(&tx, &owner, &ops).await?;
            for (object, size) in dropped_contents(&cached.tree, &ops) {
                tx.execute(
                    "INSERT INTO sharefs_doomed (object, size) VALUES ($1, $2)
                     ON CONFLICT (object) DO NOTHING",
                    &[&rows::big(object), &rows::big(size)],
                )
                .await
                .map_err(pg_error)?;
            }
            if let Some(upload) = upload {
                tx.execute(
                    "DELETE FROM sharefs_uploads WHERE id = $1",
                    &[&rows::big(upload)],
                )
                .await
                .map_err(pg_error)?;
            }
            let json = serde_json::to_string(&ops)
                .map_err(|e| ServerError::Internal(format!("a change as JSON: {e}")))?;
            let next = seq + 1;
            tx.execute(
                "INSERT INTO sharefs_changes (owner, seq, ops) VALUES ($1, $2, $3)",
                &[&owner, &next, &json],
            )
            .await
            .map_err(pg_error)?;
            tx.execute(
                "UPDATE sharefs_folders SET seq = $2, next_id = $3 WHERE owner = $1",
                &[&owner, &next, &rows::big(cached.tree.next_id())],
            )
            .await
            .map_err(pg_error)?;
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&feed::CHANNEL, &format!("{next} {owner}")],
            )
            .await
            .map_err(pg_error)?;
            if next % 256 == 0 {
                tx.execute(
                    "DELETE FROM sharefs_changes WHERE owner = $1 AND seq <= $2",
                    &[&owner, &(next - CHANGES_KEPT)],
                )
                .await
                .map_err(pg_error)?;
            }
            if let Err(e) = tx.commit().await {
                // Whether it committed is unknown: the next use reloads the tree.
                cached.seq = -1;
                return Err(pg_error(e));
            }
            let before = events::before(&cached.tree, &ops);
            for op in ops.iter().cloned() {
                cached.tree.apply(op);
            }
            cached.seq = next;
            Ok((out, events::of(&cached.tree, &owner, ops, before)))
        })
    }
}

/// The sequence number of `owner`'s last change; `None` before its first.
pub(crate) async fn folder_seq(
    client: &impl deadpool_postgres::GenericClient,
    owner: &str,
) -> Result<Option<i64>> {
    let row = client
        .query_opt(
            "SELECT seq FROM sharefs_folders WHERE owner = $1",
            &[&owner],
        )
        .await
        .map_err(pg_error)?;
    Ok(row.map(|r| r.get::<_, i64>(0)))
}

/// The contents (object, size) that `ops` leave no entry naming: of removed files and
/// of files given a new content.
fn dropped_contents(tree: &Tree, ops: &[Op]) -> Vec<(u64, u64)> {
    ops.iter()
        .filter_map(|op| {
            let id = match op {
                Op::Put(n) => n.id,
                Op::Remove { id } => *id,
            };
            let prior = tree.get(id)?;
            let object = rows::object_of(prior)?;
            match op {
                Op::Put(n) if rows::object_of(n) == Some(object) => None,
                _ => Some((object, prior.size)),
            }
        })
        .collect()
}

/// Brings `cached` up to sequence number `seq`: the changes it missed, or the whole tree.
/// Returns the events of what it applied (`Resync` for a tree reloaded whole), for the
/// sessions of this node; none for a first load.
pub(crate) async fn catch_up(
    client: &impl deadpool_postgres::GenericClient,
    owner: &str,
    cached: &mut Cached,
    seq: i64,
) -> Result<Vec<Published>> {
    if cached.seq == seq {
        return Ok(Vec::new());
    }
    if cached.seq >= 0 && cached.seq < seq && seq - cached.seq <= CHANGES_KEPT / 2 {
        let rows = client
            .query(
                "SELECT seq, ops FROM sharefs_changes WHERE owner = $1 AND seq > $2 AND seq <= $3
                 ORDER BY seq",
                &[&owner, &cached.seq, &seq],
            )
            .await
            .map_err(pg_error)?;
        if rows.len() as i64 == seq - cached.seq {
            let mut out = Vec::new();
            for row in rows {
                let json: String = row.get(1);
                let ops: Vec<Op> = serde_json::from_str(&json)
                    .map_err(|e| ServerError::Backend(format!("a change record: {e}")))?;
                let before = events::before(&cached.tree, &ops);
                for op in ops.iter().cloned() {
                    cached.tree.apply(op);
                }
                out.extend(events::of(&cached.tree, owner, ops, before));
            }
            cached.seq = seq;
            return Ok(out);
        }
    }
    let nodes: Vec<Node> = rows::load(client, owner).await?;
    let row = client
        .query_one(
            "SELECT next_id FROM sharefs_folders WHERE owner = $1",
            &[&owner],
        )
        .await
        .map_err(pg_error)?;
    let mut tree = Tree::from_nodes(nodes, rows::unbig(row.get::<_, i64>(0)));
    tree.finish_load(fsutil::now_ns());
    let reloaded = cached.seq >= 0;
    cached.tree = tree;
    cached.seq = seq;
    Ok(if reloaded {
        vec![feed::resync()]
    } else {
        Vec::new()
    })
}

fn owned(owner: &str) -> String {
    owner.to_string()
}

impl MetaStore for Cluster {
    fn stat(&self, owner: &str, id: u64, caller: Caller) -> Result<FileInfo> {
        let o = owned(owner);
        self.read(owner, move |t| access::stat(t, &o, id, caller))
    }
    fn lookup(&self, owner: &str, parent: u64, name: &str, caller: Caller) -> Result<FileInfo> {
        let (o, name) = (owned(owner), name.to_string());
        self.read(owner, move |t| access::lookup(t, &o, parent, &name, caller))
    }
    fn resolve(&self, owner: &str, path: &str, caller: Caller) -> Result<FileInfo> {
        let (o, path) = (owned(owner), path.to_string());
        self.read(owner, move |t| access::resolve(t, &o, &path, caller))
    }
    fn list_page(
        &self,
        owner: &str,
        dir: u64,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
        caller: Caller,
    ) -> Result<(Vec<FileInfo>, bool)> {
        let (o, after) = (owned(owner), after.map(str::to_string));
        self.read(owner, move |t| {
            access::list_page(t, &o, dir, after.as_deref(), limit, max_bytes, caller)
        })
    }
    fn path_of(&self, owner: &str, id: u64) -> Result<String> {
        self.read(owner, move |t| Ok(t.path_of(id)))
    }
    fn content_hash(&self, owner: &str, id: u64) -> Result<(u64, u64, String)> {
        let o = owned(owner);
        self.read(owner, move |t| access::content_hash(t, &o, id))
    }
    fn mkdir(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        mode: u32,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        crate::store::check_new_name(name)?;
        let (o, name) = (owned(owner), name.to_string());
        self.change(owner, cutoff, move |tree| {
            let now = fsutil::now_ns();
            let id = tree.allocate_id();
            let node = changes::dir_node(id, parent, &name, mode, now);
            let info = node.info(&o);
            Ok((tree.plan_create(node, now)?, info))
        })
    }
    fn symlink(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        target: &str,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        crate::store::check_new_name(name)?;
        changes::check_link_target(target)?;
        let (o, name, target) = (owned(owner), name.to_string(), target.to_string());
        self.change(owner, cutoff, move |tree| {
            let now = fsutil::now_ns();
            let id = tree.allocate_id();
            let node = changes::link_node(id, parent, &name, &target, now);
            let info = node.info(&o);
            Ok((tree.plan_create(node, now)?, info))
        })
    }
    fn remove(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        dir: bool,
        cutoff: &Cutoff,
    ) -> Result<Vec<Published>> {
        crate::store::check_lookup_name(name)?;
        let name = name.to_string();
        Ok(self
            .change(owner, cutoff, move |tree| {
                Ok((tree.plan_remove(parent, &name, dir, fsutil::now_ns())?, ()))
            })?
            .1)
    }
    fn rename(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        noreplace: bool,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        crate::store::check_lookup_name(name)?;
        crate::store::check_new_name(new_name)?;
        let (o, name, new_name) = (owned(owner), name.to_string(), new_name.to_string());
        self.change(owner, cutoff, move |tree| {
            let now = fsutil::now_ns();
            match tree.plan_rename(parent, &name, new_parent, &new_name, noreplace, now)? {
                Some(ops) => {
                    let moved = ops
                        .iter()
                        .find_map(|op| match op {
                            Op::Put(n) if n.parent == new_parent && n.name == new_name => {
                                Some(n.info(&o))
                            }
                            _ => None,
                        })
                        .ok_or_else(|| {
                            ServerError::Internal("a rename without its entry".into())
                        })?;
                    Ok((ops, moved))
                }
                None => {
                    let info = tree
                        .lookup(parent, &name)
                        .map(|n| n.info(&o))
                        .ok_or_else(|| ServerError::NotFound(format!("{o}/{name}")))?;
                    Ok((Vec::new(), info))
                }
            }
        })
    }
    fn set_attr(
        &self,
        owner: &str,
        id: u64,
        mode: Option<u32>,
        atime_ns: Option<i64>,
        mtime_ns: Option<i64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        let o = owned(owner);
        self.change(owner, cutoff, move |tree| {
            let mut node = tree
                .get(id)
                .cloned()
                .ok_or_else(|| ServerError::NotFound(format!("{o}/#{id}")))?;
            changes::set_attrs(&mut node, mode, atime_ns, mtime_ns, fsutil::now_ns());
            let info = node.info(&o);
            Ok((vec![Op::Put(node)], info))
        })
    }
    fn usage(&self, owner: &str, quota: Option<u64>) -> Result<Space> {
        self.read(owner, move |t| {
            // The root is the folder itself, not one of its entries.
            let (used, files) = (t.used(), t.len().saturating_sub(1) as u64);
            // An object store has no size to speak of: what a quota leaves, or a petabyte.
            Ok(match quota {
                Some(q) => {
                    let left = q.saturating_sub(used);
                    Space {
                        total: q,
                        available: left,
                        used,
                        files,
                        quota_available: Some(left),
                    }
                }
                None => Space {
                    total: used + UNBOUNDED,
                    available: UNBOUNDED,
                    used,
                    files,
                    quota_available: None,
                },
            })
        })
    }
    fn sync(&self, _owner: &str) -> Result<()> {
        // Every change is committed before it is answered.
        Ok(())
    }
    fn watch(&self, sink: feed::Sink) {
        self.start_feed(sink);
    }
    fn remove_tree(&self, owner: &str) -> Result<()> {
        let pool = self.inner.db.pool.clone();
        let objects = self.inner.objects.clone();
        let o = owned(owner);
        let contents = self.run(async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg_error)?;
            let rows = tx
                .query(
                    "DELETE FROM sharefs_entries WHERE owner = $1 AND object IS NOT NULL
                     RETURNING object, size",
                    &[&o],
                )
                .await
                .map_err(pg_error)?;
            for statement in [
                "DELETE FROM sharefs_entries WHERE owner = $1",
                "DELETE FROM sharefs_changes WHERE owner = $1",
                "DELETE FROM sharefs_folders WHERE owner = $1",
            ] {
                tx.execute(statement, &[&o]).await.map_err(pg_error)?;
            }
            tx.commit().await.map_err(pg_error)?;
            let contents: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            for (object, size) in &contents {
                objects
                    .delete(rows::unbig(*object), rows::unbig(*size))
                    .await?;
            }
            Ok(contents.len())
        })?;
        if let Ok(mut folders) = self.inner.folders.lock() {
            folders.remove(owner);
        }
        tracing::info!(owner, contents, "tree removed");
        Ok(())
    }
}
