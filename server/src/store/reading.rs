//! Reading a tree: lookups, listings, paths and opening files, each checked against the
//! caller: the owner reads everything, others what the "other" bits of the entry and of
//! every directory above it let them (see `docs/PROTOCOL.md`).

use sharefs_protocol::name::{split_path, MAX_PATH};
use sharefs_protocol::{EntryKind, FileInfo, ROOT_ID};

use super::tree::{self, Content, OTHER_READ};
use super::{check_lookup_name, denied, lock, Caller, OpenFile, Store};
use crate::error::{Result, ServerError};

impl Store {
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
            return Err(denied(owner, format!("#{id}")));
        }
        Ok(node.info(owner))
    }

    /// The version, size and hex BLAKE3 hash of the current content of `owner`'s file
    /// `id` (the owner's own question: others are not told hashes).
    pub fn content_hash(&self, owner: &str, id: u64) -> Result<(u64, u64, String)> {
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        let node = folder
            .tree
            .get(id)
            .ok_or_else(|| ServerError::NotFound(format!("{owner}/#{id}")))?;
        if node.kind != EntryKind::File {
            return Err(ServerError::InvalidArgument(format!(
                "{owner}/#{id} is not a regular file"
            )));
        }
        Ok((node.version, node.size, node.blake3.clone()))
    }

    /// The entry `name` in directory `parent`. Others need search permission on `parent`
    /// and its every ancestor.
    pub fn lookup(&self, owner: &str, parent: u64, name: &str, caller: Caller) -> Result<FileInfo> {
        check_lookup_name(name)?;
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        let tree = &folder.tree;
        // Others learn nothing of a directory they may not reach, not even its kind.
        if caller == Caller::Other && tree.get(parent).is_some() && !tree.others_may_see(parent) {
            return Err(denied(owner, format!("#{parent}")));
        }
        let p = tree.dir(parent, &format!("{owner}/#{parent}"))?;
        if caller == Caller::Other && p.mode & tree::OTHER_EXEC == 0 {
            return Err(denied(owner, format!("#{parent}")));
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
        if caller == Caller::Other && tree.get(dir).is_some() && !tree.others_may_see(dir) {
            return Err(denied(owner, format!("#{dir}")));
        }
        let d = tree.dir(dir, &format!("{owner}/#{dir}"))?;
        if caller == Caller::Other && d.mode & OTHER_READ == 0 {
            return Err(denied(owner, format!("#{dir}")));
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
        if caller == Caller::Other && (node.mode & OTHER_READ == 0 || !tree.others_may_see(id)) {
            return Err(denied(owner, format!("#{id}")));
        }
        let path = tree.path_of(id);
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
}
