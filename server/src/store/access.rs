//! What a caller may see of one user's tree, answered from the tree alone: the owner
//! sees everything, others what the "other" bits of the entry and of every directory
//! above it let them (see `docs/PROTOCOL.md`). Both storage backends answer reads with
//! these, after making sure their copy of the tree is current.

use sharefs_protocol::name::{split_path, MAX_PATH};
use sharefs_protocol::{EntryKind, FileInfo, ROOT_ID};

use super::tree::{Node, Tree, OTHER_EXEC, OTHER_READ};
use super::{check_lookup_name, denied, Caller};
use crate::error::{Result, ServerError};

/// The entry `id`. Others need search permission on its every ancestor.
pub fn stat(tree: &Tree, owner: &str, id: u64, caller: Caller) -> Result<FileInfo> {
    let node = tree
        .get(id)
        .ok_or_else(|| ServerError::NotFound(format!("{owner}/#{id}")))?;
    if caller == Caller::Other && !tree.others_may_see(id) {
        return Err(denied(owner, format!("#{id}")));
    }
    Ok(node.info(owner))
}

/// Version, size and hex BLAKE3 hash of file `id` (the owner's own question: others are
/// not told hashes).
pub fn content_hash(tree: &Tree, owner: &str, id: u64) -> Result<(u64, u64, String)> {
    let node = tree
        .get(id)
        .ok_or_else(|| ServerError::NotFound(format!("{owner}/#{id}")))?;
    if node.kind != EntryKind::File {
        return Err(ServerError::InvalidArgument(format!(
            "{owner}/#{id} is not a regular file"
        )));
    }
    Ok((node.version, node.size, node.blake3.to_hex()))
}

/// The entry `name` in directory `parent`. Others need search permission on `parent` and
/// its every ancestor.
pub fn lookup(
    tree: &Tree,
    owner: &str,
    parent: u64,
    name: &str,
    caller: Caller,
) -> Result<FileInfo> {
    check_lookup_name(name)?;
    // Others learn nothing of a directory they may not reach, not even its kind.
    if caller == Caller::Other && tree.get(parent).is_some() && !tree.others_may_see(parent) {
        return Err(denied(owner, format!("#{parent}")));
    }
    let p = tree.dir(parent, &format!("{owner}/#{parent}"))?;
    if caller == Caller::Other && p.mode & OTHER_EXEC == 0 {
        return Err(denied(owner, format!("#{parent}")));
    }
    tree.lookup(parent, name)
        .map(|n| n.info(owner))
        .ok_or_else(|| ServerError::NotFound(format!("{owner}/{name}")))
}

/// The entry at `path` from the root, by lookups (links are not followed).
pub fn resolve(tree: &Tree, owner: &str, path: &str, caller: Caller) -> Result<FileInfo> {
    if path.len() > MAX_PATH {
        return Err(ServerError::NameTooLong(format!(
            "a path is at most {MAX_PATH} bytes"
        )));
    }
    let names = split_path(path).map_err(ServerError::InvalidName)?;
    let mut at = tree
        .get(ROOT_ID)
        .ok_or_else(|| ServerError::Internal("a tree without a root".into()))?;
    for (i, name) in names.iter().enumerate() {
        let so_far = || names[..i].join("/");
        if !at.is_dir() {
            return Err(ServerError::NotADirectory(format!("{owner}/{}", so_far())));
        }
        if caller == Caller::Other && at.mode & OTHER_EXEC == 0 {
            return Err(denied(owner, so_far()));
        }
        at = tree
            .lookup(at.id, name)
            .ok_or_else(|| ServerError::NotFound(format!("{owner}/{}", names[..=i].join("/"))))?;
    }
    Ok(at.info(owner))
}

/// One page of directory `dir`: at most `limit` entries after `after`, taking at most
/// `max_bytes` as JSON (at least one), and whether more follow. Others need read
/// permission on `dir` and search permission on its every ancestor.
pub fn list_page(
    tree: &Tree,
    owner: &str,
    dir: u64,
    after: Option<&str>,
    limit: usize,
    max_bytes: usize,
    caller: Caller,
) -> Result<(Vec<FileInfo>, bool)> {
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

/// The regular file `id` for reading, with its path. Others need read permission on the
/// file and search permission on its every ancestor.
pub fn readable_file<'t>(
    tree: &'t Tree,
    owner: &str,
    id: u64,
    caller: Caller,
) -> Result<(&'t Node, String)> {
    let node = tree
        .get(id)
        .ok_or_else(|| ServerError::NotFound(format!("{owner}/#{id}")))?;
    if caller == Caller::Other && (node.mode & OTHER_READ == 0 || !tree.others_may_see(id)) {
        return Err(denied(owner, format!("#{id}")));
    }
    let path = tree.path_of(id);
    match node.kind {
        EntryKind::File => Ok((node, path)),
        EntryKind::Dir => Err(ServerError::IsADirectory(format!("{owner}/{path}"))),
        EntryKind::Symlink => Err(ServerError::InvalidArgument(format!(
            "{owner}/{path} is a symbolic link"
        ))),
    }
}
