//! Reading a tree: lookups, listings, paths and opening files, each checked against the
//! caller (see [`access`]).

use super::tree::Content;
use super::{access, lock, Caller, OpenFile, Store};
use crate::error::Result;
use sharefs_protocol::FileInfo;

impl Store {
    /// The entry `id` of `owner`'s tree.
    pub fn stat(&self, owner: &str, id: u64, caller: Caller) -> Result<FileInfo> {
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        access::stat(&folder.tree, owner, id, caller)
    }

    /// The version, size and hex BLAKE3 hash of the current content of `owner`'s file.
    pub fn content_hash(&self, owner: &str, id: u64) -> Result<(u64, u64, String)> {
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        access::content_hash(&folder.tree, owner, id)
    }

    /// The entry `name` in directory `parent`.
    pub fn lookup(&self, owner: &str, parent: u64, name: &str, caller: Caller) -> Result<FileInfo> {
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        access::lookup(&folder.tree, owner, parent, name, caller)
    }

    /// The entry at `path` from the root, by lookups (links are not followed).
    pub fn resolve(&self, owner: &str, path: &str, caller: Caller) -> Result<FileInfo> {
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        access::resolve(&folder.tree, owner, path, caller)
    }

    /// One page of directory `dir` (see [`access::list_page`]).
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
        access::list_page(&folder.tree, owner, dir, after, limit, max_bytes, caller)
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

    /// Opens the current version of file `id` for reading, with its path.
    pub fn open_read(&self, owner: &str, id: u64, caller: Caller) -> Result<(OpenFile, String)> {
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        let (node, path) = access::readable_file(&folder.tree, owner, id, caller)?;
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
