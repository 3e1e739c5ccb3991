//! Writes to one's own files are staged locally and uploaded on flush/fsync.
//!
//! One [`StagedWrite`] per inode, shared by every handle open on it, so two descriptors
//! of one file see each other's writes as on a local disk. `close()` (flush) uploads the
//! whole staged content if anything changed and returns only once the server committed it,
//! with the server's error if it did not. Once a `close()` or `fsync()` has reported a
//! failure, only another `close()` or `fsync()` (which reports its own outcome) uploads the
//! file again: the last release, which has no caller to tell, does not retry. A staged file
//! whose upload never succeeded is not deleted: on the last release it is moved to the
//! `failed/` directory and its path is logged.
//!
//! Small content lives in memory (up to [`MEMORY_FILE`] per file, within a budget shared
//! by all files) and goes up in one round trip; larger content spills to a temp file in
//! the mount's staging directory, named by a sidecar (see `staging.rs`).
//!
//! Opening an existing file without `O_TRUNC` does not download it. The staged file is
//! *based* on the version current at open (a pinned server handle) and records how much
//! of it the writer has overwritten from byte 0 on. Rewriting a file from the start —
//! `fio`, `dd conv=notrunc`, many databases' first pass — therefore never fetches it. The
//! base is fetched ("materialized") only when something needs bytes the writer has not
//! written: a read past the overwritten prefix, a write beyond it, or an upload while the
//! prefix is shorter than the file.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::error::{FsError, FsResult};
use super::remote::AttrChange;
use super::staging;
use super::stream::StreamState;

/// Largest staged content kept in memory; beyond it, a temp file.
pub const MEMORY_FILE: u64 = 1 << 20;
/// Bytes fetched per read while materializing a base.
const BASE_BLOCK: u64 = 1 << 20;

/// Memory shared by all in-memory staged files.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicU64,
    limit: u64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> MemoryBudget {
        MemoryBudget {
            used: AtomicU64::new(0),
            limit,
        }
    }

    fn take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.limit).then_some(u + n)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// The version a staged file is based on, read on demand.
pub trait Base: Send + Sync {
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> Pin<Box<dyn Future<Output = FsResult<Bytes>> + Send + '_>>;
    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// What of the base is still needed: bytes `prefix..end` (the writer has overwritten
/// everything before `prefix`; truncation cut everything from `end` on).
#[derive(Debug, Clone, Copy)]
struct Lazy {
    prefix: u64,
    end: u64,
}

enum Backing {
    /// `reserved` bytes of the memory budget are held for `data`.
    Memory {
        data: Vec<u8>,
        reserved: u64,
    },
    File {
        file: File,
        path: PathBuf,
    },
}

/// Staged content ready for upload.
pub enum Content {
    Memory(Bytes),
    File(PathBuf),
}

#[derive(Debug)]
struct State {
    /// Name in the user's folder (changes on rename).
    name: String,
    size: u64,
    /// Bumped by every change; an upload is current if nothing changed since it started.
    changes: u64,
    uploaded: u64,
    /// Open handles on this staged file.
    refs: usize,
    /// Unlinked while open: writes go nowhere, as on a local disk.
    unlinked: bool,
    /// A `close()` or `fsync()` reported that the staged content could not be uploaded,
    /// and no upload succeeded since: only another such caller may try again.
    failure_reported: bool,
    /// Bytes a stream carried could not be brought back (see `stream.rs`): the staged
    /// content is incomplete and is never uploaded.
    broken: Option<String>,
}

pub struct StagedWrite {
    backing: Mutex<Backing>,
    dir: PathBuf,
    budget: Arc<MemoryBudget>,
    state: Mutex<State>,
    lazy: Mutex<Option<Lazy>>,
    base: tokio::sync::Mutex<Option<Arc<dyn Base>>>,
    /// Serialises uploads of this file.
    pub upload_lock: tokio::sync::Mutex<()>,
    /// The streamed upload, if any (see `stream.rs`). std `Mutex`: never held across an
    /// await; `stream_order` keeps feeds in write order.
    pub stream: Mutex<StreamState>,
    pub stream_order: tokio::sync::Mutex<()>,
    /// Mode and times set on the file while its content is not uploaded: the upload
    /// carries them (`cp -p` sets them before it closes).
    attrs: Mutex<AttrChange>,
    /// When the content last changed here (nanoseconds since the epoch): the
    /// modification time shown meanwhile and given to the upload, so that the file's
    /// mtime does not move when the upload commits it.
    written_ns: std::sync::atomic::AtomicI64,
    /// Becomes true once the last descriptor's release is done ([`StagedWrite::finish`]):
    /// an open that finds this file being released waits for it instead of joining it.
    finished: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for StagedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedWrite")
            .field("name", &self.name())
            .finish()
    }
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl StagedWrite {
    /// A new empty staged file. `dirty` says whether an empty upload is due even without
    /// writes (a newly created or truncated file).
    pub fn create(dir: &Path, name: &str, dirty: bool, budget: Arc<MemoryBudget>) -> StagedWrite {
        StagedWrite::new(
            dir,
            name,
            budget,
            Backing::Memory {
                data: Vec::new(),
                reserved: 0,
            },
            0,
            u64::from(dirty),
        )
    }

    /// A staged file with the content of `base` (`size` bytes), fetched only if needed.
    pub fn based_on(
        dir: &Path,
        name: &str,
        base: Arc<dyn Base>,
        size: u64,
        budget: Arc<MemoryBudget>,
    ) -> FsResult<StagedWrite> {
        let backing = if size <= MEMORY_FILE && budget.take(size) {
            Backing::Memory {
                data: vec![0; size as usize],
                reserved: size,
            }
        } else {
            let (file, path) = temp_file(dir, name)?;
            file.set_len(size)?;
            Backing::File { file, path }
        };
        let mut staged = StagedWrite::new(dir, name, budget, backing, size, 0);
        if size > 0 {
            *guard(&staged.lazy) = Some(Lazy {
                prefix: 0,
                end: size,
            });
            *staged.base.get_mut() = Some(base);
        }
        Ok(staged)
    }

    fn new(
        dir: &Path,
        name: &str,
        budget: Arc<MemoryBudget>,
        backing: Backing,
        size: u64,
        changes: u64,
    ) -> StagedWrite {
        StagedWrite {
            backing: Mutex::new(backing),
            dir: dir.to_path_buf(),
            budget,
            state: Mutex::new(State {
                name: name.to_string(),
                size,
                changes,
                uploaded: 0,
                refs: 0,
                unlinked: false,
                failure_reported: false,
                broken: None,
            }),
            lazy: Mutex::new(None),
            base: tokio::sync::Mutex::new(None),
            upload_lock: tokio::sync::Mutex::new(()),
            stream: Mutex::new(StreamState::Eligible),
            stream_order: tokio::sync::Mutex::new(()),
            attrs: Mutex::new(AttrChange::default()),
            written_ns: std::sync::atomic::AtomicI64::new(now_ns()),
            finished: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Whether a stream carries part of the content (which the staged content then
    /// does not hold).
    pub fn streaming(&self) -> bool {
        matches!(*guard(&self.stream), StreamState::Active { .. })
    }

    /// Whether a truncation to `size` cuts into bytes a stream carries.
    pub fn truncate_cuts_stream(&self, size: u64) -> bool {
        matches!(*guard(&self.stream), StreamState::Active { next, .. } if size < next)
    }

    /// Stops streaming (the stream's task then aborts its server-side upload).
    pub fn stop_stream(&self) {
        *guard(&self.stream) = StreamState::Off;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        guard(&self.state)
    }

    pub fn name(&self) -> String {
        self.state().name.clone()
    }

    pub fn set_name(&self, name: &str) {
        self.state().name = name.to_string();
        if let Backing::File { path, .. } = &*guard(&self.backing) {
            if let Err(e) = staging::record_name(path, name) {
                tracing::warn!(path = %path.display(), file = name, error = %e, "cannot record a staged file's new name");
            }
        }
    }

    pub fn size(&self) -> u64 {
        self.state().size
    }

    /// When the content last changed here.
    pub fn written_ns(&self) -> i64 {
        self.written_ns.load(Ordering::Acquire)
    }

    fn touch(&self) {
        self.written_ns.store(now_ns(), Ordering::Release);
    }

    /// Mode and times to be set with the next upload.
    pub fn pending_attrs(&self) -> AttrChange {
        *guard(&self.attrs)
    }

    /// Keeps `change` for the next upload (over what was kept before).
    pub fn set_pending_attrs(&self, change: AttrChange) {
        let mut a = guard(&self.attrs);
        a.mode = change.mode.or(a.mode);
        a.atime_ns = change.atime_ns.or(a.atime_ns);
        a.mtime_ns = change.mtime_ns.or(a.mtime_ns);
    }

    /// An upload set `sent`: what was not changed since is done.
    pub fn clear_pending_attrs(&self, sent: &AttrChange) {
        let mut a = guard(&self.attrs);
        if a.mode == sent.mode {
            a.mode = None;
        }
        if a.atime_ns == sent.atime_ns {
            a.atime_ns = None;
        }
        if a.mtime_ns == sent.mtime_ns {
            a.mtime_ns = None;
        }
    }

    pub fn acquire(&self) {
        self.state().refs += 1;
    }

    pub fn refs(&self) -> usize {
        self.state().refs
    }

    /// Whether the content is in memory (tests).
    pub fn in_memory(&self) -> bool {
        matches!(*guard(&self.backing), Backing::Memory { .. })
    }

    /// The file was deleted: nothing of it is to be uploaded any more.
    pub fn unlink(&self) {
        self.stop_stream();
        let mut s = self.state();
        s.unlinked = true;
        s.uploaded = s.changes;
    }

    /// Takes one more reference unless the last one is gone: a staged file whose last
    /// descriptor is being released uploads what it holds, and an open that joined it now
    /// would have its truncation or first writes uploaded as a version of their own.
    pub fn try_acquire(&self) -> bool {
        let mut s = self.state();
        if s.refs == 0 {
            return false;
        }
        s.refs += 1;
        true
    }

    /// Waits until [`StagedWrite::finish`] has run.
    pub async fn wait_finished(&self) {
        let mut rx = self.finished.subscribe();
        // An error means the sender is gone, i.e. so is the staged file.
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Drops one reference; true when it was the last.
    pub fn release(&self) -> bool {
        let mut s = self.state();
        s.refs = s.refs.saturating_sub(1);
        s.refs == 0
    }

    /// Moves in-memory content to a temp file (sparse beyond what was written).
    fn spill<'a>(&self, backing: &'a mut Backing) -> FsResult<&'a File> {
        if let Backing::Memory { data, reserved } = backing {
            let (file, path) = temp_file(&self.dir, &self.name())?;
            file.write_all_at(data, 0)?;
            self.budget.give(*reserved);
            *backing = Backing::File { file, path };
        }
        match backing {
            Backing::File { file, .. } => Ok(file),
            Backing::Memory { .. } => Err(FsError::Io("staged file lost its backing".into())),
        }
    }

    /// In-memory content grown to at least `len`, if that fits its limit and the budget.
    fn memory_grown<'a>(&self, backing: &'a mut Backing, len: u64) -> Option<&'a mut Vec<u8>> {
        let Backing::Memory { data, reserved } = backing else {
            return None;
        };
        if len > MEMORY_FILE || (len > *reserved && !self.budget.take(len - *reserved)) {
            return None;
        }
        *reserved = (*reserved).max(len);
        if (data.len() as u64) < len {
            data.resize(len as usize, 0);
        }
        Some(data)
    }

    /// Writes into the backing store, spilling memory to a temp file when it outgrows
    /// its limit or the budget.
    fn put(&self, offset: u64, data: &[u8]) -> FsResult<()> {
        let end = offset + data.len() as u64;
        let mut backing = guard(&self.backing);
        if let Some(mem) = self.memory_grown(&mut backing, end) {
            mem[offset as usize..end as usize].copy_from_slice(data);
            return Ok(());
        }
        Ok(self.spill(&mut backing)?.write_all_at(data, offset)?)
    }

    fn set_len(&self, size: u64) -> FsResult<()> {
        let mut backing = guard(&self.backing);
        if let Backing::Memory { data, .. } = &mut *backing {
            if size <= data.len() as u64 {
                data.truncate(size as usize);
                return Ok(());
            }
        }
        if self.memory_grown(&mut backing, size).is_some() {
            return Ok(());
        }
        Ok(self.spill(&mut backing)?.set_len(size)?)
    }

    /// Fetches whatever of the base is still needed, then lets the base go.
    pub async fn materialize(&self) -> FsResult<()> {
        let mut base = self.base.lock().await;
        let mut pos = 0u64;
        loop {
            let Some(lazy) = *guard(&self.lazy) else {
                break;
            };
            pos = pos.max(lazy.prefix);
            if pos >= lazy.end {
                break;
            }
            let Some(b) = base.as_ref() else {
                return Err(FsError::Io("the base of a staged file is gone".into()));
            };
            let len = BASE_BLOCK.min(lazy.end - pos) as u32;
            let data = b.read(pos, len).await?;
            if data.is_empty() {
                return Err(FsError::Io(format!(
                    "{}: the server's copy ended at {pos} of {} bytes",
                    self.name(),
                    lazy.end
                )));
            }
            self.fill(pos, &data)?;
            pos += data.len() as u64;
        }
        *guard(&self.lazy) = None;
        close(&mut base).await;
        Ok(())
    }

    /// Lets the base go if nothing of it is needed any more (after the last release).
    pub async fn close_base(&self) {
        close(&mut *self.base.lock().await).await;
    }

    /// Writes base bytes where the writer has not written (under the lazy lock, so a
    /// concurrent write either comes after and wins, or moved the prefix first).
    fn fill(&self, offset: u64, data: &[u8]) -> FsResult<()> {
        let lazy = guard(&self.lazy);
        let Some(l) = *lazy else {
            return Ok(());
        };
        let from = offset.max(l.prefix);
        let to = (offset + data.len() as u64).min(l.end);
        if from < to {
            let slice = &data[(from - offset) as usize..(to - offset) as usize];
            self.put(from, slice)?;
        }
        Ok(())
    }

    /// A write at `offset` of `len` bytes that the file's stream took: the staged
    /// content does not hold it (see `stream.rs`), everything else is as for
    /// [`StagedWrite::write`].
    pub fn write_streamed(&self, offset: u64, len: u64) {
        {
            let mut lazy = guard(&self.lazy);
            if let Some(l) = &mut *lazy {
                // A stream writes from byte 0 on, so it never passes what it overwrote.
                if offset <= l.prefix {
                    l.prefix = l.prefix.max(offset + len);
                    if l.prefix >= l.end {
                        *lazy = None;
                    }
                }
            }
        }
        guard(&self.attrs).mtime_ns = None;
        self.touch();
        let mut s = self.state();
        s.size = s.size.max(offset + len);
        s.changes += 1;
    }

    /// Bytes a stream carried, brought back into the staged content.
    pub fn fill_streamed(&self, offset: u64, data: &[u8]) -> FsResult<()> {
        self.put(offset, data)
    }

    /// The stream's bytes could not be brought back: the staged content is incomplete.
    pub fn set_broken(&self, why: &str) {
        self.state().broken = Some(why.to_string());
    }

    /// Why the staged content is incomplete, if it is.
    pub fn broken(&self) -> Option<String> {
        self.state().broken.clone()
    }

    /// The whole content is now the server's version that `base` reads (a stream just
    /// committed it, and the staged content never held it): the staged content is
    /// emptied, and what is read or kept of the file comes from `base`, as for
    /// [`StagedWrite::based_on`].
    pub async fn rebase(&self, base: Arc<dyn Base>) {
        let mut held = self.base.lock().await;
        close(&mut held).await;
        let size = self.size();
        {
            let mut backing = guard(&self.backing);
            match &mut *backing {
                Backing::Memory { data, reserved } => {
                    self.budget.give(*reserved);
                    *reserved = 0;
                    *data = Vec::new();
                }
                Backing::File { file, path } => {
                    if let Err(e) = file.set_len(0) {
                        tracing::debug!(path = %path.display(), error = %e, "cannot empty a staged file");
                    }
                }
            }
        }
        if size > 0 {
            *guard(&self.lazy) = Some(Lazy {
                prefix: 0,
                end: size,
            });
            *held = Some(base);
        }
    }

    pub async fn write(&self, offset: u64, data: &[u8]) -> FsResult<u32> {
        let len = data.len() as u64;
        if len == 0 {
            return Ok(0);
        }
        loop {
            {
                let mut lazy = guard(&self.lazy);
                match &mut *lazy {
                    None => break,
                    Some(l) if offset <= l.prefix => {
                        l.prefix = l.prefix.max(offset + len);
                        if l.prefix >= l.end {
                            *lazy = None;
                        }
                        break;
                    }
                    Some(_) => {}
                }
            }
            self.materialize().await?;
        }
        self.put(offset, data)?;
        guard(&self.attrs).mtime_ns = None;
        self.touch();
        let mut s = self.state();
        s.size = s.size.max(offset + len);
        s.changes += 1;
        Ok(data.len() as u32)
    }

    /// Reads staged content. While the file is based on a server version, the part of
    /// the range the writer has not written comes from that version directly: a read
    /// never downloads the whole file.
    pub async fn read(&self, offset: u64, len: u32) -> FsResult<Vec<u8>> {
        let size = self.size();
        if offset >= size {
            return Ok(Vec::new());
        }
        let len = u64::from(len).min(size - offset);
        let end = offset + len;
        let untouched = |l: &Lazy| (offset.max(l.prefix), end.min(l.end));
        let needs_base = guard(&self.lazy).is_some_and(|l| {
            let (from, to) = untouched(&l);
            from < to
        });
        if !needs_base {
            return self.read_backing(offset, len as usize);
        }
        // The base lock keeps the base from being let go meanwhile.
        let base = self.base.lock().await;
        let Some((from, to)) = guard(&self.lazy).map(|l| untouched(&l)) else {
            // Materialized meanwhile: all of it is here now.
            drop(base);
            return self.read_backing(offset, len as usize);
        };
        if from >= to {
            drop(base);
            return self.read_backing(offset, len as usize);
        }
        let Some(b) = base.as_ref() else {
            return Err(FsError::Io("the base of a staged file is gone".into()));
        };
        let mut fetched = Vec::with_capacity((to - from) as usize);
        while (fetched.len() as u64) < to - from {
            let pos = from + fetched.len() as u64;
            let want = (to - pos).min(BASE_BLOCK) as u32;
            let data = b.read(pos, want).await?;
            if data.is_empty() {
                return Err(FsError::Io(format!(
                    "{}: the server's copy ended at {pos} of {to} bytes",
                    self.name()
                )));
            }
            fetched.extend_from_slice(&data);
        }
        let mut buf = self.read_backing(offset, len as usize)?;
        // What was written meanwhile (the prefix grew) is the writer's, not the base's.
        if let Some(l) = *guard(&self.lazy) {
            let (keep_from, keep_to) = (from.max(l.prefix), to.min(l.end));
            if keep_from < keep_to {
                let src = &fetched[(keep_from - from) as usize..(keep_to - from) as usize];
                buf[(keep_from - offset) as usize..(keep_to - offset) as usize]
                    .copy_from_slice(src);
            }
        }
        drop(base);
        Ok(buf)
    }

    /// `len` bytes at `offset` of the backing store (zeros past what it holds).
    fn read_backing(&self, offset: u64, len: usize) -> FsResult<Vec<u8>> {
        let mut buf = vec![0u8; len];
        match &*guard(&self.backing) {
            Backing::Memory { data, .. } => {
                let start = (offset as usize).min(data.len());
                let stop = (offset as usize + len).min(data.len());
                buf[..stop - start].copy_from_slice(&data[start..stop]);
            }
            Backing::File { file, .. } => {
                // Short only if the file is shorter than the staged size: zeros.
                let mut done = 0;
                while done < len {
                    match file.read_at(&mut buf[done..], offset + done as u64)? {
                        0 => break,
                        n => done += n,
                    }
                }
            }
        }
        Ok(buf)
    }

    pub fn truncate(&self, size: u64) -> FsResult<()> {
        {
            let mut s = guard(&self.stream);
            // A stream survives a size change that leaves what it carries intact (`fio`
            // and some copiers set the final size first); it commits only if it ends up
            // covering the whole file. Cutting into streamed bytes ends it.
            let keep = match &*s {
                StreamState::Eligible => true,
                StreamState::Pending { next, .. } | StreamState::Active { next, .. } => {
                    size >= *next
                }
                StreamState::Off => false,
            };
            if !keep {
                *s = StreamState::Off;
            }
        }
        {
            let mut lazy = guard(&self.lazy);
            if let Some(l) = &mut *lazy {
                l.end = l.end.min(size);
                l.prefix = l.prefix.min(size);
                if l.prefix >= l.end {
                    *lazy = None;
                }
            }
        }
        self.set_len(size)?;
        guard(&self.attrs).mtime_ns = None;
        self.touch();
        let mut s = self.state();
        s.size = size;
        s.changes += 1;
        Ok(())
    }

    /// Whether the staged content differs from what the server has.
    pub fn dirty(&self) -> bool {
        let s = self.state();
        !s.unlinked && s.changes != s.uploaded
    }

    /// The change counter before an upload starts; pass it to [`StagedWrite::mark_uploaded`].
    pub fn changes(&self) -> u64 {
        self.state().changes
    }

    pub fn mark_uploaded(&self, changes: u64) {
        let mut s = self.state();
        s.uploaded = s.uploaded.max(changes);
        s.failure_reported = false;
    }

    /// A `close()` or `fsync()` is returning the failure of this file's upload.
    pub fn report_failure(&self) {
        self.state().failure_reported = true;
    }

    /// Whether the last upload a caller waited for failed (and none succeeded since).
    pub fn failure_reported(&self) -> bool {
        self.state().failure_reported
    }

    /// The content to upload (after [`StagedWrite::materialize`]).
    pub fn content(&self) -> Content {
        match &*guard(&self.backing) {
            Backing::Memory { data, .. } => Content::Memory(Bytes::copy_from_slice(data)),
            Backing::File { path, .. } => Content::File(path.clone()),
        }
    }

    /// Called after the last release: drops the staged content, or keeps it in
    /// `failed_dir` when it never reached the server.
    pub fn finish(&self, failed_dir: &Path) {
        let mut backing = guard(&self.backing);
        let broken = self.broken();
        if let (true, Some(why)) = (self.dirty(), &broken) {
            tracing::error!(
                file = %self.name(),
                cause = %why,
                "upload never succeeded, and part of the data was only on the server: \
                 nothing of it is kept locally"
            );
            if let Backing::File { path, .. } = &*backing {
                if let Err(e) = staging::remove(path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove staged file");
                }
            }
        } else if self.dirty() {
            let name = self.name();
            let kept = match &*backing {
                Backing::Memory { data, .. } => {
                    std::fs::create_dir_all(failed_dir).and_then(|()| {
                        let keep = staging::failed_path(failed_dir, &name);
                        std::fs::write(&keep, data).map(|()| keep)
                    })
                }
                Backing::File { path, .. } => staging::keep(path, &name, failed_dir),
            };
            match kept {
                Ok(keep) => tracing::error!(
                    file = %name,
                    kept = %keep.display(),
                    "upload never succeeded; the data is kept locally"
                ),
                Err(e) => tracing::error!(
                    file = %name,
                    error = %e,
                    "upload never succeeded and the data could not be kept"
                ),
            }
        } else if let Backing::File { path, .. } = &*backing {
            if let Err(e) = staging::remove(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove staged file");
            }
        }
        if let Backing::Memory { data, reserved } = &mut *backing {
            self.budget.give(*reserved);
            *reserved = 0;
            *data = Vec::new();
        }
        self.finished.send_replace(true);
    }
}

impl Drop for StagedWrite {
    fn drop(&mut self) {
        if let Backing::Memory { reserved, .. } = &*guard(&self.backing) {
            self.budget.give(*reserved);
        }
    }
}

fn now_ns() -> i64 {
    super::ns_of(std::time::SystemTime::now())
}

async fn close(base: &mut Option<Arc<dyn Base>>) {
    if let Some(b) = base.take() {
        b.close().await;
    }
}

/// A new staged file in `dir`, with its sidecar naming it `name`.
fn temp_file(dir: &Path, name: &str) -> FsResult<(File, PathBuf)> {
    let tmp = tempfile::Builder::new()
        .prefix("staged-")
        .tempfile_in(dir)?;
    let (file, path) = tmp.keep().map_err(|e| FsError::Io(e.to_string()))?;
    if let Err(e) = staging::record_name(&path, name) {
        let _ = staging::remove(&path);
        return Err(e.into());
    }
    Ok((file, path))
}
