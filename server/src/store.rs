//! The embedded storage: per user, a tree of entries kept in an fsynced append-only JSON
//! journal with snapshots (the metadata store), contents in a pack of small files and one
//! blob file per large one (the blob store). Sessions reach it through the operations of
//! [`Store`], which are those of the [`crate::storage`] traits; users and notifications
//! keep their own files (`users`, `hub`).
//!
//! Layout under the data directory:
//! ```text
//! tmp/part-<id>, tmp/part-<id>.json  uploads being received, kept for a resume ([`parts`])
//! files/<user>/snapshot.json         {"format": 2, "journal": n, "next_id": k, "entries": [Node, ...]}
//! files/<user>/journal-<n>.jsonl     one JSON record per change since that snapshot
//! files/<user>/<version>.blob        content of one large file version
//! files/<user>/pack-<n>.dat          contents of small files, appended one after another
//! ```
//! An entry is a row: id, parent, name, kind, mode, size, three times, version, the content
//! (a blob, or a pack and offset) and a link's target. A journal record is one
//! transaction: a list of ops, each the whole new row of an entry or the removal of one,
//! so a rename that replaces its target is one record, and moving a directory is one
//! record of three rows (the directory and its old and new parent) whatever it holds.
//!
//! A change is durable when its journal record is: the content is written and made durable
//! first (a blob renamed into place with its directory fsynced, or bytes appended to the
//! pack and fdatasynced), then the record is appended and the journal fdatasynced. One
//! exception, for speed: bytes appended over space the pack already has on disk are sent
//! to the device together with their record (`sync_file_range`), waited for, and made
//! durable by the journal's fdatasync, whose device cache flush covers every write
//! completed before it. Until that flush either may reach the disk without the other; a
//! record whose content did not is the journal's last, never acknowledged, and a load
//! drops it when a content it names does not match its hash. A crash at any point leaves
//! the old or the new state; a torn last record is cut off at the next load, and blobs and
//! packs that no entry names are removed then. Blobs are named by a version, so a new
//! version never overwrites the old one, and readers that opened the old content keep
//! reading it, through renames, moves of a parent and removal (POSIX keeps unlinked files
//! readable; pack bytes are never rewritten in place).
//!
//! A small file costs one pack append and one journal append — one device cache flush
//! (two when the pack grows, once per 4 MiB), no new inode, no directory fsync — which is
//! what makes creating and deleting many small files cheap. Both files are kept ahead of
//! their content with zeros (up to 1 MiB for a journal, 4 MiB for a pack), so an append
//! overwrites allocated space and its fdatasync updates no inode; a reload takes the end
//! of a journal from its last whole record and the end of a pack from the last content an
//! entry names. When the journal holds more records than twice the folder's entries it is
//! folded into a new snapshot (temp file, fsync, rename) that names a new, empty journal,
//! so a crash between the steps never replays old records over a newer snapshot; when more
//! than half of the pack is garbage (deleted or replaced contents) the live contents are
//! copied into a new pack and a snapshot switches to it. Both costs are amortised over at
//! least as many changes as they copy, so cost per change does not grow with the number
//! of entries; in memory, lookups and listing pages are O(log n) and permission checks
//! O(depth) (see [`tree`]).
//!
//! A change the client marks `lazy` (one without content: a directory, a link, modes and
//! times, an empty file) is answered once its record is written, before the fdatasync,
//! which the next durable change of the folder, a `sync` request or the [`flusher`]
//! (within `LAZY_SYNC_MS`) does for it.
//!
//! Folders of the flat layout (protocol 1) are migrated on first load ([`migrate`]).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sharefs_protocol::name::{check_file_lookup, check_file_name, check_user_name, MAX_FILE_NAME};
use sharefs_protocol::{Event, Space};

use crate::error::{Result, ServerError};
use crate::fsutil;
use crate::reservations::Reservations;
use crate::space::DiskSpace;

pub mod access;
pub mod changes;
pub mod contents;
pub mod digest;
pub mod events;
mod flusher;
pub mod folder;
pub mod journal;
pub mod migrate;
pub mod pack;
pub mod parts;
pub mod read;
mod reading;
pub mod tree;
pub mod upload;

#[cfg(test)]
mod tests;

use folder::Folder;
pub use read::OpenFile;
use tree::{Content, Node};
pub use upload::{StagedUpload, UploadTarget};

/// Contents up to this size go into the folder's pack instead of a blob file each.
pub const PACK_MAX: u64 = 64 * 1024;

/// An event of a change, as the owner's sessions see it and as other users' sessions
/// may (`None`: they must not learn of it, it is in a part of the tree closed to them).
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub owner: Event,
    pub others: Option<Event>,
}

/// Who asks: the owner may do anything in their tree, others what its modes let them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Owner,
    Other,
}

impl Caller {
    pub fn of(owner: &str, user: &str) -> Caller {
        if owner == user {
            Caller::Owner
        } else {
            Caller::Other
        }
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
    /// Uploads in progress, attached to a session or waiting for a resume.
    parts: Arc<parts::Parts>,
    /// Folders whose lazy changes are not durable yet (see [`flusher`]).
    flush: Arc<flusher::FlushQueue>,
}

impl Drop for StoreInner {
    fn drop(&mut self) {
        self.flush.close();
    }
}

/// A new name: the rules of [`check_file_name`], too long ones told apart.
pub(crate) fn check_new_name(name: &str) -> Result<()> {
    if name.len() > MAX_FILE_NAME {
        return Err(ServerError::NameTooLong(format!(
            "a name is at most {MAX_FILE_NAME} bytes"
        )));
    }
    check_file_name(name).map_err(ServerError::InvalidName)
}

/// The name of an existing entry: the rules of [`check_file_lookup`].
pub(crate) fn check_lookup_name(name: &str) -> Result<()> {
    if name.len() > MAX_FILE_NAME {
        return Err(ServerError::NameTooLong(format!(
            "a name is at most {MAX_FILE_NAME} bytes"
        )));
    }
    check_file_lookup(name).map_err(ServerError::InvalidName)
}

fn denied(owner: &str, what: impl std::fmt::Display) -> ServerError {
    ServerError::PermissionDenied(format!("{owner}/{what}"))
}

impl Store {
    /// Opens (creating if needed) the storage under `root` and clears leftover temp files,
    /// keeping unfinished uploads for their clients to resume.
    pub fn open(root: &Path, reserve: u64) -> Result<Store> {
        let tmp = root.join("tmp");
        fsutil::create_dir_durable(&root.join("files"))?;
        fsutil::create_dir_durable(&tmp)?;
        let parts = Arc::new(parts::Parts::open(&tmp)?);
        let flush = Arc::new(flusher::FlushQueue::default());
        let inner = Arc::new(StoreInner {
            root: root.to_path_buf(),
            tmp,
            folders: Mutex::new(HashMap::new()),
            next_version: AtomicU64::new(fsutil::now_ns().max(1) as u64),
            space: DiskSpace::new(root, reserve),
            reservations: Reservations::default(),
            parts,
            flush: flush.clone(),
        });
        flusher::start(flush, Arc::downgrade(&inner));
        Ok(Store { inner })
    }

    /// Makes every change of `owner`'s tree answered so far durable (see [`flusher`]).
    pub fn sync(&self, owner: &str) -> Result<()> {
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        folder.sync()
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
        let dir = self.inner.root.join("files").join(owner);
        let folder = Folder::load(
            dir,
            owner,
            &self.inner.tmp,
            self.inner.space.clone(),
            &self.inner.next_version,
        )?;
        // The load removed the blobs of commits that did not reach the journal; a part
        // still linked to a blob now is one whose commit did.
        self.inner.parts.settle(owner);
        let folder = Arc::new(Mutex::new(folder));
        folders.insert(owner.to_string(), folder.clone());
        Ok(folder)
    }

    /// Space as the owner should see it.
    pub fn space(&self, owner: &str, quota: Option<u64>) -> Result<Space> {
        let folder = self.folder(owner)?;
        let (used, files) = {
            let f = lock(&folder)?;
            // The root is the folder itself, not one of its entries.
            (f.tree.used(), f.tree.len().saturating_sub(1) as u64)
        };
        let (total, disk_avail) = self.inner.space.usable()?;
        Ok(match quota {
            Some(q) => {
                let left = q.saturating_sub(used + self.inner.reservations.reserved(owner)?);
                Space {
                    total: q,
                    available: left.min(disk_avail),
                    used,
                    files,
                    quota_available: Some(left),
                }
            }
            None => Space {
                total,
                available: disk_avail,
                used,
                files,
                quota_available: None,
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

pub(crate) fn blob_name(id: u64) -> String {
    format!("{id:016x}.blob")
}

/// Whether the packed content `node` names is on disk with the hash it was stored with
/// (true for contents that are not packed).
pub(crate) fn packed_content_intact(dir: &Path, node: &Node) -> bool {
    let Some(Content::Pack(p)) = node.content else {
        return true;
    };
    let mut buf = vec![0u8; node.size as usize];
    let read = fsutil::open_read(&dir.join(pack::pack_name(p.pack)))
        .and_then(|f| f.read_exact_at(&mut buf, p.offset));
    read.is_ok() && node.blake3.is(&blake3::hash(&buf))
}

pub(crate) fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove old blob");
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| ServerError::Internal("a storage lock was poisoned by a panic".into()))
}
