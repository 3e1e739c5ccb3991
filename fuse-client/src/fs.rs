//! The filesystem core: what `~/Share` looks like and does, with its own types and no
//! fuser or kernel in sight, so it is unit-tested against a fake [`Remote`].
//!
//! - The root lists users; each user is a directory; files are flat inside it.
//! - Inode numbers are handed out on first sight of a (user, name) and never reused for
//!   the life of the mount.
//! - Listings are cached until the server says they changed (pushed `file_changed`
//!   events), until a reconnect, or for at most [`LISTING_MAX_AGE`]. A folder that is not
//!   listed but looked up repeatedly (`cat a b c ...`, creates) gets its listing fetched in
//!   the background, so later lookups, negative ones too, need no round trip. Changes seen
//!   while a listing is in flight are replayed onto it, since it may predate them.
//! - Writes are allowed only in the user's own folder and only to regular files; all
//!   else is `PermissionDenied` (in others' folders and the root) or `NotPermitted`
//!   (sub-directories, in one's own).
//! - Every open of another user's file goes to the server (it is the download event), and
//!   tells the adapter whether the kernel may keep its cached pages (same version).
//! - The kernel has one size and one page cache per inode, but every open pins a version:
//!   while a version is open for reading through the cache, the kernel is shown that
//!   version only (`State::pinned`), and an open of another version reads past the cache.

mod error;
mod read;
pub mod remote;
pub mod staging;
mod stream;
mod write;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sharefs_protocol::name::{check_file_lookup, check_file_name};
use sharefs_protocol::{Event, FileInfo, Space, CHUNK_SIZE};
use tokio::sync::Semaphore;

pub use error::{FsError, FsResult};
pub use read::ReadHandle;
pub use remote::Remote;
use staging::StagingArea;
use stream::StreamState;
use write::{Base, Content};
pub use write::{MemoryBudget, StagedWrite};

pub const ROOT: u64 = 1;
/// Oldest a cached listing may be, as a backstop for lost events.
pub const LISTING_MAX_AGE: Duration = Duration::from_secs(60);
/// Bytes of a file's start that come back with its open: small files need no more trips.
const HEAD: u32 = 128 * 1024;
/// Prefetched blocks (1 MiB each) across all open files.
const PREFETCH_BUDGET: usize = 64;
/// Memory for small staged writes across all open files (each up to 1 MiB).
const STAGED_MEMORY: u64 = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// Attributes as the core reports them; the adapter adds uid, gid and block counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub perm: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub attr: Attr,
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenMode {
    pub write: bool,
    pub truncate: bool,
}

impl OpenMode {
    /// Whether a descriptor opened so can change the file (and has something to upload
    /// when it closes).
    pub fn changes_file(self) -> bool {
        self.write || self.truncate
    }
}

/// Result of an open: the handle and how the kernel is to cache what it reads.
#[derive(Debug, Clone)]
pub struct Opened {
    pub fh: u64,
    /// The kernel's cached pages are this version's: it may keep them.
    pub keep_cache: bool,
    /// The kernel's attributes of the file may be another version's: they must be
    /// dropped before the open is answered, so that the size it reads up to is this
    /// version's (the next `stat`, or the first read past the old size, asks again).
    pub refresh_attrs: bool,
    /// Another version of the file is open through the kernel's cache: this descriptor
    /// reads past it (FUSE direct I/O), straight from its own version.
    pub direct: bool,
    /// The whole content, when it came with the open and the kernel keeps its cache: the
    /// kernel may be given it now instead of asking for it with a read.
    pub content: Option<Bytes>,
}

/// Something the kernel must forget, as a consequence of a server event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// The name may now resolve differently.
    Entry { parent: u64, name: String },
    /// Attributes and cached pages of the inode are stale.
    Inode { ino: u64 },
    /// Only the attributes may be stale.
    Attr { ino: u64 },
}

#[derive(Debug, Clone)]
enum Node {
    Root,
    Folder(String),
    File(String, String),
}

#[derive(Debug)]
struct Listing<T> {
    items: T,
    fetched: Instant,
}

impl<T> Listing<T> {
    fn new(items: T) -> Self {
        Listing {
            items,
            fetched: Instant::now(),
        }
    }
    fn fresh(&self) -> bool {
        self.fetched.elapsed() < LISTING_MAX_AGE
    }
}

#[derive(Debug, Default)]
struct State {
    nodes: HashMap<u64, Node>,
    folder_inos: HashMap<String, u64>,
    file_inos: HashMap<(String, String), u64>,
    next_ino: u64,
    users: Option<Listing<Vec<String>>>,
    folders: HashMap<String, Listing<BTreeMap<String, FileInfo>>>,
    /// Version whose pages the kernel may hold for a file inode.
    cached_version: HashMap<u64, u64>,
    /// Versions open for reading through the kernel's cache, by inode. The kernel has one
    /// size and one set of pages per inode, so while such descriptors are open they are
    /// their version's: attributes report it and its invalidation waits for the last close.
    pinned: HashMap<u64, Pinned>,
    /// Files being written, by inode.
    staged: HashMap<u64, Arc<StagedWrite>>,
    /// Changes to folders with a listing fetch in flight, replayed onto what it brings
    /// (it may predate them). A folder is here exactly while a fetch of it is in flight.
    folder_logs: HashMap<String, FolderLog>,
    /// Bumped when every listing is dropped (reconnect, resync): fetches in flight then
    /// are not cached.
    epoch_all: u64,
    /// Lookups that had to ask the server since the folder's listing went away.
    lookup_misses: HashMap<String, u32>,
}

/// One version of a file open for reading through the kernel's cache (`State::pinned`).
#[derive(Debug)]
struct Pinned {
    info: FileInfo,
    /// Descriptors open on it.
    open: usize,
    /// The file changed on the server meanwhile: the kernel's attributes and pages are to
    /// be dropped when the last descriptor closes.
    stale: bool,
}

/// After this many lookups in one folder answered by the server, the folder's listing is
/// fetched in the background and later lookups (also of names that do not exist, as before
/// every create) are answered from it. A single `stat` of a huge folder stays one request.
const LISTING_AFTER_MISSES: u32 = 8;

type FolderListing = BTreeMap<String, FileInfo>;

#[derive(Debug, Default)]
struct FolderLog {
    /// Fetches in flight; the log goes when the last one ends.
    fetches: u32,
    changes: Vec<(String, Option<FileInfo>)>,
}

fn apply_change(items: &mut FolderListing, name: &str, file: Option<&FileInfo>) {
    match file {
        Some(info) => {
            items.insert(name.to_string(), info.clone());
        }
        None => {
            items.remove(name);
        }
    }
}

/// A listing fetch in flight, registered in the folder's change log from the moment it is
/// decided; ends its share of the log when dropped, also when abandoned.
struct Fetching {
    state: Arc<Mutex<State>>,
    owner: String,
    /// `State::epoch_all` when it began.
    epoch: u64,
    /// Where the changes made since it began start in the log.
    start: usize,
}

impl Fetching {
    fn begin(state: &Arc<Mutex<State>>, st: &mut State, owner: &str) -> Fetching {
        let log = st.folder_logs.entry(owner.to_string()).or_default();
        log.fetches += 1;
        Fetching {
            state: state.clone(),
            owner: owner.to_string(),
            epoch: st.epoch_all,
            start: log.changes.len(),
        }
    }

    /// Fetches the listing and caches it, with the changes seen while it was in flight
    /// replayed onto it: the server may have listed the folder before them.
    async fn run<R: Remote>(self, remote: &R) -> FsResult<FolderListing> {
        let listed = remote.list_files(&self.owner).await;
        let mut st = lock_state(&self.state);
        let mut files: FolderListing = listed?.into_iter().map(|f| (f.name.clone(), f)).collect();
        if let Some(log) = st.folder_logs.get(&self.owner) {
            for (name, file) in log.changes.get(self.start..).unwrap_or_default() {
                apply_change(&mut files, name, file.as_ref());
            }
        }
        if st.epoch_all == self.epoch {
            st.folders
                .insert(self.owner.clone(), Listing::new(files.clone()));
            st.lookup_misses.remove(&self.owner);
        }
        Ok(files)
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        let mut st = lock_state(&self.state);
        if let Some(log) = st.folder_logs.get_mut(&self.owner) {
            log.fetches = log.fetches.saturating_sub(1);
            if log.fetches == 0 {
                st.folder_logs.remove(&self.owner);
            }
        }
    }
}

impl State {
    /// Records that `name` in `owner`'s folder is now `file` (`None`: gone), in the cached
    /// listing and for the fetches of it in flight.
    fn folder_changed(&mut self, owner: &str, name: &str, file: Option<&FileInfo>) {
        if let Some(l) = self.folders.get_mut(owner) {
            apply_change(&mut l.items, name, file);
        }
        if let Some(log) = self.folder_logs.get_mut(owner) {
            log.changes.push((name.to_string(), file.cloned()));
        }
    }

    fn folder_ino(&mut self, owner: &str) -> u64 {
        if let Some(ino) = self.folder_inos.get(owner) {
            return *ino;
        }
        let ino = self.alloc(Node::Folder(owner.to_string()));
        self.folder_inos.insert(owner.to_string(), ino);
        ino
    }

    fn file_ino(&mut self, owner: &str, name: &str) -> u64 {
        let key = (owner.to_string(), name.to_string());
        if let Some(ino) = self.file_inos.get(&key) {
            return *ino;
        }
        let ino = self.alloc(Node::File(owner.to_string(), name.to_string()));
        self.file_inos.insert(key, ino);
        ino
    }

    fn alloc(&mut self, node: Node) -> u64 {
        self.next_ino = self.next_ino.max(ROOT) + 1;
        self.nodes.insert(self.next_ino, node);
        self.next_ino
    }
}

enum Handle<R: Remote> {
    /// A remote version; `cached` when read through the kernel's cache (`State::pinned`).
    Read {
        reader: Arc<ReadHandle<R>>,
        ino: u64,
        cached: bool,
    },
    Staged {
        ino: u64,
        staged: Arc<StagedWrite>,
        writable: bool,
    },
    Dir(Arc<Vec<DirEntry>>),
}

impl<R: Remote> Clone for Handle<R> {
    fn clone(&self) -> Self {
        match self {
            Handle::Read {
                reader,
                ino,
                cached,
            } => Handle::Read {
                reader: reader.clone(),
                ino: *ino,
                cached: *cached,
            },
            Handle::Staged {
                ino,
                staged,
                writable,
            } => Handle::Staged {
                ino: *ino,
                staged: staged.clone(),
                writable: *writable,
            },
            Handle::Dir(d) => Handle::Dir(d.clone()),
        }
    }
}

fn lock_state(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The filesystem. Cheap to share: wrap it in an `Arc`.
pub struct FsCore<R: Remote> {
    remote: Arc<R>,
    user: String,
    /// This mount's own staging directory, locked while the mount runs.
    staging: StagingArea,
    failed_dir: PathBuf,
    mounted_at: SystemTime,
    /// std `Mutex`: held for map lookups only, never across an await. Shared with
    /// background listing fetches.
    state: Arc<Mutex<State>>,
    handles: Mutex<HashMap<u64, Handle<R>>>,
    /// Writable handles that changed their file since their last flush. A flush without
    /// changes (a shell's `dup2` + `close` before it writes) uploads nothing, so replacing a
    /// file never commits an empty version in between; the last release still uploads.
    changed_since_flush: Mutex<std::collections::HashSet<u64>>,
    next_fh: AtomicU64,
    prefetch_budget: Arc<Semaphore>,
    staged_memory: Arc<MemoryBudget>,
    /// Where invalidations that are not the answer to an event go (the mount's
    /// invalidation thread); none in unit tests that do not ask.
    invalidations: std::sync::OnceLock<InvalidationSink>,
}

type InvalidationSink = Box<dyn Fn(Invalidation) + Send + Sync>;

/// A pinned server version as the base of a staged write.
struct BaseReader<R: Remote>(Arc<ReadHandle<R>>);

impl<R: Remote> Base for BaseReader<R> {
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = FsResult<Bytes>> + Send + '_>> {
        Box::pin(self.0.read(offset, len))
    }

    fn close(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.0.close())
    }
}

fn time_of(ns: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
}

impl<R: Remote> FsCore<R> {
    /// Runs one filesystem operation: every server call it makes shares one deadline.
    pub fn operation<F: std::future::Future + Send>(
        &self,
        fut: F,
    ) -> impl std::future::Future<Output = F::Output> + Send + use<'_, R, F> {
        self.remote.operation(fut)
    }

    /// `cache_dir` holds staged writes (`staging/`) and uploads that failed (`failed/`).
    /// What mounts of the same cache that ended without unmounting left in `staging/` is
    /// moved to `failed/` first (see `staging.rs`).
    pub fn new(remote: R, cache_dir: PathBuf) -> FsResult<FsCore<R>> {
        let staging_root = cache_dir.join("staging");
        let failed_dir = cache_dir.join("failed");
        let staging = StagingArea::create(&staging_root)?;
        let recovered = staging::recover(&staging_root, &failed_dir);
        if !recovered.is_empty() {
            tracing::warn!(
                files = recovered.len(),
                failed = %failed_dir.display(),
                "recovered the unsaved data of a mount that ended without unmounting"
            );
        }
        let user = remote.user().to_string();
        Ok(FsCore {
            remote: Arc::new(remote),
            user,
            staging,
            failed_dir,
            mounted_at: SystemTime::now(),
            state: Arc::default(),
            handles: Mutex::new(HashMap::new()),
            changed_since_flush: Mutex::new(std::collections::HashSet::new()),
            next_fh: AtomicU64::new(1),
            prefetch_budget: Arc::new(Semaphore::new(PREFETCH_BUDGET)),
            staged_memory: Arc::new(MemoryBudget::new(STAGED_MEMORY)),
            invalidations: std::sync::OnceLock::new(),
        })
    }

    /// Sets where invalidations due later than an event's answer go (once).
    pub fn on_invalidation(&self, sink: impl Fn(Invalidation) + Send + Sync + 'static) {
        let _ = self.invalidations.set(Box::new(sink));
    }

    fn invalidate(&self, inv: Invalidation) {
        if let Some(sink) = self.invalidations.get() {
            sink(inv);
        }
    }

    /// A descriptor reading through the kernel's cache closed. After the last one of a
    /// version that changed meanwhile, the kernel's attributes and pages of it go.
    fn unpin(&self, ino: u64) {
        {
            let mut st = self.state();
            let Some(p) = st.pinned.get_mut(&ino) else {
                return;
            };
            p.open = p.open.saturating_sub(1);
            if p.open > 0 {
                return;
            }
            let stale = p.stale;
            st.pinned.remove(&ino);
            if !stale {
                return;
            }
            st.cached_version.remove(&ino);
        }
        self.invalidate(Invalidation::Inode { ino });
    }

    /// A file's attributes as the kernel is to see them: those of the version open
    /// through its cache if there is one (`State::pinned`), else `info`'s.
    fn reported_attr(&self, st: &State, ino: u64, owner: &str, info: &FileInfo) -> Attr {
        let info = st.pinned.get(&ino).map_or(info, |p| &p.info);
        self.file_attr(ino, owner, info.size, time_of(info.mtime_ns))
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock_state(&self.state)
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<u64, Handle<R>>> {
        match self.handles.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        }
    }

    fn node(&self, ino: u64) -> FsResult<Node> {
        if ino == ROOT {
            return Ok(Node::Root);
        }
        self.state()
            .nodes
            .get(&ino)
            .cloned()
            .ok_or(FsError::NotFound)
    }

    fn dir_attr(&self, ino: u64, writable: bool) -> Attr {
        Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            mtime: self.mounted_at,
            perm: if writable { 0o755 } else { 0o555 },
        }
    }

    fn file_attr(&self, ino: u64, owner: &str, size: u64, mtime: SystemTime) -> Attr {
        Attr {
            ino,
            kind: Kind::File,
            size,
            mtime,
            perm: if owner == self.user { 0o644 } else { 0o444 },
        }
    }

    fn staged_attr(&self, ino: u64, staged: &StagedWrite) -> Attr {
        self.file_attr(ino, &self.user, staged.size(), SystemTime::now())
    }

    async fn users(&self) -> FsResult<Vec<String>> {
        if let Some(l) = self.state().users.as_ref().filter(|l| l.fresh()) {
            return Ok(l.items.clone());
        }
        let users = self.remote.list_users().await?;
        self.state().users = Some(Listing::new(users.clone()));
        Ok(users)
    }

    /// A user's files, from cache or the server.
    async fn folder(&self, owner: &str) -> FsResult<FolderListing> {
        if let Some(l) = self.state().folders.get(owner).filter(|l| l.fresh()) {
            return Ok(l.items.clone());
        }
        let fetch = Fetching::begin(&self.state, &mut self.state(), owner);
        fetch.run(&*self.remote).await
    }

    /// One file's info, from the cached listing or a `stat`.
    async fn file_info(&self, owner: &str, name: &str) -> FsResult<FileInfo> {
        let (cached, prefetch) = {
            let mut st = self.state();
            match st.folders.get(owner).filter(|l| l.fresh()) {
                Some(l) => (Some(l.items.get(name).cloned()), None),
                None => {
                    let misses = st.lookup_misses.entry(owner.to_string()).or_default();
                    *misses += 1;
                    // Not while a fetch of it is in flight: that one will be cached.
                    let due =
                        *misses >= LISTING_AFTER_MISSES && !st.folder_logs.contains_key(owner);
                    let fetch = due.then(|| Fetching::begin(&self.state, &mut st, owner));
                    (None, fetch)
                }
            }
        };
        if let Some(fetch) = prefetch {
            let remote = self.remote.clone();
            tokio::spawn(async move {
                let owner = fetch.owner.clone();
                if let Err(e) = fetch.run(&*remote).await {
                    tracing::debug!(%owner, error = %e, "listing prefetch failed");
                }
            });
        }
        match cached {
            Some(Some(info)) => Ok(info),
            Some(None) => Err(FsError::NotFound),
            None => Ok(self.remote.stat(owner, name).await?),
        }
    }

    fn remember(&self, info: &FileInfo) {
        self.state()
            .folder_changed(&info.owner, &info.name, Some(info));
    }

    fn forget_file(&self, owner: &str, name: &str) {
        self.state().folder_changed(owner, name, None);
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> FsResult<Attr> {
        match self.node(parent)? {
            Node::Root => {
                if !self.users().await?.iter().any(|u| u == name) {
                    return Err(FsError::NotFound);
                }
                let ino = self.state().folder_ino(name);
                Ok(self.dir_attr(ino, name == self.user))
            }
            Node::Folder(owner) => {
                // Lookup rules: files stored before control characters were refused
                // stay reachable.
                if check_file_lookup(name).is_err() {
                    return Err(FsError::NotFound);
                }
                let staged = {
                    let st = self.state();
                    st.file_inos
                        .get(&(owner.clone(), name.to_string()))
                        .and_then(|ino| st.staged.get(ino).map(|s| (*ino, s.clone())))
                };
                if let Some((ino, staged)) = staged {
                    return Ok(self.staged_attr(ino, &staged));
                }
                let info = self.file_info(&owner, name).await?;
                let mut st = self.state();
                let ino = st.file_ino(&owner, name);
                Ok(self.reported_attr(&st, ino, &owner, &info))
            }
            Node::File(..) => Err(FsError::NotDir),
        }
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        match self.node(ino)? {
            Node::Root => Ok(self.dir_attr(ROOT, false)),
            Node::Folder(owner) => Ok(self.dir_attr(ino, owner == self.user)),
            Node::File(owner, name) => {
                {
                    let st = self.state();
                    if let Some(staged) = st.staged.get(&ino) {
                        return Ok(self.staged_attr(ino, staged));
                    }
                    if let Some(p) = st.pinned.get(&ino) {
                        return Ok(self.reported_attr(&st, ino, &owner, &p.info));
                    }
                }
                let info = self.file_info(&owner, &name).await?;
                Ok(self.reported_attr(&self.state(), ino, &owner, &info))
            }
        }
    }

    /// Lists a directory, with attributes (for readdirplus), `.` and `..` excluded.
    pub async fn list(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        match self.node(ino)? {
            Node::Root => {
                let users = self.users().await?;
                let mut st = self.state();
                let inos: Vec<u64> = users.iter().map(|u| st.folder_ino(u)).collect();
                drop(st);
                Ok(users
                    .into_iter()
                    .zip(inos)
                    .map(|(u, ino)| DirEntry {
                        attr: self.dir_attr(ino, u == self.user),
                        name: u,
                    })
                    .collect())
            }
            Node::Folder(owner) => {
                let files = self.folder(&owner).await?;
                let mut st = self.state();
                let mut entries: BTreeMap<String, Attr> = BTreeMap::new();
                for (name, info) in &files {
                    let fino = st.file_ino(&owner, name);
                    entries.insert(name.clone(), self.reported_attr(&st, fino, &owner, info));
                }
                // Files being written show with their local size, also before their
                // first upload.
                if owner == self.user {
                    for (fino, staged) in &st.staged {
                        entries.insert(staged.name(), self.staged_attr(*fino, staged));
                    }
                }
                drop(st);
                Ok(entries
                    .into_iter()
                    .map(|(name, attr)| DirEntry { name, attr })
                    .collect())
            }
            Node::File(..) => Err(FsError::NotDir),
        }
    }

    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        let entries = self.list(ino).await?;
        Ok(self.insert_handle(Handle::Dir(Arc::new(entries))))
    }

    /// The snapshot taken at opendir, so paging through it is consistent.
    pub fn dir_entries(&self, fh: u64) -> FsResult<Arc<Vec<DirEntry>>> {
        match self.handles().get(&fh) {
            Some(Handle::Dir(d)) => Ok(d.clone()),
            _ => Err(FsError::BadHandle),
        }
    }

    fn insert_handle(&self, h: Handle<R>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles().insert(fh, h);
        fh
    }

    fn handle(&self, fh: u64) -> FsResult<Handle<R>> {
        self.handles().get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    /// Checks that `ino` is a folder the user may write in and returns its owner.
    fn own_folder(&self, ino: u64) -> FsResult<String> {
        match self.node(ino)? {
            Node::Folder(owner) if owner == self.user => Ok(owner),
            Node::Folder(_) | Node::Root => Err(FsError::PermissionDenied),
            Node::File(..) => Err(FsError::NotDir),
        }
    }

    fn check_new_name(name: &str) -> FsResult<()> {
        if name.len() > sharefs_protocol::name::MAX_FILE_NAME {
            return Err(FsError::NameTooLong);
        }
        check_file_name(name).map_err(FsError::InvalidName)
    }

    /// Creates (or truncates) a file in the user's folder and opens it for writing.
    pub async fn create(&self, parent: u64, name: &str) -> FsResult<(Attr, u64)> {
        let owner = self.own_folder(parent)?;
        Self::check_new_name(name)?;
        let ino = self.state().file_ino(&owner, name);
        let staged = self.stage(ino, name, true).await?;
        staged.truncate(0)?;
        let attr = self.staged_attr(ino, &staged);
        let fh = self.insert_handle(Handle::Staged {
            ino,
            staged,
            writable: true,
        });
        Ok((attr, fh))
    }

    /// The staged write of `ino`, created if needed: empty when `truncate`, otherwise
    /// based on the file's current version (fetched only where needed, see `write.rs`).
    async fn stage(&self, ino: u64, name: &str, truncate: bool) -> FsResult<Arc<StagedWrite>> {
        loop {
            if let Some(s) = self.live_staged(ino).await {
                return Ok(s);
            }
            let staged = self.stage_new(name, truncate).await?;
            let theirs = {
                let mut st = self.state();
                // Another open may have staged it meanwhile; use theirs.
                match st.staged.get(&ino).cloned() {
                    Some(s) => Some(s),
                    None => {
                        staged.acquire();
                        st.staged.insert(ino, staged.clone());
                        None
                    }
                }
            };
            let Some(theirs) = theirs else {
                return Ok(staged);
            };
            staged.mark_uploaded(staged.changes());
            staged.close_base().await;
            staged.finish(&self.failed_dir);
            if theirs.try_acquire() {
                return Ok(theirs);
            }
            // Theirs is being released already: wait for it, as above.
        }
    }

    /// The staged write of `ino` with one more reference, if one is open. One whose last
    /// descriptor is being released is waited for (its last upload takes the operation
    /// timeout at most): what it uploads is complete, and what comes next starts afresh.
    async fn live_staged(&self, ino: u64) -> Option<Arc<StagedWrite>> {
        loop {
            let s = self.state().staged.get(&ino).cloned()?;
            if s.try_acquire() {
                return Some(s);
            }
            s.wait_finished().await;
        }
    }

    /// A new staged write, not registered yet: see [`FsCore::stage`].
    async fn stage_new(&self, name: &str, truncate: bool) -> FsResult<Arc<StagedWrite>> {
        let budget = self.staged_memory.clone();
        let staged = if truncate {
            StagedWrite::create(self.staging.dir(), name, true, budget)
        } else {
            match self.remote.open(&self.user, name, HEAD).await {
                Ok((handle, info, head)) => {
                    let reader = Arc::new(ReadHandle::new(
                        self.remote.clone(),
                        handle,
                        info.clone(),
                        head,
                        self.prefetch_budget.clone(),
                    ));
                    if info.size == 0 {
                        reader.close().await;
                        StagedWrite::create(self.staging.dir(), name, false, budget)
                    } else {
                        let base = Arc::new(BaseReader(reader.clone()));
                        match StagedWrite::based_on(
                            self.staging.dir(),
                            name,
                            base,
                            info.size,
                            budget,
                        ) {
                            Ok(s) => s,
                            Err(e) => {
                                reader.close().await;
                                return Err(e);
                            }
                        }
                    }
                }
                Err(e) if e.code() == Some(sharefs_protocol::ErrorCode::NotFound) => {
                    // Gone meanwhile: writing recreates it.
                    let s = StagedWrite::create(self.staging.dir(), name, false, budget);
                    s.truncate(0)?;
                    s
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(Arc::new(staged))
    }

    pub async fn open(&self, ino: u64, mode: OpenMode) -> FsResult<Opened> {
        let (owner, name) = match self.node(ino)? {
            Node::File(owner, name) => (owner, name),
            Node::Root | Node::Folder(_) => return Err(FsError::IsDir),
        };
        if mode.changes_file() {
            if owner != self.user {
                return Err(FsError::PermissionDenied);
            }
            let staged = self.stage(ino, &name, mode.truncate).await?;
            if mode.truncate {
                staged.truncate(0)?;
            }
            self.state().cached_version.remove(&ino);
            let fh = self.insert_handle(Handle::Staged {
                ino,
                staged,
                writable: true,
            });
            return Ok(Opened {
                fh,
                keep_cache: false,
                refresh_attrs: false,
                direct: false,
                content: None,
            });
        }
        if let Some(staged) = self.live_staged(ino).await {
            let fh = self.insert_handle(Handle::Staged {
                ino,
                staged,
                writable: false,
            });
            return Ok(Opened {
                fh,
                keep_cache: true,
                refresh_attrs: false,
                direct: false,
                content: None,
            });
        }
        // Always asks the server: this open is the download the owner hears about.
        let (handle, info, head) = self.remote.open(&owner, &name, HEAD).await?;
        let (keep_cache, refresh_attrs, direct) = {
            let mut st = self.state();
            match st.pinned.get_mut(&ino) {
                // Open already, attributes and pages included.
                Some(p) if p.info.version == info.version => {
                    p.open += 1;
                    (true, false, false)
                }
                // The kernel's size and pages are the other version's while it is open.
                Some(p) => {
                    tracing::debug!(
                        file = %name,
                        cached = p.info.version,
                        opened = info.version,
                        "another version is open through the cache: reading past it"
                    );
                    (false, false, true)
                }
                None => {
                    let keep = st.cached_version.get(&ino) == Some(&info.version);
                    st.cached_version.insert(ino, info.version);
                    st.pinned.insert(
                        ino,
                        Pinned {
                            info: info.clone(),
                            open: 1,
                            stale: false,
                        },
                    );
                    (keep, true, false)
                }
            }
        };
        self.remember(&info);
        let whole = info.size > 0 && head.len() as u64 == info.size;
        let content = (keep_cache && whole).then(|| head.clone());
        let reader = Arc::new(ReadHandle::new(
            self.remote.clone(),
            handle,
            info,
            head,
            self.prefetch_budget.clone(),
        ));
        let fh = self.insert_handle(Handle::Read {
            reader,
            ino,
            cached: !direct,
        });
        Ok(Opened {
            fh,
            keep_cache,
            refresh_attrs,
            direct,
            content,
        })
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        match self.handle(fh)? {
            Handle::Read { reader, .. } => reader.read(offset, size).await,
            Handle::Staged { staged, .. } => Ok(Bytes::from(staged.read(offset, size).await?)),
            Handle::Dir(_) => Err(FsError::IsDir),
        }
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_bytes(fh, offset, Bytes::copy_from_slice(data))
            .await
    }

    /// [`FsCore::write`] of bytes the caller already owns: a streamed upload takes them
    /// without another copy.
    pub async fn write_bytes(&self, fh: u64, offset: u64, data: Bytes) -> FsResult<u32> {
        let staged = match self.handle(fh)? {
            Handle::Staged {
                staged,
                writable: true,
                ..
            } => staged,
            Handle::Staged { .. } | Handle::Read { .. } => return Err(FsError::BadHandle),
            Handle::Dir(_) => return Err(FsError::IsDir),
        };
        let _order = staged.stream_order.lock().await;
        let n = staged.write(offset, &data).await?;
        self.mark_changed(fh);
        self.feed_stream(&staged, offset, data).await;
        Ok(n)
    }

    /// Passes a write on to the file's streamed upload, starting one for the first write
    /// of a fresh file and ending it at the first write out of sequence.
    async fn feed_stream(&self, staged: &StagedWrite, offset: u64, data: Bytes) {
        let len = data.len() as u64;
        let send = {
            let Ok(mut st) = staged.stream.lock() else {
                return;
            };
            match &mut *st {
                StreamState::Eligible if offset == 0 => {
                    *st = StreamState::Pending {
                        buf: bytes::BytesMut::from(&data[..]),
                        next: len,
                    };
                    None
                }
                StreamState::Pending { buf, next } if *next == offset => {
                    buf.extend_from_slice(&data);
                    *next += len;
                    if buf.len() < CHUNK_SIZE as usize {
                        None
                    } else {
                        // Big enough to be worth streaming: start, with what we kept.
                        let head = buf.split().freeze();
                        let next = *next;
                        let (tx, rx) = tokio::sync::mpsc::channel(stream::STREAM_QUEUE);
                        tokio::spawn(stream::run(self.remote.clone(), staged.name(), rx));
                        *st = StreamState::Active {
                            tx: tx.clone(),
                            next,
                        };
                        Some((tx, head))
                    }
                }
                StreamState::Active { tx, next } if *next == offset => {
                    *next += len;
                    Some((tx.clone(), data))
                }
                StreamState::Eligible
                | StreamState::Pending { .. }
                | StreamState::Active { .. } => {
                    *st = StreamState::Off;
                    None
                }
                StreamState::Off => None,
            }
        };
        if let Some((tx, payload)) = send {
            if tx.send(stream::StreamMsg::Data(payload)).await.is_err() {
                staged.stop_stream();
            }
        }
    }

    /// Commits the file's stream if it carries exactly the staged content.
    async fn finish_stream(&self, staged: &StagedWrite) -> Option<FileInfo> {
        let tx = {
            let mut st = staged.stream.lock().ok()?;
            match std::mem::take(&mut *st) {
                StreamState::Active { tx, next } if next == staged.size() => tx,
                _ => return None,
            }
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(stream::StreamMsg::Finish(reply)).await.ok()?;
        match answer.await {
            Ok(Ok(info)) => Some(info),
            Ok(Err(e)) => {
                tracing::info!(error = %e, "streamed upload failed; uploading the staged file");
                None
            }
            Err(_) => None,
        }
    }

    /// Uploads a staged file if it changed; returns once the server committed it.
    async fn upload(&self, ino: u64, staged: &StagedWrite) -> FsResult<()> {
        let _serial = staged.upload_lock.lock().await;
        self.upload_locked(ino, staged).await
    }

    /// [`FsCore::upload`] with the file's upload lock held by the caller.
    async fn upload_locked(&self, ino: u64, staged: &StagedWrite) -> FsResult<()> {
        if !staged.dirty() {
            return Ok(());
        }
        let changes = staged.changes();
        let name = staged.name();
        if let Err(e) = staged.materialize().await {
            tracing::warn!(file = %name, error = %e, "cannot fetch the rest of the file");
            return Err(e);
        }
        let streamed = self.finish_stream(staged).await;
        let info = match streamed {
            Some(info) => Ok(info),
            None => match staged.content() {
                Content::Memory(data) => self.remote.upload_bytes(&name, data).await,
                Content::File(path) => self.remote.upload_file(&name, &path).await,
            },
        }
        .map_err(|e| {
            tracing::warn!(file = %name, error = %e, "upload failed");
            FsError::from(e)
        })?;
        staged.mark_uploaded(changes);
        tracing::info!(file = %name, size = info.size, "uploaded");
        let mut st = self.state();
        st.folder_changed(&info.owner, &info.name, Some(&info));
        match st.pinned.get_mut(&ino) {
            // A descriptor here still reads an earlier version through the cache, so its
            // pages are mixed with these writes': they go after its last close.
            Some(p) if p.info.version != info.version => {
                p.stale = true;
                st.cached_version.remove(&ino);
            }
            // The kernel's pages of this file came from these writes (or from the version
            // they were made on): they are this version's, and the next open may keep them
            // instead of dropping what may be a gigabyte of cache.
            _ => {
                st.cached_version.insert(ino, info.version);
            }
        }
        Ok(())
    }

    fn mark_changed(&self, fh: u64) {
        if let Ok(mut c) = self.changed_since_flush.lock() {
            c.insert(fh);
        }
    }

    fn take_changed(&self, fh: u64) -> bool {
        self.changed_since_flush
            .lock()
            .map(|mut c| c.remove(&fh))
            .unwrap_or(true)
    }

    /// `close()` of a descriptor: uploads what this handle changed. The check happens under
    /// the file's upload lock, so a `close()` never returns while another close of the same
    /// open file (a forked child closing its inherited copy, say) is still uploading this
    /// handle's writes.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        match self.handle(fh)? {
            Handle::Staged {
                ino,
                staged,
                writable: true,
            } => {
                let _serial = staged.upload_lock.lock().await;
                if !self.take_changed(fh) {
                    return Ok(());
                }
                let result = self.upload_locked(ino, &staged).await;
                if result.is_err() {
                    // Not committed: the next close of this open file tries again and
                    // reports (a parent's close after its forked child's close failed);
                    // the last release does not.
                    self.mark_changed(fh);
                    staged.report_failure();
                }
                result
            }
            _ => Ok(()),
        }
    }

    /// fsync(2): uploads pending changes, whoever made them.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        match self.handle(fh)? {
            Handle::Staged {
                ino,
                staged,
                writable: true,
            } => {
                let result = self.upload(ino, &staged).await;
                if result.is_err() {
                    staged.report_failure();
                }
                result
            }
            _ => Ok(()),
        }
    }

    /// Last close of a handle. A staged file with changes no `close()` uploaded (one
    /// created or truncated without writes, or written after its last `close()`) is
    /// uploaded now, unless a `close()` or `fsync()` already reported its upload failed:
    /// then nobody is left to tell of a later outcome, and the server's file stays as
    /// that caller was told. Data not uploaded is kept locally (see
    /// [`StagedWrite::finish`]).
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let Some(handle) = self.handles().remove(&fh) else {
            return Err(FsError::BadHandle);
        };
        self.take_changed(fh);
        match handle {
            Handle::Read {
                reader,
                ino,
                cached,
            } => {
                if cached {
                    self.unpin(ino);
                }
                reader.close().await;
                Ok(())
            }
            Handle::Dir(_) => Ok(()),
            Handle::Staged { ino, staged, .. } => {
                if !staged.release() {
                    return Ok(());
                }
                // No open joins it from here on (see `live_staged`).
                let result = {
                    let _serial = staged.upload_lock.lock().await;
                    if staged.dirty() && staged.failure_reported() {
                        tracing::warn!(
                            file = %staged.name(),
                            "not uploaded at the last close: its close() or fsync() reported the failure"
                        );
                        Ok(())
                    } else {
                        self.upload_locked(ino, &staged).await
                    }
                };
                staged.close_base().await;
                {
                    let mut st = self.state();
                    if st.staged.get(&ino).is_some_and(|s| Arc::ptr_eq(s, &staged)) {
                        st.staged.remove(&ino);
                    }
                }
                staged.finish(&self.failed_dir);
                result
            }
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles().remove(&fh);
    }

    /// Truncates (the only attribute change with an effect). Mode and time changes are
    /// accepted and ignored in one's own folder, refused elsewhere.
    pub async fn setattr(&self, ino: u64, size: Option<u64>, fh: Option<u64>) -> FsResult<Attr> {
        let (owner, name) = match self.node(ino)? {
            Node::File(owner, name) => (owner, name),
            Node::Folder(owner) if owner == self.user => return self.getattr(ino).await,
            Node::Root | Node::Folder(_) => return Err(FsError::PermissionDenied),
        };
        if owner != self.user {
            return Err(FsError::PermissionDenied);
        }
        let Some(size) = size else {
            return self.getattr(ino).await;
        };
        if let (Some(fh), Some(Handle::Staged { staged, .. })) =
            (fh, fh.and_then(|fh| self.handle(fh).ok()))
        {
            staged.truncate(size)?;
            self.mark_changed(fh);
            return Ok(self.staged_attr(ino, &staged));
        }
        // truncate(2) on a path: stage (or join the open descriptors' staged file) and
        // truncate; with no descriptor open, the release uploads it now.
        let staged = self.stage(ino, &name, size == 0).await?;
        staged.truncate(size)?;
        let fh = self.insert_handle(Handle::Staged {
            ino,
            staged: staged.clone(),
            writable: true,
        });
        let attr = self.staged_attr(ino, &staged);
        self.release(fh).await?;
        Ok(attr)
    }

    pub async fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        let owner = self.own_folder(parent)?;
        let ino = self
            .state()
            .file_inos
            .get(&(owner.clone(), name.to_string()))
            .copied();
        let staged = ino.and_then(|i| self.state().staged.get(&i).cloned());
        match self.remote.delete(name).await {
            Ok(()) => {}
            // Created here and not uploaded yet: only the local copy exists.
            Err(e)
                if staged.is_some() && e.code() == Some(sharefs_protocol::ErrorCode::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        if let (Some(ino), Some(staged)) = (ino, staged) {
            staged.unlink();
            let mut st = self.state();
            if st.staged.get(&ino).is_some_and(|s| Arc::ptr_eq(s, &staged)) {
                st.staged.remove(&ino);
            }
        }
        self.forget_file(&owner, name);
        if let Some(ino) = ino {
            self.state().cached_version.remove(&ino);
        }
        Ok(())
    }

    pub async fn rename(
        &self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
    ) -> FsResult<()> {
        let owner = self.own_folder(parent)?;
        let new_owner = self.own_folder(new_parent)?;
        if owner != new_owner {
            return Err(FsError::PermissionDenied);
        }
        Self::check_new_name(new_name)?;
        let (ino, staged) = {
            let st = self.state();
            let ino = st
                .file_inos
                .get(&(owner.clone(), name.to_string()))
                .copied();
            (ino, ino.and_then(|i| st.staged.get(&i).cloned()))
        };
        // An open, changed file goes up first so the rename moves current content.
        if let (Some(ino), Some(staged)) = (ino, &staged) {
            self.upload(ino, staged).await?;
        }
        let info = self.remote.rename(name, new_name).await?;
        let mut st = self.state();
        st.folder_changed(&owner, name, None);
        st.folder_changed(&owner, new_name, Some(&info));
        // The inode moves with the name, as on a local filesystem.
        if let Some(ino) = ino {
            st.file_inos.remove(&(owner.clone(), name.to_string()));
            if let Some(old) = st
                .file_inos
                .insert((owner.clone(), new_name.to_string()), ino)
            {
                if old != ino {
                    st.nodes.remove(&old);
                    st.staged.remove(&old);
                }
            }
            st.nodes
                .insert(ino, Node::File(owner.clone(), new_name.to_string()));
            st.cached_version.remove(&ino);
            if let Some(s) = staged {
                s.set_name(new_name);
            }
        }
        Ok(())
    }

    /// Directories, links and special files: refused in others' folders and the root,
    /// not offered in one's own.
    pub fn refuse_create_other(&self, parent: u64) -> FsError {
        match self.own_folder(parent) {
            Ok(_) => FsError::NotPermitted,
            Err(e) => e,
        }
    }

    /// rmdir: user folders are the server's, never the mount's to remove.
    pub async fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        let attr = self.lookup(parent, name).await?;
        match attr.kind {
            Kind::Dir => Err(FsError::PermissionDenied),
            Kind::File => Err(FsError::NotDir),
        }
    }

    /// access(2): write access only in one's own folder.
    pub fn access(&self, ino: u64, write: bool) -> FsResult<()> {
        if !write {
            return self.node(ino).map(|_| ());
        }
        match self.node(ino)? {
            Node::Folder(owner) | Node::File(owner, _) if owner == self.user => Ok(()),
            _ => Err(FsError::PermissionDenied),
        }
    }

    pub async fn statfs(&self) -> FsResult<Space> {
        Ok(self.remote.statfs().await?)
    }

    /// Applies a server event to the caches; returns what the kernel must forget.
    pub fn handle_event(&self, event: &Event) -> Vec<Invalidation> {
        let mut st = self.state();
        match event {
            Event::FileChanged { owner, name, file } => {
                st.folder_changed(owner, name, file.as_ref());
                let mut out = Vec::new();
                if let Some(parent) = st.folder_inos.get(owner) {
                    out.push(Invalidation::Entry {
                        parent: *parent,
                        name: name.clone(),
                    });
                }
                if let Some(ino) = st.file_inos.get(&(owner.clone(), name.clone())).copied() {
                    let unchanged = file
                        .as_ref()
                        .is_some_and(|f| st.cached_version.get(&ino) == Some(&f.version));
                    if !unchanged && !st.staged.contains_key(&ino) {
                        let version = file.as_ref().map(|f| f.version);
                        match st.pinned.get_mut(&ino) {
                            // Its readers see their version to the end; the kernel lets
                            // it go after the last close (`unpin`).
                            Some(p) => p.stale |= version != Some(p.info.version),
                            None => {
                                st.cached_version.remove(&ino);
                                out.push(Invalidation::Inode { ino });
                            }
                        }
                    }
                }
                out
            }
            Event::UsersChanged => {
                st.users = None;
                vec![Invalidation::Inode { ino: ROOT }]
            }
            Event::Resync => Self::forget_all(&mut st),
            Event::Notification { .. } => Vec::new(),
        }
    }

    /// After a reconnect: every listing may be stale.
    pub fn reconnected(&self) -> Vec<Invalidation> {
        Self::forget_all(&mut self.state())
    }

    fn forget_all(st: &mut State) -> Vec<Invalidation> {
        st.users = None;
        st.folders.clear();
        st.epoch_all += 1;
        let mut out = vec![Invalidation::Attr { ino: ROOT }];
        out.extend(
            st.folder_inos
                .values()
                .map(|ino| Invalidation::Attr { ino: *ino }),
        );
        out.extend(
            st.file_inos
                .values()
                .map(|ino| Invalidation::Attr { ino: *ino }),
        );
        out
    }
}

#[cfg(test)]
mod tests;
