//! File storage: one directory per user holding its files' contents and an fsynced
//! append-only journal of their metadata.
//!
//! Layout under the data directory:
//! ```text
//! tmp/                               uploads being received (emptied at start)
//! files/<user>/snapshot.json         {"journal": n, "files": [FileMeta, ...]}
//! files/<user>/journal-<n>.jsonl     one JSON record per change since that snapshot
//! files/<user>/<version>.blob        content of one large file version
//! files/<user>/pack-<n>.dat          contents of small files, appended one after another
//! ```
//! A change is durable when its journal record is: the content is written and made durable
//! first (a blob renamed into place with its directory fsynced, or bytes appended to the
//! pack and fdatasynced), then the record is appended and the journal fdatasynced. One
//! exception, for speed: bytes appended over space the pack already has on disk are sent
//! to the device together with their record (`sync_file_range`), waited for, and made
//! durable by the journal's fdatasync, whose device cache flush covers every write
//! completed before it. Until that flush either may reach the disk without the other; a
//! record whose content did not is the journal's last, never acknowledged, and a load
//! drops it when the content does not match the record's hash. A crash
//! at any point leaves the old or the new state; a torn last record is cut off at the next
//! load, and blobs and packs that no record names are removed then. Blobs are named by a
//! version, so a new version never overwrites the old one, and readers that opened the old
//! content keep reading it (POSIX keeps unlinked files readable; pack bytes are never
//! rewritten in place).
//!
//! A small file costs one pack append and one journal append — one device cache flush
//! (two when the pack grows, once per 4 MiB), no new inode, no directory fsync — which is
//! what makes creating and deleting many small files cheap. Both files are kept ahead of their content with zeros (up to 1 MiB for a
//! journal, 4 MiB for a pack), so an append overwrites allocated space and its fdatasync
//! updates no inode; a reload takes the end of a journal from its last whole record and
//! the end of a pack from the last content a record names. When the journal holds more records than twice the folder's files it is folded
//! into a new snapshot (temp file, fsync, rename) that names a new, empty journal, so a
//! crash between the steps never replays old records over a newer snapshot; when more than half of the pack is
//! garbage (deleted or replaced contents) the live contents are copied into a new pack and
//! a snapshot switches to it. Both costs are amortised over at least as many changes as
//! they copy, so cost per change does not grow with the number of files.
//!
//! Folders written by earlier versions (one `<hash>.meta` JSON file per user file) are read
//! and folded into a snapshot on first load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sharefs_protocol::name::{check_file_lookup, check_file_name, check_user_name};
use sharefs_protocol::{FileInfo, Space};

use crate::cutoff::Cutoff;
use crate::error::{Result, ServerError};
use crate::fsutil;
use crate::reservations::{Reservation, Reservations};
use crate::space::{Claim, DiskSpace, RECORD_ROOM};

/// Contents up to this size go into the folder's pack instead of a blob file each.
pub const PACK_MAX: u64 = 64 * 1024;
/// Bytes of an upload after which their writeback to disk is started.
const WRITEBACK_EVERY: u64 = 8 << 20;
/// Alignment of `O_DIRECT` writes: offsets, lengths and buffer addresses.
const DIRECT_ALIGN: usize = 4096;
/// Bytes an upload gathers before writing them to disk directly.
const DIRECT_BLOCK: usize = 1 << 20;
/// A snapshot is written once the journal holds this many records and more than twice the
/// folder's files.
const SNAPSHOT_MIN_RECORDS: u64 = 1024;
/// A pack is compacted once it holds this much garbage and more garbage than live bytes.
const PACK_MIN_GARBAGE: u64 = 8 << 20;

const SNAPSHOT: &str = "snapshot.json";
/// Disk space an upload of undeclared size claims at a time.
const CLAIM_STEP: u64 = 16 << 20;
/// Room a snapshot is assumed to need per file when claiming disk space for it.
const SNAPSHOT_ROOM_PER_FILE: u64 = 1024;

/// Metadata of one stored file, as kept in snapshots and journal records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileMeta {
    name: String,
    size: u64,
    mtime_ns: i64,
    version: u64,
    blake3: String,
    /// The blob holding the content, when not `version` (after a rename).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blob: Option<u64>,
    /// Where in a pack the content is, for small files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pack: Option<PackRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PackRef {
    pack: u64,
    offset: u64,
}

/// Where a file's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    Blob(u64),
    Pack(PackRef),
}

impl FileMeta {
    fn info(&self, owner: &str) -> FileInfo {
        FileInfo {
            owner: owner.to_string(),
            name: self.name.clone(),
            size: self.size,
            mtime_ns: self.mtime_ns,
            version: self.version,
        }
    }

    fn content(&self) -> Content {
        match self.pack {
            Some(p) => Content::Pack(p),
            None => Content::Blob(self.blob.unwrap_or(self.version)),
        }
    }

    fn with_content(mut self, content: Content) -> FileMeta {
        match content {
            Content::Blob(b) => {
                self.pack = None;
                self.blob = (b != self.version).then_some(b);
            }
            Content::Pack(p) => {
                self.pack = Some(p);
                self.blob = None;
            }
        }
        self
    }
}

/// One change, as a line of the journal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    Put(FileMeta),
    Delete { name: String },
    Rename { from: String, file: FileMeta },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    /// The journal that continues this snapshot.
    #[serde(default)]
    journal: u64,
    files: Vec<FileMeta>,
}

/// The pack new small files are appended to.
#[derive(Debug)]
struct Pack {
    id: u64,
    file: File,
    /// Where the next content goes.
    len: u64,
    /// Size of the file: zeros from `len` on (see [`preallocate`]).
    alloc: u64,
    /// How much of the file is known to be allocated on disk (its size made durable).
    durable_alloc: u64,
}

impl Pack {
    /// Opens (creating if needed) pack `id` of the folder `dir`, to append at `len`.
    fn open(dir: &Path, id: u64, len: u64) -> io::Result<Pack> {
        let file = open_rw(&dir.join(pack_name(id)), false)?;
        file.sync_all()?;
        let alloc = file.metadata()?.len();
        Ok(Pack {
            id,
            file,
            len: len.min(alloc),
            alloc,
            durable_alloc: alloc,
        })
    }

    /// Writes a content at the end. Over space already allocated on disk only the data
    /// has to reach the device: its write is started here and returned as the range that
    /// [`Folder::append`] waits for before the journal's fdatasync, whose device cache
    /// flush then covers both (a flush covers every write completed before it). A write
    /// that extends the file is made durable here with an fdatasync (its size and blocks
    /// are metadata), and nothing is left to wait for.
    fn write(&mut self, data: &[u8], space: &DiskSpace) -> io::Result<Option<(u64, u64)>> {
        let at = self.len;
        let end = at + data.len() as u64;
        preallocate(&self.file, &mut self.alloc, end, PACK_PREALLOC, space);
        let written = self.file.write_all_at(data, at).and_then(|()| {
            if end <= self.durable_alloc {
                sync_range(&self.file, at, data.len() as u64, false)?;
                Ok(Some((at, data.len() as u64)))
            } else {
                self.file.sync_data()?;
                self.durable_alloc = self.alloc;
                Ok(None)
            }
        });
        match written {
            Ok(pending) => {
                self.len = end;
                // Without zeros ahead (no room for them) the write itself grew the file.
                self.alloc = self.alloc.max(end);
                self.durable_alloc = self.durable_alloc.max(end);
                Ok(pending)
            }
            Err(e) => {
                let _ = self.file.set_len(at);
                self.alloc = at;
                self.durable_alloc = self.durable_alloc.min(at);
                Err(e)
            }
        }
    }
}

/// Starts writing the dirty pages of `len` bytes at `offset` of `file` to the device, and
/// with `wait` waits until they are written: no metadata, no device cache flush.
fn sync_range(file: &File, offset: u64, len: u64, wait: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: plain system call on an owned descriptor.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes of zeros a journal is extended by when a record would not fit.
const JOURNAL_PREALLOC: u64 = 1 << 20;
/// Bytes of zeros a pack is extended by when a content would not fit.
const PACK_PREALLOC: u64 = 4 << 20;

/// Makes sure `file` extends to at least `end` by writing zeros from `*alloc` (its size,
/// which every write past it must raise) to `end + step`, unsynced: the next fdatasync
/// makes them durable with the bytes written over them. Appends that only overwrite such
/// zeros change no metadata, so their fdatasync is a data write and a cache flush, no
/// inode update. Best effort: zeros are written only where the disk reserve leaves room
/// for them, and if they cannot be written after all (a full disk), the file is cut back
/// to `*alloc` — never below it, so no content is touched — and plain appends go on.
fn preallocate(file: &File, alloc: &mut u64, end: u64, step: u64, space: &DiskSpace) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    if end <= *alloc {
        return;
    }
    let target = end + step;
    // The bytes up to `end` are the caller's, claimed already.
    let Ok(_room) = space.claim(target - end.max(*alloc)) else {
        return;
    };
    let mut at = *alloc;
    while at < target {
        let n = (target - at).min(ZEROS.len() as u64) as usize;
        if file.write_all_at(&ZEROS[..n], at).is_err() {
            let _ = file.set_len(*alloc);
            return;
        }
        at += n as u64;
    }
    *alloc = target;
}

/// The loaded index of one user's folder.
#[derive(Debug)]
struct Folder {
    dir: PathBuf,
    files: BTreeMap<String, FileMeta>,
    used: u64,
    journal: File,
    /// Number of the journal file in use (named by the snapshot).
    epoch: u64,
    /// Where the next record goes.
    journal_len: u64,
    /// Size of the journal file: zeros from `journal_len` on (see [`preallocate`]).
    journal_alloc: u64,
    /// Records in the journal (changes since the snapshot).
    records: u64,
    pack: Option<Pack>,
    /// The data directory's free space, which zeros ahead of the journal and the pack and
    /// maintenance copies must leave to the reserve.
    space: DiskSpace,
    /// Bytes of the current pack that no file uses any more.
    pack_garbage: u64,
}

impl Folder {
    fn pack_path(&self, id: u64) -> PathBuf {
        self.dir.join(pack_name(id))
    }

    /// Appends one record and makes it durable. On failure the journal is cut back so the
    /// next record does not follow a torn one.
    fn append(&mut self, record: &Record) -> Result<()> {
        self.append_after(record, None)
    }

    /// [`Folder::append`] of the record of a content whose write to the current pack is
    /// under way (`pending`, from [`Pack::write`]): both writes go to the device together,
    /// the content's is waited for, then the journal's fdatasync flushes the device cache
    /// for both. If the record reaches the disk without its content (a crash before the
    /// flush: neither was acknowledged), the next load drops it (`packed_content_intact`).
    /// One 4 KiB content and its record: 203-230 us with an fdatasync each, 151-161 us
    /// with the content written and waited for first, 123-127 us together (Python loop of
    /// the same system calls on this project's benchmark machine).
    fn append_after(&mut self, record: &Record, pending: Option<(u64, u64)>) -> Result<()> {
        let mut line = serde_json::to_vec(record)
            .map_err(|e| ServerError::Internal(format!("cannot encode a journal record: {e}")))?;
        line.push(b'\n');
        let end = self.journal_len + line.len() as u64;
        preallocate(
            &self.journal,
            &mut self.journal_alloc,
            end,
            JOURNAL_PREALLOC,
            &self.space,
        );
        let result = self
            .journal
            .write_all_at(&line, self.journal_len)
            .and_then(|()| match (pending, self.pack.as_ref()) {
                (Some((at, len)), Some(pack)) => {
                    sync_range(&self.journal, self.journal_len, line.len() as u64, false)?;
                    sync_range(&pack.file, at, len, true)
                }
                _ => Ok(()),
            })
            .and_then(|()| self.journal.sync_data());
        match result {
            Ok(()) => {
                self.journal_len = end;
                // Without zeros ahead (no room for them) the record itself grew the file.
                self.journal_alloc = self.journal_alloc.max(end);
                self.records += 1;
                Ok(())
            }
            Err(e) => {
                let _ = self.journal.set_len(self.journal_len);
                self.journal_alloc = self.journal_len;
                tracing::warn!(dir = %self.dir.display(), error = %e, "journal append failed; change refused");
                Err(e.into())
            }
        }
    }

    /// Sets `name` to `meta`, releasing what it replaces.
    fn insert(&mut self, meta: FileMeta) {
        self.used += meta.size;
        if let Some(old) = self.files.insert(meta.name.clone(), meta) {
            self.forget(&old);
        }
    }

    /// Accounts for a file's content no longer being used (blobs are removed at once; a
    /// crash before that leaves an orphan the next load removes).
    fn forget(&mut self, old: &FileMeta) {
        self.used = self.used.saturating_sub(old.size);
        match old.content() {
            Content::Pack(p) => {
                if self.pack.as_ref().is_some_and(|cur| cur.id == p.pack) {
                    self.pack_garbage += old.size;
                }
            }
            Content::Blob(b) => remove_quietly(&self.dir.join(blob_name(b))),
        }
    }

    /// Writes a snapshot of the folder that continues with a new, empty journal.
    fn snapshot(&mut self, tmp: &Path) -> Result<()> {
        let next = self.epoch + 1;
        let next_path = self.dir.join(journal_name(next));
        let journal = open_rw(&next_path, true)?;
        let written: Result<()> = (|| {
            journal.sync_all()?;
            fsutil::sync_dir(&self.dir)?;
            let snap = Snapshot {
                journal: next,
                files: self.files.values().cloned().collect(),
            };
            let bytes = serde_json::to_vec(&snap)
                .map_err(|e| ServerError::Internal(format!("cannot encode a snapshot: {e}")))?;
            fsutil::write_atomic(tmp, &self.dir.join(SNAPSHOT), &bytes)?;
            Ok(())
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&next_path);
            return Err(e);
        }
        remove_quietly(&self.dir.join(journal_name(self.epoch)));
        self.journal = journal;
        self.epoch = next;
        self.journal_len = 0;
        self.journal_alloc = 0;
        self.records = 0;
        Ok(())
    }

    /// Snapshots and compacts when the journal or the pack carry enough garbage.
    fn maintain(&mut self, tmp: &Path) {
        let live_packed: u64 = self
            .pack
            .as_ref()
            .map_or(0, |p| p.len.saturating_sub(self.pack_garbage));
        // Each copy claims its size first (a snapshot's is estimated generously), so
        // maintenance never eats into the reserve; skipped, it is tried again later.
        let snapshot_room = SNAPSHOT_ROOM_PER_FILE * (self.files.len() as u64 + 1);
        let result = if self.pack_garbage >= PACK_MIN_GARBAGE && self.pack_garbage > live_packed {
            self.space
                .claim(live_packed + snapshot_room)
                .and_then(|_room| self.compact(tmp))
        } else if self.records >= SNAPSHOT_MIN_RECORDS && self.records > 2 * self.files.len() as u64
        {
            self.space
                .claim(snapshot_room)
                .and_then(|_room| self.snapshot(tmp))
        } else {
            Ok(())
        };
        if let Err(e) = result {
            // Nothing is lost: the journal and the old pack still hold everything.
            tracing::warn!(dir = %self.dir.display(), error = %e, "folder maintenance failed");
        }
    }

    /// Copies the live packed contents into a new pack, switches to it with a snapshot,
    /// and removes the old pack (open readers keep reading it).
    fn compact(&mut self, tmp: &Path) -> Result<()> {
        let Some(old) = self.pack.as_ref() else {
            return Ok(());
        };
        let old_id = old.id;
        let new_id = old_id + 1;
        let new_path = self.pack_path(new_id);
        let file = fsutil::create_new(&new_path)?;
        let mut len = 0u64;
        // (name, where it was, where it goes)
        let mut moved = Vec::new();
        let copied: Result<()> = (|| {
            let mut sources: HashMap<u64, File> = HashMap::new();
            let mut buf = Vec::new();
            for meta in self.files.values() {
                if let Content::Pack(p) = meta.content() {
                    let source = match sources.entry(p.pack) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(self.pack_file_for(p.pack)?)
                        }
                    };
                    buf.resize(meta.size as usize, 0);
                    source.read_exact_at(&mut buf, p.offset)?;
                    file.write_all_at(&buf, len)?;
                    let to = PackRef {
                        pack: new_id,
                        offset: len,
                    };
                    moved.push((meta.name.clone(), p, to));
                    len += meta.size;
                }
            }
            file.sync_all()?;
            fsutil::sync_dir(&self.dir)?;
            Ok(())
        })();
        if let Err(e) = copied {
            let _ = fs::remove_file(&new_path);
            return Err(e);
        }
        let set_refs = |files: &mut BTreeMap<String, FileMeta>, to_new: bool| {
            for (name, from, to) in &moved {
                if let Some(m) = files.get_mut(name) {
                    m.pack = Some(if to_new { *to } else { *from });
                }
            }
        };
        set_refs(&mut self.files, true);
        if let Err(e) = self.snapshot(tmp) {
            set_refs(&mut self.files, false);
            let _ = fs::remove_file(&new_path);
            return Err(e);
        }
        self.pack = Some(Pack {
            id: new_id,
            file,
            len,
            alloc: len,
            durable_alloc: len,
        });
        self.pack_garbage = 0;
        remove_quietly(&self.pack_path(old_id));
        Ok(())
    }

    fn pack_file_for(&self, id: u64) -> Result<File> {
        match &self.pack {
            Some(p) if p.id == id => Ok(p.file.try_clone()?),
            _ => Ok(fsutil::open_read(&self.pack_path(id))?),
        }
    }

    /// The pack to append to, created on first use.
    fn pack_mut(&mut self) -> Result<&mut Pack> {
        let pack = match self.pack.take() {
            Some(p) => p,
            None => {
                let p = Pack::open(&self.dir, 1, 0)?;
                fsutil::sync_dir(&self.dir)?;
                p
            }
        };
        Ok(self.pack.insert(pack))
    }
}

/// Cheap-to-clone handle on the storage of one data directory.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    root: PathBuf,
    tmp: PathBuf,
    /// Folders are loaded on first use; each has its own lock so one user's fsyncs do not
    /// stall another's listing. std `Mutex` because every holder is a blocking task that
    /// never awaits while holding it.
    folders: Mutex<HashMap<String, Arc<Mutex<Folder>>>>,
    /// Source of versions: starts at the clock in nanoseconds so versions stay unique
    /// across restarts, and is raised past every version found on disk.
    next_version: AtomicU64,
    /// Free space above the reserve, claimed by every write before it is made.
    space: DiskSpace,
    /// Quota held by uploads in progress, per owner.
    reservations: Reservations,
}

/// An upload being received into a temp file. Dropping it (abort, disconnect, shutdown)
/// removes the temp file.
#[derive(Debug)]
pub struct StagedUpload {
    owner: String,
    name: String,
    file: Option<File>,
    /// Whole aligned blocks go to disk through this `O_DIRECT` descriptor of the same file,
    /// bypassing the page cache: copying a large upload into the page cache was half the
    /// server's CPU. `None` where the filesystem has no direct I/O (tmpfs), or after it
    /// failed: then writes are buffered, with early writeback.
    direct: Option<DirectWriter>,
    path: PathBuf,
    hasher: blake3::Hasher,
    written: u64,
    /// Where the next early writeback starts.
    writeback_from: u64,
    /// Bytes the owner's quota left above what the folder held when the upload began;
    /// the owner's uploads in progress together hold at most this much of it.
    allowance: u64,
    /// The owner's quota this upload holds (`None` without a quota): its declared size
    /// from the start, grown as chunks go past it.
    held: Option<Reservation>,
    /// The owner's quota, checked again at commit against what the folder holds then
    /// (other uploads of the owner may have committed meanwhile).
    quota: Option<u64>,
    /// Disk space claimed for bytes not yet written: the declared size at the start, or
    /// [`CLAIM_STEP`] at a time where the size was not declared.
    room: Claim,
    /// The first failure; later chunks are ignored and commit reports it.
    failed: Option<ServerError>,
}

/// The unwritten tail of an upload, gathered in an aligned buffer until a whole block can
/// go to disk with one direct write.
struct DirectWriter {
    file: File,
    buf: Vec<u8>,
    /// Where the aligned block starts in `buf`.
    start: usize,
    /// Bytes gathered.
    len: usize,
    /// The file offset of the gathered bytes: a multiple of the block size.
    base: u64,
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter")
            .field("len", &self.len)
            .field("base", &self.base)
            .finish()
    }
}

impl DirectWriter {
    fn open(path: &Path) -> Option<DirectWriter> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .ok()?;
        let buf = vec![0u8; DIRECT_BLOCK + DIRECT_ALIGN];
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        (start < DIRECT_ALIGN).then_some(DirectWriter {
            file,
            buf,
            start,
            len: 0,
            base: 0,
        })
    }

    fn block(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    /// Gathers `data` (the bytes after those gathered so far), writing each block that
    /// fills up. On an error, the gathered bytes are still those at `base`.
    fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = data.len().min(DIRECT_BLOCK - self.len);
            let from = self.start + self.len;
            self.buf[from..from + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
            if self.len == DIRECT_BLOCK {
                self.file.write_all_at(self.block(), self.base)?;
                self.base += DIRECT_BLOCK as u64;
                self.len = 0;
            }
        }
        Ok(())
    }
}

impl StagedUpload {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends a chunk. Blocking. A failure is kept and reported by commit.
    pub fn write_chunk(&mut self, offset: u64, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if offset != self.written {
            self.failed = Some(ServerError::Protocol(format!(
                "chunk at offset {offset}, expected {}",
                self.written
            )));
            return;
        }
        if let Some(held) = self.held.as_mut() {
            let short = (self.written + data.len() as u64).saturating_sub(held.bytes());
            if let Err(e) = held.grow(short, self.allowance) {
                tracing::warn!(owner = %self.owner, name = %self.name, error = %e, "upload refused");
                self.failed = Some(e);
                return;
            }
        }
        if let Err(e) = self.claim_room(data.len() as u64) {
            tracing::warn!(owner = %self.owner, name = %self.name, error = %e, "upload refused");
            self.failed = Some(e);
            return;
        }
        if let Err(e) = self.store(data) {
            tracing::warn!(owner = %self.owner, name = %self.name, error = %e, "upload failed");
            self.failed = Some(e.into());
            return;
        }
        self.room.consume(data.len() as u64);
        self.hasher.update(data);
        self.written += data.len() as u64;
    }

    /// Makes sure `n` bytes are claimed for the next chunk. An upload of undeclared size
    /// claims [`CLAIM_STEP`] at a time, so its chunks do not each cost a `statvfs`.
    fn claim_room(&mut self, n: u64) -> Result<()> {
        match n.checked_sub(self.room.bytes()) {
            // Near a full disk a whole step may not fit where the chunk still does.
            Some(short) if short > 0 => self
                .room
                .grow(short.max(CLAIM_STEP))
                .or_else(|_| self.room.grow(short)),
            _ => Ok(()),
        }
    }

    /// Puts a chunk's bytes on their way to disk: directly in whole blocks where possible,
    /// else through the page cache with early writeback.
    fn store(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(file) = self.file.as_ref() else {
            return Ok(());
        };
        if let Some(mut direct) = self.direct.take() {
            let Err(e) = direct.write(data) else {
                self.direct = Some(direct);
                return Ok(());
            };
            // Direct I/O refused after all: the gathered bytes and this chunk go through
            // the page cache instead (rewriting any of the chunk's bytes already written
            // directly, with the same bytes), as does the rest.
            tracing::debug!(error = %e, "direct write failed; buffering this upload");
            self.writeback_from = direct.base;
            file.write_all_at(direct.block(), direct.base)?;
        }
        file.write_all_at(data, self.written)?;
        let end = self.written + data.len() as u64;
        if end - self.writeback_from >= WRITEBACK_EVERY {
            // Start writing what came so far to disk now, so the fsync at commit waits for
            // the tail only instead of the whole file (the disk works during the transfer).
            use std::os::fd::AsRawFd;
            let (from, len) = (self.writeback_from, end - self.writeback_from);
            // SAFETY: plain syscall on an owned descriptor; errors only cost the overlap,
            // the commit's fsync still makes everything durable.
            unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    from as i64,
                    len as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.writeback_from = end;
        }
        Ok(())
    }

    /// Writes what is still gathered (the unaligned tail) through the page cache.
    fn finish_writes(&mut self) -> Result<()> {
        let (Some(file), Some(direct)) = (self.file.as_ref(), self.direct.take()) else {
            return Ok(());
        };
        file.write_all_at(direct.block(), direct.base)?;
        Ok(())
    }
}

impl Drop for StagedUpload {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// An open read handle on the version current at open: its blob, or its range of a pack.
#[derive(Debug)]
pub struct OpenFile {
    file: File,
    /// Where the content starts in `file`.
    start: u64,
    pub info: FileInfo,
}

impl OpenFile {
    /// Up to `len` bytes at `offset` of the content (fewer at its end). Blocking.
    pub fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let len = len.min(self.info.size.saturating_sub(offset) as usize);
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            match self.pread_into(&mut buf, len, offset, 0) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Bytes::from(buf))
    }

    /// Like [`OpenFile::read`], but only if the bytes are in the page cache: never waits
    /// for the disk, so it may run on an async worker. `None` means: read it the slow way.
    pub fn read_cached(&self, offset: u64, len: usize) -> Option<Bytes> {
        let len = len.min(self.info.size.saturating_sub(offset) as usize);
        let mut buf = Vec::with_capacity(len);
        // Short reads happen at a page-cache boundary as well as at the end: retry slowly.
        match self.pread_into(&mut buf, len, offset, libc::RWF_NOWAIT) {
            Ok(n) if n == len => Some(Bytes::from(buf)),
            _ => None,
        }
    }

    /// One `preadv2` of the content from `offset + buf.len()` into `buf`'s spare capacity,
    /// up to `len` bytes in `buf` (which must have that capacity): the buffer is not
    /// zeroed first, the kernel writes every byte it counts.
    fn pread_into(
        &self,
        buf: &mut Vec<u8>,
        len: usize,
        offset: u64,
        flags: i32,
    ) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let filled = buf.len();
        let want = len.saturating_sub(filled).min(buf.capacity() - filled);
        if want == 0 {
            return Ok(0);
        }
        let at = i64::try_from(self.start + offset + filled as u64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let spare = buf.spare_capacity_mut();
        let iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: want,
        };
        // SAFETY: one iovec describing `want` bytes of `buf`'s spare capacity, which
        // outlives the call; the fd is owned.
        let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, flags) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        // SAFETY: the kernel initialised the first `n <= want` spare bytes.
        unsafe { buf.set_len(filled + n) };
        Ok(n)
    }
}

impl Store {
    /// Opens (creating if needed) the storage under `root` and clears leftover temp files.
    pub fn open(root: &Path, reserve: u64) -> Result<Store> {
        let tmp = root.join("tmp");
        fsutil::create_dir_durable(&root.join("files"))?;
        if tmp.is_dir() {
            fs::remove_dir_all(&tmp)?;
        }
        fsutil::create_dir_durable(&tmp)?;
        Ok(Store {
            inner: Arc::new(StoreInner {
                root: root.to_path_buf(),
                tmp,
                folders: Mutex::new(HashMap::new()),
                next_version: AtomicU64::new(fsutil::now_ns().max(1) as u64),
                space: DiskSpace::new(root, reserve),
                reservations: Reservations::default(),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn next_version(&self) -> u64 {
        self.inner.next_version.fetch_add(1, Ordering::Relaxed)
    }

    fn folder(&self, owner: &str) -> Result<Arc<Mutex<Folder>>> {
        check_user_name(owner).map_err(ServerError::InvalidName)?;
        let mut folders = lock(&self.inner.folders)?;
        if let Some(f) = folders.get(owner) {
            return Ok(f.clone());
        }
        let folder = Arc::new(Mutex::new(self.load_folder(owner)?));
        folders.insert(owner.to_string(), folder.clone());
        Ok(folder)
    }

    /// Reads a user's folder from disk, finishing or undoing what a crash left behind.
    fn load_folder(&self, owner: &str) -> Result<Folder> {
        let dir = self.inner.root.join("files").join(owner);
        fsutil::create_dir_durable(&dir)?;
        let mut blobs = Vec::new();
        let mut packs = Vec::new();
        let mut legacy = Vec::new();
        let mut journals = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let fname = entry.file_name();
            let Some(fname) = fname.to_str() else {
                continue;
            };
            if let Some(v) = fname.strip_suffix(".blob") {
                if let Ok(v) = u64::from_str_radix(v, 16) {
                    blobs.push(v);
                }
            } else if let Some(n) = fname
                .strip_prefix("pack-")
                .and_then(|r| r.strip_suffix(".dat"))
            {
                if let Ok(n) = n.parse::<u64>() {
                    packs.push(n);
                }
            } else if fname.ends_with(".meta") {
                legacy.push(entry.path());
            } else if fname.starts_with("journal-") && fname.ends_with(".jsonl") {
                journals.push(entry.path());
            }
        }

        // The snapshot, or (older layout) one metadata file per user file.
        let snapshot_path = dir.join(SNAPSHOT);
        let mut files = BTreeMap::new();
        let mut epoch = 0;
        let have_snapshot = match fs::read(&snapshot_path) {
            Ok(bytes) => {
                let snap: Snapshot =
                    serde_json::from_slice(&bytes).map_err(|source| ServerError::Corrupt {
                        path: snapshot_path.display().to_string(),
                        source,
                    })?;
                epoch = snap.journal;
                for m in snap.files {
                    files.insert(m.name.clone(), m);
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e.into()),
        };
        if !have_snapshot {
            for path in &legacy {
                let bytes = fs::read(path)?;
                let meta: FileMeta =
                    serde_json::from_slice(&bytes).map_err(|source| ServerError::Corrupt {
                        path: path.display().to_string(),
                        source,
                    })?;
                files.insert(meta.name.clone(), meta);
            }
        }

        // Replay the journal; cut off a torn last record.
        let journal_path = dir.join(journal_name(epoch));
        let journal = open_rw(&journal_path, false)?;
        let bytes = fs::read(&journal_path)?;
        let mut parsed = Vec::new();
        let mut valid = 0usize;
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            if !line.ends_with(b"\n") {
                // Zeros are preallocated space; anything else is a record cut short.
                if line.iter().any(|b| *b != 0) {
                    tracing::warn!(owner, "cutting off a torn journal record");
                }
                break;
            }
            valid += line.len();
            match serde_json::from_slice::<Record>(line) {
                Ok(record) => parsed.push((record, valid - line.len())),
                Err(e) => {
                    tracing::error!(owner, error = %e, "skipping an unreadable journal record")
                }
            }
        }
        // The last record may have reached the disk while its packed content had not
        // (the two writes go out together; see `Folder::append`): it was never
        // acknowledged, so it goes if its content does not match its hash.
        if let Some((Record::Put(meta), start)) = parsed.last() {
            let last_line = bytes[*start..valid].iter().filter(|b| **b == b'\n').count() == 1;
            if last_line && !packed_content_intact(&dir, meta) {
                tracing::warn!(owner, file = %meta.name, "dropping the last journal record: its content never reached the disk");
                valid = *start;
                parsed.pop();
            }
        }
        let records = parsed.len() as u64;
        for (record, _) in parsed {
            apply(&mut files, record);
        }
        if valid < bytes.len() {
            journal.set_len(valid as u64)?;
            journal.sync_all()?;
        }
        // Journals of other snapshots (a crash while switching) are superseded.
        for old in journals.iter().filter(|p| **p != journal_path) {
            fs::remove_file(old)?;
        }
        fsutil::sync_dir(&dir)?;

        // Drop entries whose content is missing, and contents no entry names.
        let blob_set: HashSet<u64> = blobs.iter().copied().collect();
        let pack_set: HashSet<u64> = packs.iter().copied().collect();
        files.retain(|name, meta| {
            let ok = match meta.content() {
                Content::Blob(b) => blob_set.contains(&b),
                Content::Pack(p) => pack_set.contains(&p.pack),
            };
            if !ok {
                tracing::error!(
                    owner,
                    name,
                    "metadata names missing content; dropping entry"
                );
            }
            ok
        });
        let mut used_blobs = HashSet::new();
        let mut used_packs = HashSet::new();
        for m in files.values() {
            match m.content() {
                Content::Blob(b) => used_blobs.insert(b),
                Content::Pack(p) => used_packs.insert(p.pack),
            };
        }
        let current_pack = used_packs.iter().copied().max();
        let mut removed = 0;
        for b in blobs.iter().filter(|b| !used_blobs.contains(b)) {
            fs::remove_file(dir.join(blob_name(*b)))?;
            removed += 1;
        }
        for p in packs.iter().filter(|p| Some(**p) != current_pack) {
            if used_packs.contains(p) {
                continue;
            }
            fs::remove_file(dir.join(pack_name(*p)))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(owner, removed, "removed contents of unfinished uploads");
            fsutil::sync_dir(&dir)?;
        }

        let max_version = files.values().map(|m| m.version).max().unwrap_or(0);
        self.inner
            .next_version
            .fetch_max(max_version + 1, Ordering::Relaxed);
        let used = files.values().map(|m| m.size).sum();
        let journal_len = valid as u64;
        let mut folder = Folder {
            dir,
            files,
            used,
            journal,
            epoch,
            journal_len,
            journal_alloc: journal_len,
            records,
            pack: None,
            pack_garbage: 0,
            space: self.inner.space.clone(),
        };
        if let Some(id) = current_pack {
            let in_pack = || {
                folder
                    .files
                    .values()
                    .filter_map(move |m| match m.content() {
                        Content::Pack(p) if p.pack == id => Some((p.offset, m.size)),
                        _ => None,
                    })
            };
            // New contents go after the last one named; what follows it (preallocated
            // zeros, contents no record names) is overwritten.
            let end = in_pack()
                .map(|(offset, size)| offset + size)
                .max()
                .unwrap_or(0);
            let live: u64 = in_pack().map(|(_, size)| size).sum();
            let pack = Pack::open(&folder.dir, id, end)?;
            folder.pack_garbage = pack.len.saturating_sub(live);
            folder.pack = Some(pack);
        }
        // An older layout is folded into a snapshot once, then its files go.
        if !legacy.is_empty() {
            if !have_snapshot {
                folder.snapshot(&self.inner.tmp)?;
            }
            for path in &legacy {
                fs::remove_file(path)?;
            }
            fsutil::sync_dir(&folder.dir)?;
        }
        Ok(folder)
    }

    /// Lists a user's files, sorted by name.
    pub fn list(&self, owner: &str) -> Result<Vec<FileInfo>> {
        Ok(self.list_page(owner, None, usize::MAX, usize::MAX)?.0)
    }

    /// Up to `limit` files after `after`, sorted by name, and whether more follow.
    /// One page of `owner`'s files after `after`: at most `limit` of them, taking at most
    /// `max_bytes` as JSON (at least one). True if more follow.
    pub fn list_page(
        &self,
        owner: &str,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<FileInfo>, bool)> {
        use std::ops::Bound;
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut iter = folder
            .files
            .range::<str, _>((start, Bound::Unbounded))
            .map(|(_, m)| m.info(owner));
        let mut page: Vec<FileInfo> = Vec::new();
        let mut bytes = 0;
        let more = loop {
            let Some(info) = iter.next() else {
                break false;
            };
            // The comma (or bracket) before each entry counts too.
            bytes += info.json_size_bound() + 1;
            if page.len() == limit || (bytes > max_bytes && !page.is_empty()) {
                break true;
            }
            page.push(info);
        };
        Ok((page, more))
    }

    pub fn stat(&self, owner: &str, name: &str) -> Result<FileInfo> {
        check_file_lookup(name).map_err(ServerError::InvalidName)?;
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        folder
            .files
            .get(name)
            .map(|m| m.info(owner))
            .ok_or_else(|| ServerError::NotFound(format!("{owner}/{name}")))
    }

    /// Opens the current version of a file for reading.
    pub fn open_read(&self, owner: &str, name: &str) -> Result<OpenFile> {
        check_file_lookup(name).map_err(ServerError::InvalidName)?;
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        let meta = folder
            .files
            .get(name)
            .ok_or_else(|| ServerError::NotFound(format!("{owner}/{name}")))?;
        let (file, start) = match meta.content() {
            Content::Blob(b) => (fsutil::open_read(&folder.dir.join(blob_name(b)))?, 0),
            Content::Pack(p) => (folder.pack_file_for(p.pack)?, p.offset),
        };
        Ok(OpenFile {
            file,
            start,
            info: meta.info(owner),
        })
    }

    /// Opens a file whose content is in a pack of an already loaded folder, if that needs
    /// no disk access and no waiting for the folder's lock; `None` otherwise.
    pub fn try_open_packed(&self, owner: &str, name: &str) -> Option<OpenFile> {
        let folder = self.inner.folders.try_lock().ok()?.get(owner)?.clone();
        let folder = folder.try_lock().ok()?;
        let meta = folder.files.get(name)?;
        let Content::Pack(p) = meta.content() else {
            return None;
        };
        let pack = folder.pack.as_ref().filter(|cur| cur.id == p.pack)?;
        Some(OpenFile {
            file: pack.file.try_clone().ok()?,
            start: p.offset,
            info: meta.info(owner),
        })
    }

    /// Bytes `owner` may still add under `quota`, with the error to report when crossed.
    /// (Disk space is claimed separately, see [`DiskSpace`].)
    fn allowance(used: u64, quota: Option<u64>) -> (u64, ServerError) {
        match quota {
            Some(q) => (
                q.saturating_sub(used),
                ServerError::QuotaExceeded(format!("quota of {q} bytes reached")),
            ),
            None => (u64::MAX, ServerError::Internal("no quota".into())),
        }
    }

    /// Starts an upload of `name` into `owner`'s folder. `quota` is the owner's quota.
    pub fn begin_upload(
        &self,
        owner: &str,
        name: &str,
        size: Option<u64>,
        quota: Option<u64>,
    ) -> Result<StagedUpload> {
        check_file_name(name).map_err(ServerError::InvalidName)?;
        let folder = self.folder(owner)?;
        let (allowance, held) = {
            // Reserved under the folder lock, which commits hold while they turn their
            // reservation into used bytes: no upload is counted twice, or not at all.
            let f = lock(&folder)?;
            // The old version's bytes are freed by the commit, so they count as available.
            let old = f.files.get(name).map_or(0, |m| m.size);
            let (allowance, _) = Store::allowance(f.used.saturating_sub(old), quota);
            let held = match quota {
                Some(_) => Some(self.inner.reservations.reserve(
                    owner,
                    size.unwrap_or(0),
                    allowance,
                )?),
                None => None,
            };
            (allowance, held)
        };
        let room = self.inner.space.claim(size.unwrap_or(0))?;
        let path = self.inner.tmp.join(fsutil::temp_name("upload"));
        let file = fsutil::create_new(&path)?;
        // Small uploads stay buffered: they may end up in a pack, read back from the cache.
        let direct = match size {
            Some(size) if size <= PACK_MAX => None,
            _ => DirectWriter::open(&path),
        };
        Ok(StagedUpload {
            owner: owner.to_string(),
            name: name.to_string(),
            file: Some(file),
            direct,
            path,
            hasher: blake3::Hasher::new(),
            written: 0,
            writeback_from: 0,
            allowance,
            held,
            quota,
            room,
            failed: None,
        })
    }

    /// Makes an upload the current version of its file. Blocking; fsyncs.
    pub fn commit_upload(
        &self,
        mut upload: StagedUpload,
        size: u64,
        blake3_hex: &str,
        cutoff: &Cutoff,
    ) -> Result<FileInfo> {
        if let Some(e) = upload.failed.take() {
            return Err(e);
        }
        if size != upload.written {
            return Err(ServerError::Protocol(format!(
                "commit of {size} bytes but {} were received",
                upload.written
            )));
        }
        let hash = upload.hasher.finalize().to_hex();
        if !hash.as_str().eq_ignore_ascii_case(blake3_hex) {
            return Err(ServerError::ChecksumMismatch);
        }
        upload.finish_writes()?;
        let file = upload
            .file
            .take()
            .ok_or_else(|| ServerError::Internal("upload already finished".into()))?;
        let held = upload.held.take();
        let result = self.install(&upload, &file, size, hash.as_str(), held, cutoff);
        if result.is_err() {
            let _ = fs::remove_file(&upload.path);
        }
        result
    }

    /// Makes the received content of `upload` (in `file`) the file's current version.
    fn install(
        &self,
        upload: &StagedUpload,
        file: &File,
        size: u64,
        hash: &str,
        held: Option<Reservation>,
        cutoff: &Cutoff,
    ) -> Result<FileInfo> {
        let (owner, name, tmp_path, quota) = (
            upload.owner.as_str(),
            upload.name.as_str(),
            upload.path.as_path(),
            upload.quota,
        );
        file.sync_all()?;
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        cutoff.check()?;
        let old = folder.files.get(name).map_or(0, |m| m.size);
        let (allowance, allowance_error) = Store::allowance(folder.used.saturating_sub(old), quota);
        if size > allowance {
            return Err(allowance_error);
        }
        let _room = self.inner.space.claim(RECORD_ROOM)?;
        let version = self.next_version();
        let blob = folder.dir.join(blob_name(version));
        fs::rename(tmp_path, &blob)?;
        fsutil::sync_dir(&folder.dir)?;
        let meta = FileMeta {
            name: name.to_string(),
            size,
            mtime_ns: fsutil::now_ns(),
            version,
            blake3: hash.to_string(),
            blob: None,
            pack: None,
        };
        if let Err(e) = folder.append(&Record::Put(meta.clone())) {
            let _ = fs::remove_file(&blob);
            return Err(e);
        }
        folder.insert(meta.clone());
        // Used from now on, no longer reserved (still under the folder lock).
        drop(held);
        folder.maintain(&self.inner.tmp);
        Ok(meta.info(owner))
    }

    /// Stores a whole file received in one piece: small ones are appended to the folder's
    /// pack, larger ones go through a blob like any upload. Blocking; durable on return.
    pub fn put(
        &self,
        owner: &str,
        name: &str,
        data: &[u8],
        blake3_hex: &str,
        quota: Option<u64>,
        cutoff: &Cutoff,
    ) -> Result<FileInfo> {
        let size = data.len() as u64;
        if size > PACK_MAX {
            let mut up = self.begin_upload(owner, name, Some(size), quota)?;
            up.write_chunk(0, data);
            return self.commit_upload(up, size, blake3_hex, cutoff);
        }
        check_file_name(name).map_err(ServerError::InvalidName)?;
        let hash = blake3::hash(data).to_hex();
        if !hash.as_str().eq_ignore_ascii_case(blake3_hex) {
            return Err(ServerError::ChecksumMismatch);
        }
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        cutoff.check()?;
        let old = folder.files.get(name).map_or(0, |m| m.size);
        // What uploads in progress hold of the quota counts as used.
        let reserved = match quota {
            Some(_) => self.inner.reservations.reserved(owner)?,
            None => 0,
        };
        let (allowance, allowance_error) =
            Store::allowance((folder.used + reserved).saturating_sub(old), quota);
        if size > allowance {
            return Err(allowance_error);
        }
        let _room = self.inner.space.claim(size + RECORD_ROOM)?;
        let space = folder.space.clone();
        let pack = folder.pack_mut()?;
        let at = PackRef {
            pack: pack.id,
            offset: pack.len,
        };
        let pending = if size > 0 {
            pack.write(data, &space)?
        } else {
            None
        };
        let meta = FileMeta {
            name: name.to_string(),
            size,
            mtime_ns: fsutil::now_ns(),
            version: self.next_version(),
            blake3: hash.to_string(),
            blob: None,
            pack: Some(at),
        };
        if let Err(e) = folder.append_after(&Record::Put(meta.clone()), pending) {
            // The appended bytes are garbage now.
            folder.pack_garbage += size;
            return Err(e);
        }
        folder.insert(meta.clone());
        folder.maintain(&self.inner.tmp);
        Ok(meta.info(owner))
    }

    /// Deletes a file of `owner`'s.
    pub fn delete(&self, owner: &str, name: &str, cutoff: &Cutoff) -> Result<()> {
        check_file_lookup(name).map_err(ServerError::InvalidName)?;
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        cutoff.check()?;
        let Some(meta) = folder.files.get(name).cloned() else {
            return Err(ServerError::NotFound(format!("{owner}/{name}")));
        };
        folder.append(&Record::Delete {
            name: name.to_string(),
        })?;
        folder.files.remove(name);
        folder.forget(&meta);
        folder.maintain(&self.inner.tmp);
        Ok(())
    }

    /// Renames within `owner`'s folder, replacing `to`, in one journal record. The file
    /// gets a new version (clients cache by version); its content stays where it is.
    pub fn rename(&self, owner: &str, from: &str, to: &str, cutoff: &Cutoff) -> Result<FileInfo> {
        check_file_lookup(from).map_err(ServerError::InvalidName)?;
        check_file_name(to).map_err(ServerError::InvalidName)?;
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        cutoff.check()?;
        let Some(src) = folder.files.get(from).cloned() else {
            return Err(ServerError::NotFound(format!("{owner}/{from}")));
        };
        if from == to {
            return Ok(src.info(owner));
        }
        let _room = self.inner.space.claim(RECORD_ROOM)?;
        let meta = FileMeta {
            name: to.to_string(),
            version: self.next_version(),
            ..src.clone()
        }
        .with_content(src.content());
        folder.append(&Record::Rename {
            from: from.to_string(),
            file: meta.clone(),
        })?;
        folder.files.remove(from);
        folder.used = folder.used.saturating_sub(src.size);
        folder.insert(meta.clone());
        folder.maintain(&self.inner.tmp);
        Ok(meta.info(owner))
    }

    /// Space as the owner should see it.
    pub fn space(&self, owner: &str, quota: Option<u64>) -> Result<Space> {
        let folder = self.folder(owner)?;
        let (used, files) = {
            let f = lock(&folder)?;
            (f.used, f.files.len() as u64)
        };
        let (total, disk_avail) = self.inner.space.usable()?;
        Ok(match quota {
            Some(q) => Space {
                total: q,
                available: q
                    .saturating_sub(used + self.inner.reservations.reserved(owner)?)
                    .min(disk_avail),
                used,
                files,
            },
            None => Space {
                total,
                available: disk_avail,
                used,
                files,
            },
        })
    }

    /// Removes a user's folder entirely (account removal).
    pub fn remove_folder(&self, owner: &str) -> Result<()> {
        check_user_name(owner).map_err(ServerError::InvalidName)?;
        lock(&self.inner.folders)?.remove(owner);
        let dir = self.inner.root.join("files").join(owner);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn blob_name(version: u64) -> String {
    format!("{version:016x}.blob")
}

fn pack_name(id: u64) -> String {
    format!("pack-{id}.dat")
}

fn journal_name(epoch: u64) -> String {
    format!("journal-{epoch}.jsonl")
}

/// Opens a file of the folder for reading and writing, creating it if needed.
fn open_rw(path: &Path, truncate: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(fsutil::FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Applies a journal record to a folder's index (at load).
fn apply(files: &mut BTreeMap<String, FileMeta>, record: Record) {
    match record {
        Record::Put(meta) => {
            files.insert(meta.name.clone(), meta);
        }
        Record::Delete { name } => {
            files.remove(&name);
        }
        Record::Rename { from, file } => {
            files.remove(&from);
            files.insert(file.name.clone(), file);
        }
    }
}

/// Whether the packed content `meta` names is on disk with the hash it was stored with
/// (true for contents that are not packed).
fn packed_content_intact(dir: &Path, meta: &FileMeta) -> bool {
    let Content::Pack(p) = meta.content() else {
        return true;
    };
    let mut buf = vec![0u8; meta.size as usize];
    let read = fsutil::open_read(&dir.join(pack_name(p.pack)))
        .and_then(|f| f.read_exact_at(&mut buf, p.offset));
    read.is_ok()
        && blake3::hash(&buf)
            .to_hex()
            .as_str()
            .eq_ignore_ascii_case(&meta.blake3)
}

fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove old blob");
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| ServerError::Internal("a storage lock was poisoned by a panic".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn put(store: &Store, owner: &str, name: &str, data: &[u8]) -> Result<FileInfo> {
        let mut up = store.begin_upload(owner, name, Some(data.len() as u64), None)?;
        up.write_chunk(0, data);
        let hash = blake3::hash(data).to_hex();
        store.commit_upload(up, data.len() as u64, hash.as_str(), &Cutoff::NONE)
    }

    fn read_all(store: &Store, owner: &str, name: &str) -> Vec<u8> {
        let f = store.open_read(owner, name).unwrap();
        f.read(0, usize::MAX).unwrap().to_vec()
    }

    /// Large uploads go to disk in aligned direct-I/O blocks with a buffered tail: chunks of
    /// any size, at block boundaries or across them, land where they belong. Where the
    /// filesystem has no direct I/O this checks the buffered path instead.
    #[test]
    fn uploads_in_chunks_of_any_size_are_stored_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        let data: Vec<u8> = (0..3 * DIRECT_BLOCK + 12_345)
            .map(|i| (i * 7 + i / 4099) as u8)
            .collect();
        let block = DIRECT_BLOCK;
        for (name, size, chunks) in [
            ("exact", None, vec![block, block, block, 12_345]),
            (
                "odd",
                None,
                vec![1, 4095, block + 3, 777, 2 * block - 777 - 4099 + 12_345],
            ),
            (
                "small first",
                Some(data.len() as u64),
                vec![10, 3 * block, 12_335],
            ),
        ] {
            assert_eq!(chunks.iter().sum::<usize>(), data.len(), "{name}");
            let mut up = store.begin_upload("alice", name, size, None).unwrap();
            let mut at = 0;
            for n in chunks {
                up.write_chunk(at as u64, &data[at..at + n]);
                at += n;
            }
            let hash = blake3::hash(&data).to_hex();
            store
                .commit_upload(up, data.len() as u64, hash.as_str(), &Cutoff::NONE)
                .unwrap();
            assert!(read_all(&store, "alice", name) == data, "{name}");
        }
        // A streamed upload (size unknown at the start) that ends small goes to the pack.
        let tiny = &data[..150];
        let mut up = store.begin_upload("alice", "tiny", None, None).unwrap();
        up.write_chunk(0, &tiny[..100]);
        up.write_chunk(100, &tiny[100..]);
        let hash = blake3::hash(tiny).to_hex();
        store
            .commit_upload(up, 150, hash.as_str(), &Cutoff::NONE)
            .unwrap();
        assert_eq!(read_all(&store, "alice", "tiny"), tiny);
        // And after a restart, read from disk rather than from what was just written.
        let store = Store::open(dir.path(), 0).unwrap();
        for name in ["exact", "odd", "small first"] {
            assert!(read_all(&store, "alice", name) == data, "{name}");
        }
        assert_eq!(read_all(&store, "alice", "tiny"), tiny);
    }

    #[test]
    fn upload_replace_rename_delete_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        put(&store, "alice", "a.txt", b"one").unwrap();
        let reader = store.open_read("alice", "a.txt").unwrap();
        put(&store, "alice", "a.txt", b"two!").unwrap();
        // The old handle still reads the old version.
        assert_eq!(&reader.read(0, 100).unwrap()[..], b"one");
        assert_eq!(read_all(&store, "alice", "a.txt"), b"two!");
        store
            .rename("alice", "a.txt", "b.txt", &Cutoff::NONE)
            .unwrap();
        assert!(matches!(
            store.stat("alice", "a.txt"),
            Err(ServerError::NotFound(_))
        ));
        put(&store, "alice", "c.txt", b"c").unwrap();
        store.delete("alice", "c.txt", &Cutoff::NONE).unwrap();

        let store = Store::open(dir.path(), 0).unwrap();
        let list = store.list("alice").unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name, "b.txt");
        assert_eq!(read_all(&store, "alice", "b.txt"), b"two!");
        assert_eq!(store.space("alice", None).unwrap().used, 4);
        let blobs = fs::read_dir(dir.path().join("files/alice"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".blob")
            })
            .count();
        assert_eq!(blobs, 1);
    }

    #[test]
    fn bad_checksum_and_size_keep_old_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        put(&store, "alice", "f", b"old").unwrap();
        let mut up = store.begin_upload("alice", "f", None, None).unwrap();
        up.write_chunk(0, b"new");
        assert!(matches!(
            store.commit_upload(up, 3, "00", &Cutoff::NONE),
            Err(ServerError::ChecksumMismatch)
        ));
        let up = store.begin_upload("alice", "f", None, None).unwrap();
        assert!(store.commit_upload(up, 3, "00", &Cutoff::NONE).is_err());
        assert_eq!(read_all(&store, "alice", "f"), b"old");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn quota_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        assert!(matches!(
            store.begin_upload("alice", "f", Some(11), Some(10)),
            Err(ServerError::QuotaExceeded(_))
        ));
        let mut up = store.begin_upload("alice", "f", None, Some(10)).unwrap();
        up.write_chunk(0, &[0; 8]);
        up.write_chunk(8, &[0; 8]);
        assert!(matches!(
            store.commit_upload(up, 16, "x", &Cutoff::NONE),
            Err(ServerError::QuotaExceeded(_))
        ));
    }

    #[test]
    fn listing_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        for i in 0..7 {
            put(&store, "alice", &format!("f{i}"), b"x").unwrap();
        }
        let (p1, more) = store.list_page("alice", None, 3, usize::MAX).unwrap();
        assert!(more);
        let (p2, _) = store
            .list_page("alice", Some(&p1[2].name), 3, usize::MAX)
            .unwrap();
        let (p3, more) = store
            .list_page("alice", Some(&p2[2].name), 3, usize::MAX)
            .unwrap();
        assert!(!more);
        let names: Vec<_> = p1
            .iter()
            .chain(&p2)
            .chain(&p3)
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(names, ["f0", "f1", "f2", "f3", "f4", "f5", "f6"]);
    }

    #[test]
    fn names_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        for bad in ["../x", "a/b", ".", "..", "a\0b"] {
            assert!(matches!(
                put(&store, "alice", bad, b"x"),
                Err(ServerError::InvalidName(_))
            ));
        }
        assert!(matches!(
            put(&store, "../etc", "x", b"x"),
            Err(ServerError::InvalidName(_))
        ));
    }

    fn put_small(store: &Store, owner: &str, name: &str, data: &[u8]) -> FileInfo {
        let hash = blake3::hash(data).to_hex();
        store
            .put(owner, name, data, hash.as_str(), None, &Cutoff::NONE)
            .unwrap()
    }

    fn names(dir: &Path, suffix: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(suffix))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn small_files_live_in_the_pack_and_survive_reload() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("files/alice");
        let store = Store::open(dir.path(), 0).unwrap();
        put_small(&store, "alice", "a", b"first");
        let reader = store.open_read("alice", "a").unwrap();
        put_small(&store, "alice", "a", b"second");
        put_small(&store, "alice", "b", b"");
        put_small(&store, "alice", "c", b"doomed");
        store.delete("alice", "c", &Cutoff::NONE).unwrap();
        store.rename("alice", "a", "d", &Cutoff::NONE).unwrap();
        // An old reader keeps its version; no blob and no per-file metadata was written.
        assert_eq!(&reader.read(0, 100).unwrap()[..], b"first");
        assert!(names(&folder, ".blob").is_empty());
        assert!(names(&folder, ".meta").is_empty());
        assert_eq!(names(&folder, ".dat"), ["pack-1.dat"]);
        // Rejected: wrong checksum, over quota; nothing changes.
        assert!(matches!(
            store.put("alice", "d", b"x", "00", None, &Cutoff::NONE),
            Err(ServerError::ChecksumMismatch)
        ));
        let h = blake3::hash(b"too big").to_hex();
        assert!(matches!(
            store.put("alice", "e", b"too big", h.as_str(), Some(8), &Cutoff::NONE),
            Err(ServerError::QuotaExceeded(_))
        ));

        let store = Store::open(dir.path(), 0).unwrap();
        let list: Vec<(String, u64)> = store
            .list("alice")
            .unwrap()
            .into_iter()
            .map(|f| (f.name, f.size))
            .collect();
        assert_eq!(list, [("b".to_string(), 0), ("d".to_string(), 6)]);
        assert_eq!(read_all(&store, "alice", "d"), b"second");
        assert_eq!(store.space("alice", None).unwrap().used, 6);
    }

    #[test]
    fn a_torn_journal_tail_is_cut_and_unnamed_contents_removed() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("files/alice");
        let store = Store::open(dir.path(), 0).unwrap();
        put_small(&store, "alice", "kept", b"kept");
        put(&store, "alice", "big", &vec![5u8; 100_000]).unwrap();
        drop(store);
        // A crash mid-append: half a record, an unreferenced blob and pack.
        let mut j = OpenOptions::new()
            .append(true)
            .open(folder.join(journal_name(0)))
            .unwrap();
        j.write_all(br#"{"put":{"name":"half"#).unwrap();
        fs::write(folder.join(blob_name(1)), b"orphan").unwrap();
        fs::write(folder.join(pack_name(9)), b"orphan").unwrap();

        let store = Store::open(dir.path(), 0).unwrap();
        let names_listed: Vec<String> = store
            .list("alice")
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names_listed, ["big", "kept"]);
        assert_eq!(read_all(&store, "alice", "kept"), b"kept");
        assert_eq!(names(&folder, ".blob").len(), 1);
        assert_eq!(names(&folder, ".dat"), ["pack-1.dat"]);
        // Appends after the cut are read back.
        put_small(&store, "alice", "after", b"after");
        let store = Store::open(dir.path(), 0).unwrap();
        assert_eq!(read_all(&store, "alice", "after"), b"after");
    }

    #[test]
    fn preallocated_journal_and_pack_are_written_over_and_reloaded_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("files/alice");
        let store = Store::open(dir.path(), 0).unwrap();
        put_small(&store, "alice", "a", b"first");
        put_small(&store, "alice", "b", &[7u8; 5000]);
        put_small(&store, "alice", "c", b"dies");
        store.delete("alice", "c", &Cutoff::NONE).unwrap();
        // Both files run ahead of their content: zeros to write over.
        let journal_path = folder.join(journal_name(0));
        let journal = fs::read(&journal_path).unwrap();
        let used = journal.iter().rposition(|b| *b == b'\n').unwrap() + 1;
        assert!(journal.len() as u64 >= used as u64 + JOURNAL_PREALLOC / 2);
        assert!(journal[used..].iter().all(|b| *b == 0));
        let pack_path = folder.join(pack_name(1));
        assert!(fs::metadata(&pack_path).unwrap().len() >= PACK_PREALLOC);

        // A record torn in the preallocated zeros (a crash mid-write) is cut at reload.
        let torn = fs::OpenOptions::new()
            .write(true)
            .open(&journal_path)
            .unwrap();
        torn.write_all_at(b"{\"put\":{\"name\":\"x", used as u64)
            .unwrap();
        drop(torn);
        let store = Store::open(dir.path(), 0).unwrap();
        assert_eq!(read_all(&store, "alice", "a"), b"first");
        assert_eq!(read_all(&store, "alice", "b"), vec![7u8; 5000]);
        assert!(store.stat("alice", "c").is_err());
        // The next content goes after the last one named (over the deleted one), and
        // records after the cut are kept.
        let pack_size = fs::metadata(&pack_path).unwrap().len();
        let d = put_small(&store, "alice", "d", b"after the cut");
        assert_eq!(fs::metadata(&pack_path).unwrap().len(), pack_size);
        let store = Store::open(dir.path(), 0).unwrap();
        assert_eq!(read_all(&store, "alice", "d"), b"after the cut");
        assert_eq!(read_all(&store, "alice", "a"), b"first");
        assert_eq!(read_all(&store, "alice", "b"), vec![7u8; 5000]);
        assert_eq!(store.stat("alice", "d").unwrap().version, d.version);
        assert_eq!(names(&folder, ".dat"), ["pack-1.dat"], "no compaction");
    }

    #[test]
    fn a_last_record_whose_content_never_reached_the_disk_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("files/alice");
        let store = Store::open(dir.path(), 0).unwrap();
        let v1 = put_small(&store, "alice", "x", b"first version");
        put_small(&store, "alice", "x", b"second version");
        drop(store);
        // A crash after the record's write but before the content's: its bytes are the
        // preallocated zeros.
        let pack = fs::OpenOptions::new()
            .write(true)
            .open(folder.join(pack_name(1)))
            .unwrap();
        pack.write_all_at(&[0u8; 14], 13).unwrap();
        drop(pack);
        let store = Store::open(dir.path(), 0).unwrap();
        assert_eq!(read_all(&store, "alice", "x"), b"first version");
        assert_eq!(store.stat("alice", "x").unwrap().version, v1.version);
        // The journal goes on from there.
        put_small(&store, "alice", "y", b"later");
        let store = Store::open(dir.path(), 0).unwrap();
        assert_eq!(read_all(&store, "alice", "y"), b"later");
        assert_eq!(read_all(&store, "alice", "x"), b"first version");
    }

    #[test]
    fn journal_is_snapshotted_and_pack_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("files/alice");
        let store = Store::open(dir.path(), 0).unwrap();
        let big = vec![1u8; PACK_MAX as usize];
        // Overwrites make garbage: enough to compact, and enough records to snapshot.
        let rounds = (PACK_MIN_GARBAGE / PACK_MAX) * 2 + 8;
        for i in 0..rounds {
            let mut data = big.clone();
            data[0] = i as u8;
            put_small(&store, "alice", "hot", &data);
        }
        put_small(&store, "alice", "cold", b"cold");
        for i in 0..SNAPSHOT_MIN_RECORDS {
            put_small(&store, "alice", "tiny", &i.to_le_bytes());
        }
        assert!(fs::metadata(folder.join(SNAPSHOT)).is_ok(), "no snapshot");
        let journals = names(&folder, ".jsonl");
        assert_eq!(journals.len(), 1, "{journals:?}");
        assert_ne!(journals[0], journal_name(0), "journal never switched");
        let journal = fs::read(folder.join(&journals[0])).unwrap();
        let records = journal.iter().filter(|b| **b == b'\n').count() as u64;
        assert!(
            records < SNAPSHOT_MIN_RECORDS,
            "journal not folded: {records} records"
        );
        let packs = names(&folder, ".dat");
        assert_eq!(packs.len(), 1);
        assert_ne!(packs[0], "pack-1.dat", "pack never compacted");
        let pack_len = fs::metadata(folder.join(&packs[0])).unwrap().len();
        assert!(pack_len < PACK_MIN_GARBAGE * 3, "pack is {pack_len} bytes");

        let store = Store::open(dir.path(), 0).unwrap();
        let mut want = big.clone();
        want[0] = (rounds - 1) as u8;
        assert_eq!(read_all(&store, "alice", "hot"), want);
        assert_eq!(read_all(&store, "alice", "cold"), b"cold");
        assert_eq!(
            read_all(&store, "alice", "tiny"),
            (SNAPSHOT_MIN_RECORDS - 1).to_le_bytes()
        );
    }

    #[test]
    fn folders_of_the_per_file_metadata_layout_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("files/alice");
        fs::create_dir_all(&folder).unwrap();
        fs::write(folder.join(blob_name(7)), b"legacy").unwrap();
        let meta = format!(
            r#"{{"name":"old.txt","size":6,"mtime_ns":1,"version":7,"blake3":"{}"}}"#,
            blake3::hash(b"legacy").to_hex()
        );
        fs::write(folder.join("0123456789abcdef0123456789abcdef.meta"), meta).unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        assert_eq!(read_all(&store, "alice", "old.txt"), b"legacy");
        assert!(names(&folder, ".meta").is_empty());
        put_small(&store, "alice", "new.txt", b"new");
        let store = Store::open(dir.path(), 0).unwrap();
        assert_eq!(read_all(&store, "alice", "old.txt"), b"legacy");
        assert_eq!(read_all(&store, "alice", "new.txt"), b"new");
    }
}
