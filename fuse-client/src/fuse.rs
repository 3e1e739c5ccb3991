//! The thin FUSE adapter: each kernel callback calls the filesystem core and answers as
//! soon as it completes. A call that can finish at once (a cached lookup, a write into a
//! staged file, a read from prefetched data) is answered from the FUSE thread itself, with
//! no hop to another thread; one that waits (for the network) continues as a task on the
//! tokio runtime, so a slow read never blocks `ls`. Errors become errnos through [`errno`],
//! the one place that decides them.

use std::ffi::OsStr;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::fs::{Attr, DirEntry, FsCore, FsError, Invalidation, Kind, OpenMode, Remote, SetAttr};

/// How long the kernel may trust an entry or attributes without asking. Long, because the
/// server pushes changes and the mount invalidates them at once.
const TTL: Duration = Duration::from_secs(10);
/// Size the kernel may read or write in one request, and `st_blksize` (which makes `cp`
/// use large buffers).
pub const IO_SIZE: u32 = 1 << 20;

/// The errno for each core error.
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::PermissionDenied => Errno::EACCES,
        FsError::NotPermitted => Errno::EPERM,
        FsError::InvalidName(_) | FsError::InvalidArgument(_) => Errno::EINVAL,
        FsError::Exists => Errno::EEXIST,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::NameTooLong => Errno::ENAMETOOLONG,
        FsError::QuotaExceeded => Errno::EDQUOT,
        FsError::NoSpace => Errno::ENOSPC,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::BadHandle => Errno::EBADF,
        FsError::TooManyOpen => Errno::EMFILE,
        FsError::Stale | FsError::Io(_) => Errno::EIO,
    }
}

/// The errno of a failed operation `op`, logged once with its cause, except the plain
/// answers of a lookup (no such name, or not allowed to look).
pub fn failed(op: &'static str, e: &FsError) -> Errno {
    let errno = errno(e);
    let plain_lookup = op == "lookup"
        && matches!(
            e,
            FsError::NotFound | FsError::Exists | FsError::PermissionDenied
        );
    if !plain_lookup {
        tracing::info!(op, errno = i32::from(errno), error = %e, "operation failed");
    }
    errno
}

pub struct FuseAdapter<R: Remote> {
    core: Arc<FsCore<R>>,
    rt: tokio::runtime::Handle,
    uid: u32,
    gid: u32,
    /// Puts file content into the kernel's cache; set once the session exists.
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// Makes the kernel forget attributes before an open is answered; set with `notifier`.
    invalidator: Arc<OnceLock<Invalidator>>,
}

impl<R: Remote> FuseAdapter<R> {
    pub fn new(
        core: Arc<FsCore<R>>,
        rt: tokio::runtime::Handle,
        notifier: Arc<OnceLock<fuser::Notifier>>,
        invalidator: Arc<OnceLock<Invalidator>>,
    ) -> Self {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FuseAdapter {
            core,
            rt,
            uid,
            gid,
            notifier,
            invalidator,
        }
    }

    /// Runs `fut` from the FUSE thread; see [`drive`].
    fn drive<Fut>(&self, fut: Fut)
    where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        // One operation, one deadline, however many calls it makes.
        let core = self.core.clone();
        drive(&self.rt, async move { core.operation(fut).await });
    }

    /// Runs `f` with the core; `f` sends the reply.
    fn run<F, Fut>(&self, f: F)
    where
        F: FnOnce(Arc<FsCore<R>>, u32, u32) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.drive(f(self.core.clone(), self.uid, self.gid));
    }

    /// Runs a core call whose success is an empty reply.
    fn run_empty<F, Fut>(&self, op: &'static str, reply: ReplyEmpty, f: F)
    where
        F: FnOnce(Arc<FsCore<R>>) -> Fut,
        Fut: std::future::Future<Output = Result<(), FsError>> + Send + 'static,
    {
        let fut = f(self.core.clone());
        self.drive(async move {
            match fut.await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(failed(op, &e)),
            }
        });
    }

    /// Runs a core call that answers with an entry.
    fn run_entry<F, Fut>(&self, op: &'static str, reply: ReplyEntry, f: F)
    where
        F: FnOnce(Arc<FsCore<R>>) -> Fut,
        Fut: std::future::Future<Output = Result<Attr, FsError>> + Send + 'static,
    {
        self.run_telling(op, true, f, move |answer| match answer {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        });
    }

    /// Runs a core call that answers with attributes.
    fn run_attr<F, Fut>(&self, op: &'static str, reply: ReplyAttr, f: F)
    where
        F: FnOnce(Arc<FsCore<R>>) -> Fut,
        Fut: std::future::Future<Output = Result<Attr, FsError>> + Send + 'static,
    {
        self.run_telling(op, false, f, move |answer| match answer {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        });
    }

    /// Runs a core call whose answer carries attributes: guarded as a reply under way
    /// from before they are worked out, and recorded as told (an `entry` counts a
    /// lookup) before `send` hands them to the kernel.
    fn run_telling<F, Fut, S>(&self, op: &'static str, entry: bool, f: F, send: S)
    where
        F: FnOnce(Arc<FsCore<R>>) -> Fut,
        Fut: std::future::Future<Output = Result<Attr, FsError>> + Send + 'static,
        S: FnOnce(Result<FileAttr, Errno>) + Send + 'static,
    {
        let core = self.core.clone();
        let replying = self.core.attr_reply();
        let fut = f(self.core.clone());
        let (uid, gid) = (self.uid, self.gid);
        self.drive(async move {
            let _replying = replying;
            send(match fut.await {
                Ok(a) => {
                    core.telling(&a, entry);
                    Ok(attr(&a, uid, gid))
                }
                Err(e) => Err(failed(op, &e)),
            })
        });
    }
}

/// Polls `fut` once here; if it has to wait, it is parked until it is woken and only
/// then handed to the runtime, by its waker. The wake comes from the runtime thread that
/// received the reply, so the future continues right there: no other thread is woken
/// just to poll a future that can only be waiting. Futures must (and tokio's do)
/// re-register with the waker of their latest poll.
fn drive<Fut>(rt: &tokio::runtime::Handle, fut: Fut)
where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let _runtime = rt.enter();
    let mut fut: ParkedFuture = Box::pin(fut);
    let parked = Arc::new(Parked {
        rt: rt.clone(),
        state: Mutex::new(ParkedState::default()),
    });
    let waker = std::task::Waker::from(parked.clone());
    let mut cx = std::task::Context::from_waker(&waker);
    if fut.as_mut().poll(&mut cx).is_ready() {
        return;
    }
    let woken_meanwhile = {
        let mut state = parked.lock();
        if state.woken {
            Some(fut)
        } else {
            state.fut = Some(fut);
            None
        }
    };
    if let Some(fut) = woken_meanwhile {
        rt.spawn(fut);
    }
}

type ParkedFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// A callback's future waiting for its first wake (see [`drive`]).
struct Parked {
    rt: tokio::runtime::Handle,
    state: Mutex<ParkedState>,
}

#[derive(Default)]
struct ParkedState {
    /// The future, once its first poll has returned.
    fut: Option<ParkedFuture>,
    /// Woken during its first poll, before it was parked here.
    woken: bool,
}

impl Parked {
    fn lock(&self) -> std::sync::MutexGuard<'_, ParkedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::task::Wake for Parked {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let fut = {
            let mut state = self.lock();
            let fut = state.fut.take();
            if fut.is_none() {
                state.woken = true;
            }
            fut
        };
        // Later wakes find nothing: the runtime's task has registered its own waker.
        if let Some(fut) = fut {
            self.rt.spawn(fut);
        }
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
    }
}

fn attr(a: &Attr, uid: u32, gid: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: match a.kind {
            _ if a.unlinked => 0,
            Kind::Dir => 2,
            Kind::File | Kind::Symlink => 1,
        },
        uid,
        gid,
        rdev: 0,
        blksize: IO_SIZE,
        flags: 0,
    }
}

/// One page of a `readdir` answer from the entries of an open directory.
fn fill_dir<R: Remote>(
    core: &FsCore<R>,
    ino: u64,
    entries: &[DirEntry],
    offset: u64,
    mut reply: ReplyDirectory,
) {
    // The root's own parent is outside the mount; the kernel answers for it.
    let dots = [(ino, "."), (core.parent_of(ino), "..")];
    let all = dots
        .iter()
        .map(|(i, n)| (*i, FileType::Directory, *n))
        .chain(
            entries
                .iter()
                .map(|e| (e.attr.ino, file_type(e.attr.kind), e.name.as_str())),
        );
    for (i, (eino, kind, name)) in all.enumerate().skip(offset as usize) {
        if reply.add(INodeNo(eino), i as u64 + 1, kind, name) {
            break;
        }
    }
    reply.ok();
}

/// One page of a `readdirplus` answer from the entries of an open directory.
fn fill_dir_plus<R: Remote>(
    core: &FsCore<R>,
    ino: u64,
    entries: &[DirEntry],
    offset: u64,
    mut reply: ReplyDirectoryPlus,
    uid: u32,
    gid: u32,
) {
    // `.` and `..` with an attribute-less entry: the kernel does not look them up
    // from readdirplus (and must not take made-up attributes for theirs).
    let dir = |i: u64| Attr {
        ino: i,
        kind: Kind::Dir,
        size: 0,
        mtime: SystemTime::UNIX_EPOCH,
        atime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        perm: 0o555,
        unlinked: false,
    };
    let dots = [(".", dir(ino)), ("..", dir(core.parent_of(ino)))];
    for i in offset as usize.. {
        let (name, a, ttl) = match i.checked_sub(dots.len()) {
            None => (dots[i].0, dots[i].1.clone(), Duration::ZERO),
            Some(j) => {
                let Some(e) = entries.get(j) else { break };
                // The snapshot taken at the first read may be older than a rename or
                // unlink made since: the kernel keeps a name (and its attributes) only
                // while the mount's tree still says the same, as a lookup now would.
                match core.current_entry(ino, e) {
                    Some(now) => (e.name.as_str(), now, TTL),
                    None => (e.name.as_str(), e.attr.clone(), Duration::ZERO),
                }
            }
        };
        if reply.add(
            INodeNo(a.ino),
            i as u64 + 1,
            name,
            &ttl,
            &attr(&a, uid, gid),
            Generation(0),
        ) {
            break;
        }
        // In the reply, which the kernel reads whole (each entry a lookup it holds, or
        // gives back at once); `.` and `..` are not looked up.
        if i >= dots.len() {
            core.telling(&a, true);
        }
    }
    reply.ok();
}

fn name_str(name: &OsStr) -> Result<String, Errno> {
    name.to_str().map(str::to_string).ok_or(Errno::EINVAL)
}

fn time_or_now(t: Option<TimeOrNow>) -> Option<SystemTime> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    })
}

impl<R: Remote> Filesystem for FuseAdapter<R> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_READ
            // O_TRUNC arrives with open() instead of as a separate truncate, so replacing
            // a file never uploads an empty version in between.
            | InitFlags::FUSE_ATOMIC_O_TRUNC;
        let _ = config.add_capabilities(wanted & config.capabilities());
        let _ = config.set_max_write(IO_SIZE);
        if let Err(nearest) = config.set_max_readahead(IO_SIZE) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(_) => return reply.error(Errno::ENOENT),
        };
        self.run_entry("lookup", reply, move |core| async move {
            core.lookup(parent.0, &name).await
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.run_attr("getattr", reply, move |core| async move {
            core.getattr(ino.0).await
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Everything belongs to the mounting user: giving it to anyone else is refused.
        if uid.is_some_and(|u| u != self.uid) || gid.is_some_and(|g| g != self.gid) {
            return reply.error(failed("chown", &FsError::NotPermitted));
        }
        let set = SetAttr {
            size,
            mode,
            atime: time_or_now(atime),
            mtime: time_or_now(mtime),
        };
        self.run_attr("setattr", reply, move |core| async move {
            core.setattr(ino.0, set, fh.map(|f| f.0)).await
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.run(move |core, _, _| async move {
            match core.readlink(ino.0).await {
                Ok(target) => reply.data(target.as_bytes()),
                Err(e) => reply.error(failed("readlink", &e)),
            }
        });
    }

    /// Regular files only (an empty file, made at once); FIFOs, sockets and devices are
    /// not offered.
    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            return reply.error(failed("mknod", &FsError::NotPermitted));
        }
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.run_entry("mknod", reply, move |core| async move {
            core.mknod_file(parent.0, &name, mode & 0o7777).await
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.run_entry("mkdir", reply, move |core| async move {
            core.mkdir(parent.0, &name, mode & 0o7777).await
        });
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let (name, target) = match (name_str(link_name), name_str(target.as_os_str())) {
            (Ok(n), Ok(t)) => (n, t),
            _ => return reply.error(Errno::EINVAL),
        };
        self.run_entry("symlink", reply, move |core| async move {
            core.symlink(parent.0, &name, &target).await
        });
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(failed("link", &FsError::NotPermitted));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.run_empty("unlink", reply, move |core| async move {
            core.unlink(parent.0, &name).await
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.run_empty("rmdir", reply, move |core| async move {
            core.rmdir(parent.0, &name).await
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = match (name_str(name), name_str(newname)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return reply.error(Errno::EINVAL),
        };
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || !(flags - RenameFlags::RENAME_NOREPLACE).is_empty()
        {
            // RENAME_EXCHANGE (and RENAME_WHITEOUT): not offered.
            let e = FsError::InvalidArgument(format!("rename flags {:#x}", flags.bits()));
            return reply.error(failed("rename", &e));
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.run_empty("rename", reply, move |core| async move {
            core.rename(parent.0, &name, newparent.0, &newname, noreplace)
                .await
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mode = OpenMode {
            write: flags.acc_mode() != OpenAccMode::O_RDONLY,
            truncate: flags.0 & libc::O_TRUNC != 0,
        };
        let notifier = self.notifier.clone();
        let invalidator = self.invalidator.clone();
        self.run(move |core, _, _| async move {
            match core.open(ino.0, mode).await {
                Ok(o) => {
                    if o.refresh_attrs {
                        // Before the reply: reads through this descriptor stop at the
                        // size of its version, not at one the kernel kept from another.
                        // Behind what is queued: an invalidation landing during the first
                        // read would make the kernel skip cutting its size down to this
                        // version's at the read's short end (it pads with zeros instead).
                        let applied = match invalidator.get() {
                            Some(inv) => inv.apply(Invalidation::Attr { ino: ino.0 }).await,
                            None => false,
                        };
                        if applied {
                            core.refresh_landed(ino.0);
                        } else {
                            // It may still hold any size: the next open tries again.
                            core.refresh_failed(ino.0);
                        }
                    }
                    if let (Some(content), Some(n)) = (&o.content, notifier.get()) {
                        // A small file that came whole with the open: hand it to the
                        // kernel's cache now, so the read that follows is answered there
                        // instead of with another request. Best effort: if the kernel
                        // refuses, it asks with a read as usual.
                        let _ = n.store(ino, 0, content);
                    }
                    let mut f = if o.direct {
                        // Past the cache, which stays the other version's.
                        FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_KEEP_CACHE
                    } else if o.keep_cache {
                        FopenFlags::FOPEN_KEEP_CACHE
                    } else {
                        FopenFlags::empty()
                    };
                    if !mode.changes_file() {
                        // Nothing to upload when a read-only descriptor closes: spare the
                        // kernel the flush request it would wait for.
                        f |= FopenFlags::FOPEN_NOFLUSH;
                    }
                    reply.opened(FileHandle(o.fh), f)
                }
                Err(e) => reply.error(failed("open", &e)),
            }
        });
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let replying = self.core.attr_reply();
        self.run(move |core, uid, gid| async move {
            let _replying = replying;
            match core.create(parent.0, &name, mode & 0o7777).await {
                Ok((a, fh)) => {
                    core.telling(&a, true);
                    reply.created(
                        &TTL,
                        &attr(&a, uid, gid),
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    )
                }
                Err(e) => reply.error(failed("create", &e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.run(move |core, _, _| async move {
            match core.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(failed("read", &e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The one copy of the data out of the kernel's request buffer; a streamed upload
        // sends this very buffer. The kernel waits for each write's reply before sending a
        // writer's next one, so a write that has to wait keeps the writer's order.
        let data = bytes::Bytes::copy_from_slice(data);
        self.run(move |core, _, _| async move {
            match core.write_bytes(fh.0, offset, data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(failed("write", &e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.run_empty(
            "flush",
            reply,
            move |core| async move { core.flush(fh.0).await },
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.run_empty("release", reply, move |core| async move {
            core.release(fh.0).await
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.run_empty(
            "fsync",
            reply,
            move |core| async move { core.fsync(fh.0).await },
        );
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.run_empty("fsyncdir", reply, move |core| async move {
            core.fsync_dir().await
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.run(move |core, _, _| async move {
            // The kernel keeps what it read of a directory across opens: its own changes
            // reset that cache (a new inode version), others' change the directory's
            // mtime, whose event drops the kernel's attributes, and the kernel checks the
            // mtime at the start of every cached read (see `events`).
            let cached = FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE;
            match core.opendir(ino.0).await {
                Ok(fh) => reply.opened(FileHandle(fh), cached),
                Err(e) => reply.error(failed("opendir", &e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.run(move |core, _, _| async move {
            match core.dir_entries(fh.0).await {
                Ok(entries) => fill_dir(&core, ino.0, &entries, offset, reply),
                Err(e) => reply.error(failed("readdir", &e)),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let replying = self.core.attr_reply();
        self.run(move |core, uid, gid| async move {
            let _replying = replying;
            match core.dir_entries(fh.0).await {
                Ok(entries) => fill_dir_plus(&core, ino.0, &entries, offset, reply, uid, gid),
                Err(e) => reply.error(failed("readdirplus", &e)),
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.core.releasedir(fh.0);
        reply.ok();
    }

    /// No ioctls: ENOTTY, what a local file answers (`isatty()` asks on every open by
    /// many runtimes), without the default handler's log line per call.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.run(move |core, _, _| async move {
            match core.statfs().await {
                Ok(s) => {
                    let bsize = 4096u64;
                    let blocks = s.total / bsize;
                    let avail = (s.available / bsize).min(blocks);
                    // There is no inode table: each new file takes at least a block, so
                    // the free blocks bound the free inodes, and free never exceeds total.
                    let free_files = avail;
                    reply.statfs(
                        blocks,
                        avail,
                        avail,
                        s.files.saturating_add(free_files),
                        free_files,
                        bsize as u32,
                        255,
                        bsize as u32,
                    )
                }
                Err(e) => reply.error(failed("statfs", &e)),
            }
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let (read, write, exec) = (
            mask.contains(AccessFlags::R_OK),
            mask.contains(AccessFlags::W_OK),
            mask.contains(AccessFlags::X_OK),
        );
        self.run_empty("access", reply, move |core| async move {
            core.access(ino.0, read, write, exec).await
        });
    }
}

/// How long an open waits for its invalidation to be applied. The kernel applies one at
/// once unless it has to wait for pages being read, which this mount answers meanwhile.
const APPLY_WAIT: Duration = Duration::from_secs(5);

type InvalidationMsg = (Invalidation, Option<tokio::sync::oneshot::Sender<()>>);

/// Applies invalidations to the kernel in the order they are sent, from a thread of its
/// own: a notification can block while the kernel waits on a request the filesystem is
/// answering.
#[derive(Clone)]
pub struct Invalidator {
    tx: std::sync::mpsc::Sender<InvalidationMsg>,
}

impl Invalidator {
    pub fn spawn(notifier: fuser::Notifier) -> Invalidator {
        let (tx, rx) = std::sync::mpsc::channel::<InvalidationMsg>();
        let spawned = std::thread::Builder::new()
            .name("sharefs-inval".into())
            .spawn(move || {
                for (inv, done) in rx {
                    // ENOENT means the kernel had nothing cached: fine.
                    let _ = match &inv {
                        Invalidation::Entry { parent, name } => {
                            notifier.inval_entry(INodeNo(*parent), OsStr::new(name))
                        }
                        Invalidation::Inode { ino } => notifier.inval_inode(INodeNo(*ino), 0, 0),
                        Invalidation::Attr { ino } => notifier.inval_inode(INodeNo(*ino), -1, 0),
                    };
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the invalidation thread");
        }
        Invalidator { tx }
    }

    /// Queues `inv`; false once the thread is gone.
    pub fn send(&self, inv: Invalidation) -> bool {
        self.tx.send((inv, None)).is_ok()
    }

    /// Applies `inv` after everything queued before it, and returns once the kernel has
    /// (true), or after [`APPLY_WAIT`] (logged) or if the thread is gone (false).
    pub async fn apply(&self, inv: Invalidation) -> bool {
        let (done, applied) = tokio::sync::oneshot::channel();
        if self.tx.send((inv.clone(), Some(done))).is_err() {
            return false;
        }
        match tokio::time::timeout(APPLY_WAIT, applied).await {
            Ok(done) => done.is_ok(),
            Err(_) => {
                tracing::warn!(?inv, "the kernel did not apply an invalidation in time");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_expected_errnos() {
        let cases = [
            (FsError::NotFound, libc::ENOENT),
            (FsError::PermissionDenied, libc::EACCES),
            (FsError::NotPermitted, libc::EPERM),
            (FsError::QuotaExceeded, libc::EDQUOT),
            (FsError::NoSpace, libc::ENOSPC),
            (FsError::Io("x".into()), libc::EIO),
            (FsError::Stale, libc::EIO),
            (FsError::NameTooLong, libc::ENAMETOOLONG),
            (FsError::Exists, libc::EEXIST),
            (FsError::NotEmpty, libc::ENOTEMPTY),
            (FsError::NotDir, libc::ENOTDIR),
            (FsError::IsDir, libc::EISDIR),
            (FsError::InvalidArgument("x".into()), libc::EINVAL),
            (FsError::InvalidName("x".into()), libc::EINVAL),
        ];
        for (e, want) in cases {
            assert_eq!(i32::from(errno(&e)), want, "{e:?}");
        }
        let remote = |code| {
            FsError::from(crate::ClientError::Remote(
                sharefs_protocol::ErrorBody::new(code, "m"),
            ))
        };
        use sharefs_protocol::ErrorCode as C;
        assert_eq!(i32::from(errno(&remote(C::QuotaExceeded))), libc::EDQUOT);
        assert_eq!(i32::from(errno(&remote(C::NoSpace))), libc::ENOSPC);
        assert_eq!(i32::from(errno(&remote(C::PermissionDenied))), libc::EACCES);
        assert_eq!(i32::from(errno(&remote(C::NotFound))), libc::ENOENT);
        assert_eq!(i32::from(errno(&remote(C::Internal))), libc::EIO);
        for (code, want) in [
            (C::Exists, libc::EEXIST),
            (C::NotEmpty, libc::ENOTEMPTY),
            (C::NotADirectory, libc::ENOTDIR),
            (C::IsADirectory, libc::EISDIR),
            (C::InvalidArgument, libc::EINVAL),
            (C::NotPermitted, libc::EPERM),
            (C::NameTooLong, libc::ENAMETOOLONG),
            (C::Stale, libc::EIO),
            (C::TooManyOpen, libc::EMFILE),
        ] {
            assert_eq!(i32::from(errno(&remote(code))), want, "{code:?}");
        }
        let timeout = FsError::from(crate::ClientError::Timeout(Duration::from_secs(1)));
        assert_eq!(i32::from(errno(&timeout)), libc::EIO);
    }

    /// Every way a callback's future can complete: at once, woken during its first poll,
    /// woken later from a runtime thread, and woken from a thread outside the runtime.
    #[test]
    fn driven_futures_complete_however_they_are_woken() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (done, finished) = std::sync::mpsc::channel::<&str>();
        let d = done.clone();
        drive(rt.handle(), async move {
            let _ = d.send("ready");
        });
        let d = done.clone();
        drive(rt.handle(), async move {
            tokio::task::yield_now().await; // wakes itself inside the first poll
            let _ = d.send("self-woken");
        });
        let d = done.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        drive(rt.handle(), async move {
            let _ = rx.await;
            let _ = d.send("runtime-woken");
        });
        rt.spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = tx.send(());
        });
        let d = done.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        drive(rt.handle(), async move {
            let _ = rx.await;
            let _ = d.send("thread-woken");
        });
        std::thread::spawn(move || tx.send(()));
        let d = done;
        drive(rt.handle(), async move {
            tokio::time::sleep(Duration::from_millis(20)).await; // a timer, twice
            tokio::time::sleep(Duration::from_millis(1)).await;
            let _ = d.send("timer");
        });
        let mut got: Vec<&str> = (0..5)
            .map(|_| finished.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                "ready",
                "runtime-woken",
                "self-woken",
                "thread-woken",
                "timer"
            ]
        );
    }
}
