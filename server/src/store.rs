//! The embedded storage: per user, a tree of entries kept in an fsynced append-only JSON
//! journal with snapshots (the metadata store), contents in a pack of small files and one
//! blob file per large one (the blob store). Sessions reach it through the operations of
//! [`Store`], which are those of the [`crate::storage`] traits; users and notifications
//! keep their own files (`users`, `hub`).
//!
//! Layout under the data directory:
//! ```text
//! tmp/                               uploads being received (emptied at start)
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
//! Folders of the flat layout (protocol 1) are migrated on first load ([`migrate`]).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sharefs_protocol::name::{
    check_file_lookup, check_file_name, check_symlink_target, check_user_name, split_path,
    MAX_FILE_NAME, MAX_PATH,
};
use sharefs_protocol::{EntryKind, Event, FileInfo, Space, DEFAULT_FILE_MODE, MODE_MASK, ROOT_ID};

use crate::cutoff::Cutoff;
use crate::error::{Result, ServerError};
use crate::fsutil;
use crate::reservations::{Reservation, Reservations};
use crate::space::{DiskSpace, RECORD_ROOM};

pub mod folder;
pub mod journal;
pub mod migrate;
pub mod pack;
pub mod read;
pub mod tree;
pub mod upload;

#[cfg(test)]
mod tests;

use folder::Folder;
pub use read::OpenFile;
use tree::{Content, Node, Op, PackRef, Tree, OTHER_READ};
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
}

/// A new name: the rules of [`check_file_name`], too long ones told apart.
fn check_new_name(name: &str) -> Result<()> {
    if name.len() > MAX_FILE_NAME {
        return Err(ServerError::NameTooLong(format!(
            "a name is at most {MAX_FILE_NAME} bytes"
        )));
    }
    check_file_name(name).map_err(ServerError::InvalidName)
}

/// The name of an existing entry: the rules of [`check_file_lookup`].
fn check_lookup_name(name: &str) -> Result<()> {
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
        let dir = self.inner.root.join("files").join(owner);
        let folder = Folder::load(
            dir,
            owner,
            &self.inner.tmp,
            self.inner.space.clone(),
            &self.inner.next_version,
        )?;
        let folder = Arc::new(Mutex::new(folder));
        folders.insert(owner.to_string(), folder.clone());
        Ok(folder)
    }

    // ---- Reading the tree --------------------------------------------------------------

    /// The entry `id` of `owner`'s tree. Others need search permission on its every
    /// ancestor.
    pub fn stat(&self, owner: &str, id: u64, caller: Caller) -> Result<FileInfo> {
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        let tree = &folder.tree;
        let node = tree
            .get(id)
            .ok_or_else(|| ServerError::NotFound(format!("{owner}/#{id}")))?;
        if caller == Caller::Other && !tree.others_may_see(id) {
            return Err(denied(owner, tree.path_of(id)));
        }
        Ok(node.info(owner))
    }

    /// The entry `name` in directory `parent`. Others need search permission on `parent`
    /// and its every ancestor.
    pub fn lookup(&self, owner: &str, parent: u64, name: &str, caller: Caller) -> Result<FileInfo> {
        check_lookup_name(name)?;
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        let tree = &folder.tree;
        tree.dir(parent, &format!("{owner}/#{parent}"))?;
        if caller == Caller::Other && !tree.others_may_search(parent) {
            return Err(denied(owner, tree.path_of(parent)));
        }
        tree.lookup(parent, name)
            .map(|n| n.info(owner))
            .ok_or_else(|| ServerError::NotFound(format!("{owner}/{name}")))
    }

    /// The entry at `path` from the root, by lookups (links are not followed).
    pub fn resolve(&self, owner: &str, path: &str, caller: Caller) -> Result<FileInfo> {
        if path.len() > MAX_PATH {
            return Err(ServerError::NameTooLong(format!(
                "a path is at most {MAX_PATH} bytes"
            )));
        }
        let names = split_path(path).map_err(ServerError::InvalidName)?;
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        let tree = &folder.tree;
        let mut at = tree
            .get(ROOT_ID)
            .ok_or_else(|| ServerError::Internal("a tree without a root".into()))?;
        for (i, name) in names.iter().enumerate() {
            let so_far = || names[..i].join("/");
            if !at.is_dir() {
                return Err(ServerError::NotADirectory(format!("{owner}/{}", so_far())));
            }
            if caller == Caller::Other && at.mode & tree::OTHER_EXEC == 0 {
                return Err(denied(owner, so_far()));
            }
            at = tree.lookup(at.id, name).ok_or_else(|| {
                ServerError::NotFound(format!("{owner}/{}", names[..=i].join("/")))
            })?;
        }
        Ok(at.info(owner))
    }

    /// One page of directory `dir`: at most `limit` entries after `after`, taking at most
    /// `max_bytes` as JSON (at least one), and whether more follow. Others need read
    /// permission on `dir` and search permission on its every ancestor.
    pub fn list_page(
        &self,
        owner: &str,
        dir: u64,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
        caller: Caller,
    ) -> Result<(Vec<FileInfo>, bool)> {
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        let tree = &folder.tree;
        let d = tree.dir(dir, &format!("{owner}/#{dir}"))?;
        if caller == Caller::Other && (d.mode & OTHER_READ == 0 || !tree.others_may_see(dir)) {
            return Err(denied(owner, tree.path_of(dir)));
        }
        let mut iter = tree.children_after(dir, after).map(|n| n.info(owner));
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

    /// Every entry of `dir`, for tests and tools.
    pub fn list(&self, owner: &str, dir: u64) -> Result<Vec<FileInfo>> {
        Ok(self
            .list_page(owner, dir, None, usize::MAX, usize::MAX, Caller::Owner)?
            .0)
    }

    /// The path of `id` from the owner's root ("a/b/c.pdf").
    pub fn path_of(&self, owner: &str, id: u64) -> Result<String> {
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        Ok(folder.tree.path_of(id))
    }

    /// Opens the current version of file `id` for reading, with its path. Others need read
    /// permission on the file and search permission on its every ancestor.
    pub fn open_read(&self, owner: &str, id: u64, caller: Caller) -> Result<(OpenFile, String)> {
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        let tree = &folder.tree;
        let node = tree
            .get(id)
            .ok_or_else(|| ServerError::NotFound(format!("{owner}/#{id}")))?;
        let path = tree.path_of(id);
        if caller == Caller::Other && (node.mode & OTHER_READ == 0 || !tree.others_may_see(id)) {
            return Err(denied(owner, path));
        }
        match node.kind {
            EntryKind::File => {}
            EntryKind::Dir => return Err(ServerError::IsADirectory(format!("{owner}/{path}"))),
            EntryKind::Symlink => {
                return Err(ServerError::InvalidArgument(format!(
                    "{owner}/{path} is a symbolic link"
                )))
            }
        }
        let (file, start) = folder.open_content(node)?;
        Ok((
            OpenFile {
                file,
                start,
                info: node.info(owner),
            },
            path,
        ))
    }

    /// Opens one's own file whose content is in the current pack of an already loaded
    /// folder, if that needs no disk access and no waiting for the folder's lock.
    pub fn try_open_packed(&self, owner: &str, id: u64) -> Option<OpenFile> {
        let folder = self.inner.folders.try_lock().ok()?.get(owner)?.clone();
        let folder = folder.try_lock().ok()?;
        let node = folder.tree.get(id)?;
        let Some(Content::Pack(p)) = node.content else {
            return None;
        };
        let pack = folder.pack.as_ref().filter(|cur| cur.id == p.pack)?;
        Some(OpenFile {
            file: pack.file.try_clone().ok()?,
            start: p.offset,
            info: node.info(owner),
        })
    }

    // ---- Changing the tree -------------------------------------------------------------

    /// Makes `ops` durable as one record and applies them; returns the events they make.
    fn change(
        &self,
        folder: &mut Folder,
        owner: &str,
        ops: Vec<Op>,
        pending: Option<(u64, u64)>,
    ) -> Result<Vec<Published>> {
        let before: Vec<(Option<Node>, bool)> = ops
            .iter()
            .map(|op| {
                let id = match op {
                    Op::Put(n) => n.id,
                    Op::Remove { id } => *id,
                };
                (folder.tree.get(id).cloned(), folder.tree.others_may_see(id))
            })
            .collect();
        folder.commit(ops.clone(), pending)?;
        let tree = &folder.tree;
        let mut events = Vec::with_capacity(ops.len());
        for (op, (prior, was_visible)) in ops.into_iter().zip(before) {
            match op {
                Op::Put(node) => {
                    let from = prior
                        .filter(|p| p.parent != node.parent || p.name != node.name)
                        .map(|p| p.place());
                    let visible = tree.others_may_see(node.id);
                    let others = match (&from, was_visible, visible) {
                        (_, _, true) => Some(Event::Changed {
                            owner: owner.to_string(),
                            file: node.info(owner),
                            from: from.clone().filter(|_| was_visible),
                        }),
                        (Some(from), true, false) => Some(Event::Removed {
                            owner: owner.to_string(),
                            id: node.id,
                            parent: from.parent,
                            name: from.name.clone(),
                        }),
                        _ => None,
                    };
                    events.push(Published {
                        owner: Event::Changed {
                            owner: owner.to_string(),
                            file: node.info(owner),
                            from,
                        },
                        others,
                    });
                }
                Op::Remove { id } => {
                    let Some(prior) = prior else { continue };
                    let event = Event::Removed {
                        owner: owner.to_string(),
                        id,
                        parent: prior.parent,
                        name: prior.name,
                    };
                    events.push(Published {
                        others: was_visible.then(|| event.clone()),
                        owner: event,
                    });
                }
            }
        }
        folder.maintain(&self.inner.tmp);
        Ok(events)
    }

    /// Creates directory `name` in `parent`.
    pub fn mkdir(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        mode: u32,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        check_new_name(name)?;
        let mode = mode & MODE_MASK;
        self.create(owner, cutoff, |id, now| {
            let mut node = Node::new(id, parent, name, EntryKind::Dir, mode, now);
            node.version = 1;
            node
        })
    }

    /// Creates the symbolic link `name` in `parent`, pointing at `target`.
    pub fn symlink(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        target: &str,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        check_new_name(name)?;
        if target.len() > MAX_PATH {
            return Err(ServerError::NameTooLong(format!(
                "a link target is at most {MAX_PATH} bytes"
            )));
        }
        check_symlink_target(target).map_err(ServerError::InvalidArgument)?;
        self.create(owner, cutoff, |id, now| {
            let mut node = Node::new(id, parent, name, EntryKind::Symlink, 0o777, now);
            node.size = target.len() as u64;
            node.target = Some(target.to_string());
            node.version = 1;
            node
        })
    }

    fn create(
        &self,
        owner: &str,
        cutoff: &Cutoff,
        make: impl FnOnce(u64, i64) -> Node,
    ) -> Result<(FileInfo, Vec<Published>)> {
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        cutoff.check()?;
        let _room = self.inner.space.claim(RECORD_ROOM)?;
        let now = fsutil::now_ns();
        let id = folder.tree.allocate_id();
        let node = make(id, now);
        let ops = folder.tree.plan_create(node, now)?;
        let events = self.change(&mut folder, owner, ops, None)?;
        let info = folder
            .tree
            .get(id)
            .map(|n| n.info(owner))
            .ok_or_else(|| ServerError::Internal("created entry missing".into()))?;
        Ok((info, events))
    }

    /// Removes `name` from `parent`: a non-directory, or with `dir` an empty directory.
    pub fn remove(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        dir: bool,
        cutoff: &Cutoff,
    ) -> Result<Vec<Published>> {
        check_lookup_name(name)?;
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        cutoff.check()?;
        let now = fsutil::now_ns();
        let ops = folder.tree.plan_remove(parent, name, dir, now)?;
        // No claim on the disk: a removal makes room, and its record goes into journal
        // space preallocated ahead of it, so it is allowed however full the disk is.
        self.change(&mut folder, owner, ops, None)
    }

    /// Moves `name` in `parent` to `new_name` in `new_parent` in one journal record (see
    /// [`Tree::plan_rename`]). Returns the moved entry.
    #[allow(clippy::too_many_arguments)]
    pub fn rename(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        noreplace: bool,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        check_lookup_name(name)?;
        check_new_name(new_name)?;
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        cutoff.check()?;
        let now = fsutil::now_ns();
        let Some(ops) = folder
            .tree
            .plan_rename(parent, name, new_parent, new_name, noreplace, now)?
        else {
            let info = folder
                .tree
                .lookup(parent, name)
                .map(|n| n.info(owner))
                .ok_or_else(|| ServerError::NotFound(format!("{owner}/{name}")))?;
            return Ok((info, Vec::new()));
        };
        let _room = self.inner.space.claim(RECORD_ROOM)?;
        let events = self.change(&mut folder, owner, ops, None)?;
        let info = folder
            .tree
            .lookup(new_parent, new_name)
            .map(|n| n.info(owner))
            .ok_or_else(|| ServerError::Internal("renamed entry missing".into()))?;
        Ok((info, events))
    }

    /// Sets an entry's mode and times; its ctime becomes now.
    pub fn set_attr(
        &self,
        owner: &str,
        id: u64,
        mode: Option<u32>,
        atime_ns: Option<i64>,
        mtime_ns: Option<i64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        cutoff.check()?;
        let mut node = folder
            .tree
            .get(id)
            .cloned()
            .ok_or_else(|| ServerError::NotFound(format!("{owner}/#{id}")))?;
        if let Some(mode) = mode {
            node.mode = mode & MODE_MASK;
        }
        if let Some(t) = atime_ns {
            node.atime_ns = t;
        }
        if let Some(t) = mtime_ns {
            node.mtime_ns = t;
        }
        node.ctime_ns = fsutil::now_ns();
        let _room = self.inner.space.claim(RECORD_ROOM)?;
        let info = node.info(owner);
        let events = self.change(&mut folder, owner, vec![Op::Put(node)], None)?;
        Ok((info, events))
    }

    // ---- Contents ----------------------------------------------------------------------

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

    /// The size of the file `target` replaces (0 if none), checking the target can take a
    /// file's content.
    fn replaced_size(tree: &Tree, owner: &str, target: &UploadTarget) -> Result<u64> {
        match target {
            UploadTarget::Replace(id) => match tree.get(*id) {
                Some(n) if n.kind == EntryKind::File => Ok(n.size),
                Some(n) if n.is_dir() => Err(ServerError::IsADirectory(format!("{owner}/#{id}"))),
                Some(_) => Err(ServerError::InvalidArgument(format!(
                    "{owner}/#{id} is a symbolic link"
                ))),
                None => Err(ServerError::NotFound(format!("{owner}/#{id}"))),
            },
            UploadTarget::At { parent, name } => {
                tree.dir(*parent, &format!("{owner}/{name}"))?;
                match tree.lookup(*parent, name) {
                    Some(n) if n.is_dir() => {
                        Err(ServerError::IsADirectory(format!("{owner}/{name}")))
                    }
                    Some(n) => Ok(n.used()),
                    None => Ok(0),
                }
            }
        }
    }

    /// The ops that make `content` the new version of `target`, and the index of the
    /// file's op in them.
    #[allow(clippy::too_many_arguments)]
    fn content_ops(
        &self,
        tree: &mut Tree,
        owner: &str,
        target: &UploadTarget,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        size: u64,
        blake3: &str,
        content: Content,
    ) -> Result<(Vec<Op>, u64)> {
        Store::replaced_size(tree, owner, target)?;
        let now = fsutil::now_ns();
        let version = self.next_version();
        let fill = |node: &mut Node| {
            node.size = size;
            node.version = version;
            node.blake3 = blake3.to_string();
            node.content = Some(content);
            node.mtime_ns = mtime_ns.unwrap_or(now);
            node.ctime_ns = now;
            if let Some(mode) = mode {
                node.mode = mode & MODE_MASK;
            }
        };
        let existing = match target {
            UploadTarget::Replace(id) => tree.get(*id),
            UploadTarget::At { parent, name } => tree.lookup(*parent, name),
        };
        let mut ops = Vec::new();
        let node = match existing {
            Some(old) if old.kind == EntryKind::File => {
                let mut node = old.clone();
                fill(&mut node);
                node
            }
            other => {
                // A new file, in place of a link if one had the name.
                let UploadTarget::At { parent, name } = target else {
                    return Err(ServerError::Internal("replacing a non-file".into()));
                };
                if let Some(link) = other {
                    ops.push(Op::Remove { id: link.id });
                } else {
                    tree.check_path_room(*parent, name)?;
                }
                let id = tree.allocate_id();
                let mut node =
                    Node::new(id, *parent, name, EntryKind::File, DEFAULT_FILE_MODE, now);
                fill(&mut node);
                node.atime_ns = now;
                ops.extend(tree.touched_dir(*parent, now).map(Op::Put));
                node
            }
        };
        let id = node.id;
        ops.insert(0, Op::Put(node));
        Ok((ops, id))
    }

    /// Starts an upload into `owner`'s tree. `quota` is the owner's quota.
    pub fn begin_upload(
        &self,
        owner: &str,
        target: UploadTarget,
        size: Option<u64>,
        mode: Option<u32>,
        quota: Option<u64>,
    ) -> Result<StagedUpload> {
        if let UploadTarget::At { name, .. } = &target {
            check_new_name(name)?;
        }
        let folder = self.folder(owner)?;
        let (allowance, held) = {
            // Reserved under the folder lock, which commits hold while they turn their
            // reservation into used bytes: no upload is counted twice, or not at all.
            let f = lock(&folder)?;
            // The old version's bytes are freed by the commit, so they count as available.
            let old = Store::replaced_size(&f.tree, owner, &target)?;
            let (allowance, _) = Store::allowance(f.tree.used().saturating_sub(old), quota);
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
        // Small uploads stay buffered: they may be read back from the cache.
        let direct = match size {
            Some(size) if size <= PACK_MAX => None,
            _ => upload::DirectWriter::open(&path),
        };
        Ok(StagedUpload {
            owner: owner.to_string(),
            target,
            mode,
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
        mtime_ns: Option<i64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
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
        let result = self.install(&upload, &file, size, hash.as_str(), mtime_ns, held, cutoff);
        if result.is_err() {
            let _ = fs::remove_file(&upload.path);
        }
        result
    }

    /// Makes the received content of `upload` (in `file`) the file's current version.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        upload: &StagedUpload,
        file: &fs::File,
        size: u64,
        hash: &str,
        mtime_ns: Option<i64>,
        held: Option<Reservation>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        let owner = upload.owner.as_str();
        file.sync_all()?;
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        cutoff.check()?;
        let old = Store::replaced_size(&folder.tree, owner, &upload.target)?;
        let (allowance, allowance_error) =
            Store::allowance(folder.tree.used().saturating_sub(old), upload.quota);
        if size > allowance {
            return Err(allowance_error);
        }
        let _room = self.inner.space.claim(RECORD_ROOM)?;
        // The blob is named by a fresh number, the version the ops give the file is another:
        // both come from the same counter, so neither collides with anything on disk.
        let blob_id = self.next_version();
        let (ops, id) = self.content_ops(
            &mut folder.tree,
            owner,
            &upload.target,
            upload.mode,
            mtime_ns,
            size,
            hash,
            Content::Blob(blob_id),
        )?;
        let blob = folder.dir.join(blob_name(blob_id));
        fs::rename(&upload.path, &blob)?;
        fsutil::sync_dir(&folder.dir)?;
        let events = match self.change(&mut folder, owner, ops, None) {
            Ok(events) => events,
            Err(e) => {
                let _ = fs::remove_file(&blob);
                return Err(e);
            }
        };
        // Used from now on, no longer reserved (still under the folder lock).
        drop(held);
        let info = folder
            .tree
            .get(id)
            .map(|n| n.info(owner))
            .ok_or_else(|| ServerError::Internal("committed file missing".into()))?;
        Ok((info, events))
    }

    /// Stores a whole file received in one piece: small ones are appended to the folder's
    /// pack, larger ones go through a blob like any upload. Blocking; durable on return.
    #[allow(clippy::too_many_arguments)]
    pub fn put(
        &self,
        owner: &str,
        target: UploadTarget,
        data: &[u8],
        blake3_hex: &str,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        quota: Option<u64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        let size = data.len() as u64;
        if size > PACK_MAX {
            let mut up = self.begin_upload(owner, target, Some(size), mode, quota)?;
            up.write_chunk(0, data);
            return self.commit_upload(up, size, blake3_hex, mtime_ns, cutoff);
        }
        if let UploadTarget::At { name, .. } = &target {
            check_new_name(name)?;
        }
        let hash = blake3::hash(data).to_hex();
        if !hash.as_str().eq_ignore_ascii_case(blake3_hex) {
            return Err(ServerError::ChecksumMismatch);
        }
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        cutoff.check()?;
        let old = Store::replaced_size(&folder.tree, owner, &target)?;
        // What uploads in progress hold of the quota counts as used.
        let reserved = match quota {
            Some(_) => self.inner.reservations.reserved(owner)?,
            None => 0,
        };
        let (allowance, allowance_error) =
            Store::allowance((folder.tree.used() + reserved).saturating_sub(old), quota);
        if size > allowance {
            return Err(allowance_error);
        }
        let _room = self.inner.space.claim(size + RECORD_ROOM)?;
        let (mut ops, id) = self.content_ops(
            &mut folder.tree,
            owner,
            &target,
            mode,
            mtime_ns,
            size,
            hash.as_str(),
            Content::Blob(0),
        )?;
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
        if let Some(Op::Put(node)) = ops.first_mut() {
            node.content = Some(Content::Pack(at));
        }
        let events = match self.change(&mut folder, owner, ops, pending) {
            Ok(events) => events,
            Err(e) => {
                // The appended bytes are garbage now.
                folder.wasted(size);
                return Err(e);
            }
        };
        let info = folder
            .tree
            .get(id)
            .map(|n| n.info(owner))
            .ok_or_else(|| ServerError::Internal("stored file missing".into()))?;
        Ok((info, events))
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
    read.is_ok()
        && blake3::hash(&buf)
            .to_hex()
            .as_str()
            .eq_ignore_ascii_case(&node.blake3)
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
