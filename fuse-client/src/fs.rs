//! The filesystem core: what `~/Share` looks like and does, with its own types and no
//! fuser or kernel in sight, so it is unit-tested against a fake [`Remote`].
//!
//! - The root lists users; each user's folder is the root of their tree of directories,
//!   files and symbolic links, addressed on the server by entry id ([`tree`]).
//! - Listings are cached per directory and kept current by the server's pushed events
//!   ([`listing`], [`events`]).
//! - Writes are allowed only in the user's own tree; elsewhere they are
//!   `PermissionDenied`. Others' entries are shown with their write bits cleared; what
//!   their "other" bits do not allow to read, the server refuses.
//! - Open files, staged writes and their uploads are in [`files`]; names and attributes
//!   (mkdir, symlink, unlink, rmdir, rename, setattr) in [`namespace`].
//! - Changes that need not wait for the server's disk, and the points that make them
//!   durable (`close()`, `fsync()`), are in [`durable`].

mod creating;
mod durable;
mod error;
mod events;
mod files;
pub mod listing;
mod namespace;
mod read;
pub mod remote;
mod room;
pub mod staging;
mod stream;
mod told;
pub mod tree;
mod write;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sharefs_protocol::name::check_file_lookup;
use sharefs_protocol::{EntryKind, FileInfo, Space, ROOT_ID};
use tokio::sync::Semaphore;

pub use error::{FsError, FsResult};
use files::Handle;
pub use listing::LISTING_MAX_AGE;
use listing::{Cached, DirKey, Listings};
pub use read::ReadHandle;
pub use remote::Remote;
use staging::StagingArea;
use tree::Tree;
pub use tree::ROOT;
pub use write::{MemoryBudget, StagedWrite};

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
    Symlink,
}

impl From<EntryKind> for Kind {
    fn from(k: EntryKind) -> Kind {
        match k {
            EntryKind::Dir => Kind::Dir,
            EntryKind::File => Kind::File,
            EntryKind::Symlink => Kind::Symlink,
        }
    }
}

/// Attributes as the core reports them; the adapter adds uid, gid, links and blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub atime: SystemTime,
    pub ctime: SystemTime,
    pub perm: u16,
    /// Removed while still open here (its link count is then 0).
    pub unlinked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub attr: Attr,
}

/// An open directory: its entries, once read.
#[derive(Debug)]
pub struct OpenDir {
    ino: u64,
    entries: tokio::sync::OnceCell<Arc<Vec<DirEntry>>>,
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

/// A reply carrying attributes under way ([`FsCore::attr_reply`]).
pub struct AttrReply(Arc<AtomicUsize>);

impl Drop for AttrReply {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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

/// A change of attributes asked by `chmod`, `utimes` or `truncate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub size: Option<u64>,
    pub mode: Option<u32>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// What the mount knows of open files and the kernel's caches of them. std `Mutex`: held
/// for map lookups only, never across an await.
#[derive(Debug, Default)]
struct State {
    tree: Tree,
    /// Version whose pages the kernel may hold for a file inode.
    cached_version: HashMap<u64, u64>,
    /// Versions open for reading through the kernel's cache, by inode. The kernel has one
    /// size and one set of pages per inode, so while such descriptors are open they are
    /// their version's: attributes report it and its invalidation waits for the last close.
    pinned: HashMap<u64, Pinned>,
    /// Files being written, by inode.
    staged: HashMap<u64, Arc<StagedWrite>>,
    /// Creates made here that the server has not answered yet (deferred, sent, or
    /// carried by an upload), by the inode of their local node.
    creating: HashMap<u64, creating::Create>,
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
    /// Only the attributes of this version changed (a mode, times): the kernel's are to
    /// be dropped when the last descriptor closes.
    attrs_changed: bool,
    /// The open that pinned it had the kernel drop the attributes it held, and that is
    /// not known to have landed: another open of it has them dropped again before it
    /// replies, behind the first in the invalidation queue, so that it cannot be answered
    /// before the first's refresh.
    refreshing: bool,
}

impl Pinned {
    /// Takes the new attributes of the version it holds (a mode, times), to report from
    /// now on and to drop from the kernel at the last close; false for another version.
    fn same_version_changed(&mut self, info: &FileInfo) -> bool {
        if info.version != self.info.version {
            return false;
        }
        if *info != self.info {
            self.info = info.clone();
            self.attrs_changed = true;
        }
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The filesystem. Cheap to share: wrap it in an `Arc`.
pub struct FsCore<R: Remote> {
    remote: Arc<R>,
    user: String,
    /// This mount's own staging directory, locked while the mount runs.
    staging: StagingArea,
    failed_dir: PathBuf,
    mounted_at: SystemTime,
    state: Mutex<State>,
    /// Listings, apart from `state` (never both locked at once): background fetches
    /// share them.
    listings: Arc<Mutex<Listings>>,
    handles: Mutex<HashMap<u64, Handle<R>>>,
    /// What the kernel may hold of each file's size (see [`told`]). Locked last, inside
    /// `state` when both are.
    told: Mutex<told::Told>,
    /// Replies carrying attributes under way (see [`FsCore::attr_reply`]).
    attr_replies: Arc<AtomicUsize>,
    /// Writable handles that changed their file since their last flush. A flush without
    /// changes (a shell's `dup2` + `close` before it writes) uploads nothing, so replacing a
    /// file never commits an empty version in between; the last release still uploads.
    changed_since_flush: Mutex<std::collections::HashSet<u64>>,
    next_fh: AtomicU64,
    prefetch_budget: Arc<Semaphore>,
    /// Memory the streamed uploads keep for a resend, in KiB (see [`stream`]).
    stream_budget: Arc<Semaphore>,
    staged_memory: Arc<MemoryBudget>,
    /// Where invalidations that are not the answer to an event go (the mount's
    /// invalidation thread); none in unit tests that do not ask.
    invalidations: std::sync::OnceLock<InvalidationSink>,
    /// The space the server last said the user has left, for writes that grow files.
    room: room::Room,
    /// Changes answered before they were durable (see [`durable`]).
    lazy: Arc<durable::LazyChanges>,
}

type InvalidationSink = Box<dyn Fn(Invalidation) + Send + Sync>;

fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Nanoseconds since the Unix epoch of `t` (negative before it).
pub fn ns_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// A directory of a user's tree, as the core addresses it.
#[derive(Debug, Clone)]
struct Dir {
    owner: String,
    id: u64,
}

impl Dir {
    fn key(&self) -> DirKey {
        (self.owner.clone(), self.id)
    }
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
            state: Mutex::default(),
            listings: Arc::default(),
            handles: Mutex::new(HashMap::new()),
            told: Mutex::default(),
            attr_replies: Arc::default(),
            changed_since_flush: Mutex::new(std::collections::HashSet::new()),
            next_fh: AtomicU64::new(1),
            prefetch_budget: Arc::new(Semaphore::new(PREFETCH_BUDGET)),
            stream_budget: Arc::new(Semaphore::new((stream::STREAM_BUDGET / 1024) as usize)),
            staged_memory: Arc::new(MemoryBudget::new(STAGED_MEMORY)),
            invalidations: std::sync::OnceLock::new(),
            room: room::Room::default(),
            lazy: Arc::default(),
        })
    }

    /// Sets where invalidations due later than an event's answer go (once). The sink may
    /// be called with the core's state locked (so that what it queues keeps its order
    /// with the opens that follow): it must not call back into the core.
    pub fn on_invalidation(&self, sink: impl Fn(Invalidation) + Send + Sync + 'static) {
        let _ = self.invalidations.set(Box::new(sink));
    }

    fn invalidate(&self, inv: Invalidation) {
        if let Some(sink) = self.invalidations.get() {
            sink(inv);
        }
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Files written here whose content is not on the server yet: name and size.
    pub fn uploads_in_progress(&self) -> Vec<(String, u64)> {
        self.state()
            .staged
            .values()
            .filter(|s| s.dirty())
            .map(|s| (s.name(), s.size()))
            .collect()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn listings(&self) -> MutexGuard<'_, Listings> {
        listing::lock(&self.listings)
    }

    fn node(&self, ino: u64) -> FsResult<tree::Node> {
        self.state().tree.get(ino).cloned().ok_or(FsError::NotFound)
    }

    /// The directory `ino` (in a user's tree); the root is not one.
    fn dir(&self, ino: u64) -> FsResult<Dir> {
        let node = self.node(ino)?;
        match (node.kind, node.owner) {
            (EntryKind::Dir, Some(owner)) => Ok(Dir { owner, id: node.id }),
            (EntryKind::Dir, None) => Err(FsError::PermissionDenied),
            _ => Err(FsError::NotDir),
        }
    }

    /// The directory `ino` if the user may change it: one of their own tree.
    fn own_dir(&self, ino: u64) -> FsResult<Dir> {
        let dir = self.dir(ino)?;
        if dir.owner != self.user {
            return Err(FsError::PermissionDenied);
        }
        Ok(dir)
    }

    /// The inode of the directory holding `ino` (the root's is itself).
    pub fn parent_of(&self, ino: u64) -> u64 {
        self.state().tree.get(ino).map_or(ROOT, |n| n.parent)
    }

    fn root_attr(&self) -> Attr {
        Attr {
            ino: ROOT,
            kind: Kind::Dir,
            size: 0,
            mtime: self.mounted_at,
            atime: self.mounted_at,
            ctime: self.mounted_at,
            perm: 0o555,
            unlinked: false,
        }
    }

    /// Attributes of an entry as the server describes it: others' entries without their
    /// write bits.
    fn info_attr(&self, ino: u64, info: &FileInfo) -> Attr {
        let mut perm = (info.mode & 0o7777) as u16;
        if info.owner != self.user {
            perm &= !0o222;
        }
        Attr {
            ino,
            kind: info.kind.into(),
            size: match info.kind {
                EntryKind::Dir => 0,
                EntryKind::File => info.size,
                EntryKind::Symlink => info.target.as_ref().map_or(info.size, |t| t.len() as u64),
            },
            mtime: time_of(info.mtime_ns),
            atime: time_of(info.atime_ns),
            ctime: time_of(info.ctime_ns),
            perm,
            unlinked: false,
        }
    }

    /// A user's folder whose attributes the server did not give.
    fn folder_default_attr(&self, ino: u64, owner: &str) -> Attr {
        Attr {
            perm: if owner == self.user { 0o755 } else { 0o555 },
            ino,
            ..self.root_attr()
        }
    }

    /// A file's attributes as the kernel is to see them: a file being written shows its
    /// staged size and the mode and times set on it; one open for reading through the
    /// kernel's cache, that version's size and times (`State::pinned`); else `info`'s.
    fn reported_attr(&self, st: &State, ino: u64, info: &FileInfo) -> Attr {
        let mut attr = match st.staged.get(&ino) {
            Some(staged) => self.staged_attr(ino, info, staged),
            None => self.info_attr(ino, st.pinned.get(&ino).map_or(info, |p| &p.info)),
        };
        attr.unlinked = st.tree.get(ino).is_some_and(|n| n.gone);
        attr
    }

    fn staged_attr(&self, ino: u64, info: &FileInfo, staged: &StagedWrite) -> Attr {
        let pending = staged.pending_attrs();
        let mut attr = self.info_attr(ino, info);
        attr.size = staged.size();
        let now = SystemTime::now();
        let dirty = staged.dirty();
        attr.mtime = match pending.mtime_ns {
            Some(t) => time_of(t),
            None if dirty => time_of(staged.written_ns()),
            None => attr.mtime,
        };
        // Written, truncated or given a mode or times here: changed now, as its upload
        // will say.
        if dirty || !pending.is_empty() {
            attr.ctime = now;
        }
        if let Some(a) = pending.atime_ns {
            attr.atime = time_of(a);
        }
        if let Some(mode) = pending.mode {
            attr.perm = (mode & 0o7777) as u16;
        }
        attr
    }

    /// Records an entry the server described: placed in the tree, its parent's listing
    /// updated. Returns its inode, if its directory is known.
    fn remember(&self, info: &FileInfo) -> Option<u64> {
        if info.id != ROOT_ID {
            self.listings()
                .changed(&(info.owner.clone(), info.parent), &info.name, Some(info));
        }
        self.state().tree.place(info)
    }

    /// This mount changed the entries of directory `ino`: its times changed on the
    /// server, and the kernel (which dropped its attributes) asks for the new ones.
    fn dir_changed(&self, ino: u64) {
        self.state().tree.stale(ino);
    }

    async fn users(&self) -> FsResult<Vec<String>> {
        if let Some(l) = self.listings().users.as_ref().filter(|l| l.fresh()) {
            return Ok(l.items.clone());
        }
        let users = self.remote.list_users().await?;
        self.listings().users = Some(listing::Listing::new(users.clone()));
        Ok(users)
    }

    /// A directory's entries, from cache or the server.
    async fn entries(&self, dir: &Dir) -> FsResult<Arc<listing::DirListing>> {
        let key = dir.key();
        let fetch = {
            let mut l = self.listings();
            if let Some(items) = l.get(&key) {
                return Ok(items.clone());
            }
            listing::Fetching::begin(&self.listings, &mut l, &key)
        };
        fetch.run(&*self.remote).await
    }

    /// The entry `name` of `dir`, from the cached listing or a lookup.
    async fn entry(&self, dir: &Dir, name: &str) -> FsResult<FileInfo> {
        let (cached, prefetch) = self.listings().lookup(&self.listings, &dir.key(), name);
        if let Some(fetch) = prefetch {
            let remote = self.remote.clone();
            tokio::spawn(async move {
                let dir = fetch.dir.clone();
                if let Err(e) = fetch.run(&*remote).await {
                    tracing::debug!(?dir, error = %e, "listing prefetch failed");
                }
            });
        }
        match cached {
            Cached::Known(Some(info)) => Ok(info),
            Cached::Known(None) => Err(FsError::NotFound),
            Cached::Unknown => Ok(self.remote.lookup(&dir.owner, dir.id, name).await?),
        }
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> FsResult<Attr> {
        if name == "." || name == ".." {
            if self.node(parent)?.kind != EntryKind::Dir {
                return Err(FsError::NotDir);
            }
            let ino = if name == "." {
                parent
            } else {
                self.parent_of(parent)
            };
            return self.getattr(ino).await;
        }
        if parent == ROOT {
            if !self.users().await?.iter().any(|u| u == name) {
                return Err(FsError::NotFound);
            }
            let ino = self.state().tree.user_folder(name);
            return self.getattr(ino).await;
        }
        let dir = self.dir(parent)?;
        if name.len() > sharefs_protocol::name::MAX_FILE_NAME {
            return Err(FsError::NameTooLong);
        }
        // Lookup rules: entries stored before control characters were refused stay
        // reachable.
        if check_file_lookup(name).is_err() {
            return Err(FsError::NotFound);
        }
        // A file created here and not uploaded yet is known here only.
        let local = {
            let st = self.state();
            st.tree
                .child(parent, name)
                .filter(|i| st.tree.is_local(*i) && st.staged.contains_key(i))
        };
        if let Some(ino) = local {
            return self.getattr(ino).await;
        }
        let info = match self.entry(&dir, name).await {
            Ok(info) => info,
            Err(FsError::NotFound) => {
                self.state().tree.unname(parent, name);
                return Err(FsError::NotFound);
            }
            Err(e) => return Err(e),
        };
        let ino = self.remember(&info).ok_or(FsError::NotFound)?;
        let st = self.state();
        Ok(self.reported_attr(&st, ino, &info))
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        tracing::trace!(ino, "getattr");
        if ino == ROOT {
            return Ok(self.root_attr());
        }
        let node = self.node(ino)?;
        let Some((owner, id)) = node.entry() else {
            return Ok(self.root_attr());
        };
        let owner = owner.to_string();
        {
            let st = self.state();
            let pinned = st.pinned.get(&ino).map(|p| p.info.clone());
            let staged = st.staged.contains_key(&ino);
            // Unlinked while open, or being written or read here: what is known is what
            // the kernel is to see.
            if let Some(info) = node.info.as_ref().filter(|_| node.gone || staged) {
                return Ok(self.reported_attr(&st, ino, info));
            }
            if let Some(info) = pinned {
                return Ok(self.reported_attr(&st, ino, &info));
            }
        }
        if let Some(info) = node.fresh_info() {
            let st = self.state();
            return Ok(self.reported_attr(&st, ino, info));
        }
        let info = match self.remote.stat(&owner, id).await {
            Ok(info) => info,
            Err(e) if id == ROOT_ID => {
                tracing::debug!(%owner, error = %e, "no attributes of a user's folder");
                return Ok(self.folder_default_attr(ino, &owner));
            }
            Err(e) => {
                let e = FsError::from(e);
                if matches!(e, FsError::NotFound) {
                    self.state().tree.detach(ino);
                }
                return Err(e);
            }
        };
        self.remember(&info);
        let st = self.state();
        Ok(self.reported_attr(&st, ino, &info))
    }

    /// Lists a directory, with attributes (for readdirplus), `.` and `..` excluded.
    pub async fn list(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        if ino == ROOT {
            let users = self.users().await?;
            let mut out = Vec::with_capacity(users.len());
            for user in users {
                let (fino, info) = {
                    let mut st = self.state();
                    let fino = st.tree.user_folder(&user);
                    (fino, st.tree.get(fino).and_then(|n| n.info.clone()))
                };
                let attr = match info {
                    Some(info) => self.info_attr(fino, &info),
                    None => self.folder_default_attr(fino, &user),
                };
                out.push(DirEntry { name: user, attr });
            }
            return Ok(out);
        }
        let dir = self.dir(ino)?;
        let files = self.entries(&dir).await?;
        let mut st = self.state();
        st.tree.reserve_listing(ino, files.len());
        let mut out = std::collections::BTreeMap::new();
        for (name, info) in files.iter() {
            if let Some(fino) = st.tree.place(info) {
                out.insert(name.clone(), self.reported_attr(&st, fino, info));
            }
        }
        // Files created here and not uploaded yet.
        let local: Vec<u64> = st
            .staged
            .keys()
            .copied()
            .filter(|i| st.tree.is_local(*i))
            .collect();
        for fino in local {
            let Some(node) = st.tree.get(fino).filter(|n| n.parent == ino && !n.gone) else {
                continue;
            };
            if let Some(info) = node.info.clone() {
                out.insert(node.name.clone(), self.reported_attr(&st, fino, &info));
            }
        }
        Ok(out
            .into_iter()
            .map(|(name, attr)| DirEntry { name, attr })
            .collect())
    }

    /// Entry `e` of the listing of directory `parent`, as it stands now: its attributes if
    /// the name still leads to the same inode with attributes the mount is keeping
    /// current (events update them), so the kernel may keep both; `None` if the listing
    /// snapshot is older than a change of that name.
    pub fn current_entry(&self, parent: u64, e: &DirEntry) -> Option<Attr> {
        let st = self.state();
        let ino = st.tree.child(parent, &e.name)?;
        let node = st.tree.get(ino).filter(|n| ino == e.attr.ino && !n.gone)?;
        let info = node.fresh_info()?;
        Some(self.reported_attr(&st, ino, info))
    }

    /// Opens a directory. What opening must report (not a directory, gone, a listing the
    /// server refuses) it reports here. A directory whose listing had to be fetched has its
    /// entries taken now; one whose listing is cached has them taken at the first read:
    /// while its own cache of the directory is valid the kernel reads none, and `ls` of a
    /// cached folder of 10,000 files then costs no snapshot of them.
    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        let cached = ino != ROOT && {
            let key = self.dir(ino)?.key();
            self.listings().get(&key).is_some()
        };
        let entries = if cached {
            tokio::sync::OnceCell::new()
        } else {
            tokio::sync::OnceCell::new_with(Some(Arc::new(self.list(ino).await?)))
        };
        Ok(self.insert_handle(Handle::Dir(Arc::new(OpenDir { ino, entries }))))
    }

    /// The entries of an open directory, taken at its open or first read and kept, so
    /// paging through them is consistent.
    pub async fn dir_entries(&self, fh: u64) -> FsResult<Arc<Vec<DirEntry>>> {
        let open = match self.handles().get(&fh) {
            Some(Handle::Dir(d)) => d.clone(),
            _ => return Err(FsError::BadHandle),
        };
        open.entries
            .get_or_try_init(|| async { self.list(open.ino).await.map(Arc::new) })
            .await
            .cloned()
    }

    /// A reply is about to give the kernel `a`, as an entry (a lookup it holds) or as
    /// attributes only. Recorded before the reply goes (see [`told`]).
    pub fn telling(&self, a: &Attr, entry: bool) {
        if a.kind != Kind::File {
            return;
        }
        let mut told = lock(&self.told);
        if entry {
            told.entry(a.ino, a.size);
        } else {
            told.attr(a.ino, a.size);
        }
    }

    /// Marks a reply carrying attributes as under way from before its attributes are
    /// worked out until it is sent (the guard's drop): an open meanwhile makes the
    /// kernel drop what it holds, since that reply's size may not be recorded yet.
    pub fn attr_reply(&self) -> AttrReply {
        self.attr_replies.fetch_add(1, Ordering::SeqCst);
        AttrReply(self.attr_replies.clone())
    }

    /// The kernel may not have dropped the attributes of `ino` an open asked it to.
    pub fn refresh_failed(&self, ino: u64) {
        lock(&self.told).unknown(ino);
    }

    /// The kernel dropped the attributes of `ino` an open asked it to: later opens of the
    /// version it pinned reply at once.
    pub fn refresh_landed(&self, ino: u64) {
        if let Some(p) = self.state().pinned.get_mut(&ino) {
            p.refreshing = false;
        }
    }

    /// The kernel gave back `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        lock(&self.told).forget(ino, n);
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles().remove(&fh);
    }

    /// Where a symbolic link points.
    pub async fn readlink(&self, ino: u64) -> FsResult<String> {
        let node = self.node(ino)?;
        if node.kind != EntryKind::Symlink {
            return Err(FsError::InvalidArgument("not a symbolic link".into()));
        }
        if let Some(target) = node.info.as_ref().and_then(|i| i.target.clone()) {
            return Ok(target);
        }
        let (owner, id) = node.entry().ok_or(FsError::NotFound)?;
        let info = self.remote.stat(owner, id).await?;
        self.remember(&info);
        info.target
            .ok_or_else(|| FsError::Io("the server gave a symbolic link no target".into()))
    }

    /// access(2): writing only in one's own tree; others' entries as their "other" bits
    /// allow; executing a file needs an execute bit.
    pub async fn access(&self, ino: u64, read: bool, write: bool, exec: bool) -> FsResult<()> {
        let attr = self.getattr(ino).await?;
        let node = self.node(ino)?;
        let own = node.owner.as_deref() == Some(self.user.as_str());
        if write && !own {
            return Err(FsError::PermissionDenied);
        }
        let other = |bit: u16| attr.perm & bit != 0;
        if !own && ino != ROOT && ((read && !other(0o004)) || (exec && !other(0o001))) {
            return Err(FsError::PermissionDenied);
        }
        if exec && attr.kind == Kind::File && attr.perm & 0o111 == 0 {
            return Err(FsError::PermissionDenied);
        }
        Ok(())
    }

    pub async fn statfs(&self) -> FsResult<Space> {
        Ok(self.remote.statfs().await?)
    }
}

#[cfg(test)]
mod tests;
