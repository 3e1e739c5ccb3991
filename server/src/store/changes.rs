//! Changing a tree: each change is checked in the tree (`tree::Tree::plan_*`), made
//! durable as one journal record, applied, and turned into the events it makes, split into
//! what the owner's sessions and what others' may see.

use sharefs_protocol::name::{check_symlink_target, MAX_PATH};
use sharefs_protocol::{EntryKind, FileInfo, MODE_MASK};

use super::folder::Folder;
use super::tree::{Node, Op};
use super::{check_lookup_name, check_new_name, events, lock, Published, Store};
use crate::cutoff::Cutoff;
use crate::error::{Result, ServerError};
use crate::fsutil;
use crate::space::RECORD_ROOM;

impl Store {
    /// Makes `ops` durable as one record and applies them; returns the events they make.
    /// With `lazy` (a change without content whose client allows it) the record's
    /// fdatasync is left to the folder's next durable change, a `sync` or the flusher.
    pub(super) fn change(
        &self,
        folder: &mut Folder,
        owner: &str,
        ops: Vec<Op>,
        pending: Option<(u64, u64)>,
        lazy: bool,
    ) -> Result<Vec<Published>> {
        let before = events::before(&folder.tree, &ops);
        // Callers claimed room for a record of ordinary size; one of fat rows (names and
        // link targets that escape to six bytes a byte) claims the rest.
        let record: u64 = ops
            .iter()
            .map(|op| match op {
                Op::Put(n) => 512 + 6 * (n.name.len() + n.target.as_ref().map_or(0, String::len)),
                Op::Remove { .. } => 64,
            } as u64)
            .sum();
        let extra = record.saturating_sub(RECORD_ROOM);
        let _extra = if extra > 0 {
            Some(self.inner.space.claim(extra)?)
        } else {
            None
        };
        folder.commit(ops.clone(), pending, lazy)?;
        if folder.unsynced() {
            self.inner.flush.queue(owner);
        }
        let events = events::of(&folder.tree, owner, ops, before);
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
        self.create(owner, cutoff, |id, now| {
            dir_node(id, parent, name, mode, now)
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
        check_link_target(target)?;
        self.create(owner, cutoff, |id, now| {
            link_node(id, parent, name, target, now)
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
        let events = self.change(&mut folder, owner, ops, None, cutoff.is_lazy())?;
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
        // space preallocated ahead of it, so it is allowed however full the disk is. Durable
        // before its answer, whatever the client allows.
        self.change(&mut folder, owner, ops, None, false)
    }

    /// Moves `name` in `parent` to `new_name` in `new_parent` in one journal record (see
    /// `Tree::plan_rename`). Returns the moved entry.
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
        // Durable before its answer, whatever the client allows.
        let events = self.change(&mut folder, owner, ops, None, false)?;
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
        set_attrs(&mut node, mode, atime_ns, mtime_ns, fsutil::now_ns());
        let _room = self.inner.space.claim(RECORD_ROOM)?;
        let info = node.info(owner);
        let events = self.change(
            &mut folder,
            owner,
            vec![Op::Put(node)],
            None,
            cutoff.is_lazy(),
        )?;
        Ok((info, events))
    }
}

/// A new directory `name` in `parent` (its name already checked).
pub fn dir_node(id: u64, parent: u64, name: &str, mode: u32, now: i64) -> Node {
    let mut node = Node::new(id, parent, name, EntryKind::Dir, mode & MODE_MASK, now);
    node.version = 1;
    node
}

/// Refuses a link target that is too long or not a path.
pub fn check_link_target(target: &str) -> Result<()> {
    if target.len() > MAX_PATH {
        return Err(ServerError::NameTooLong(format!(
            "a link target is at most {MAX_PATH} bytes"
        )));
    }
    check_symlink_target(target).map_err(ServerError::InvalidArgument)
}

/// A new symbolic link `name` in `parent` to `target` (both already checked).
pub fn link_node(id: u64, parent: u64, name: &str, target: &str, now: i64) -> Node {
    let mut node = Node::new(id, parent, name, EntryKind::Symlink, 0o777, now);
    node.size = target.len() as u64;
    node.target = Some(target.to_string());
    node.version = 1;
    node
}

/// Sets the mode and times given; the ctime becomes `now`.
pub fn set_attrs(
    node: &mut Node,
    mode: Option<u32>,
    atime_ns: Option<i64>,
    mtime_ns: Option<i64>,
    now: i64,
) {
    if let Some(mode) = mode {
        node.mode = mode & MODE_MASK;
    }
    if let Some(t) = atime_ns {
        node.atime_ns = t;
    }
    if let Some(t) = mtime_ns {
        node.mtime_ns = t;
    }
    node.ctime_ns = now;
}
