//! The inode table: which inode number stands for which entry of which user's tree, and
//! where the mount last saw it.
//!
//! An inode is handed out on first sight of an (owner, entry id) and never reused for the
//! life of the mount, since the server never reuses an id within a tree: a renamed entry
//! keeps its inode, and an open file follows its entry wherever it moves. Inode 1 is the
//! mount's root, whose children are the users' folders, each the entry [`ROOT_ID`] of its
//! owner's tree. Nodes are also indexed by (parent inode, name) so that a name is found
//! without the server and `..` is the real parent.

use std::collections::HashMap;
use std::time::Instant;

use sharefs_protocol::{EntryKind, FileInfo, ROOT_ID};

use super::listing::LISTING_MAX_AGE;

/// The mount's root: the list of users.
pub const ROOT: u64 = 1;
/// The entry id of a file created here whose first upload has not named it yet.
pub const LOCAL_ID: u64 = 0;

#[derive(Debug, Clone)]
pub struct Node {
    /// The tree it belongs to; `None` for the mount's root.
    pub owner: Option<String>,
    /// Its entry id in the owner's tree.
    pub id: u64,
    /// The inode of the directory holding it (the root's is itself).
    pub parent: u64,
    pub name: String,
    pub kind: EntryKind,
    /// What the server last said of it (by a reply or an event).
    pub info: Option<FileInfo>,
    /// Removed on the server (or here): kept for descriptors still open on it.
    pub gone: bool,
    /// When `info` was last heard of.
    seen: Option<Instant>,
}

impl Node {
    /// `info`, if heard of recently enough to answer without the server: events keep it
    /// current, and a reconnect or resync forgets it.
    pub fn fresh_info(&self) -> Option<&FileInfo> {
        self.info
            .as_ref()
            .filter(|_| self.seen.is_some_and(|t| t.elapsed() < LISTING_MAX_AGE))
    }

    /// Owner and entry id, for a node inside a user's tree.
    pub fn entry(&self) -> Option<(&str, u64)> {
        self.owner.as_deref().map(|o| (o, self.id))
    }
}

#[derive(Debug)]
pub struct Tree {
    nodes: HashMap<u64, Node>,
    by_entry: HashMap<(String, u64), u64>,
    children: HashMap<(u64, String), u64>,
    next_ino: u64,
}

impl Default for Tree {
    fn default() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                owner: None,
                id: 0,
                parent: ROOT,
                name: String::new(),
                kind: EntryKind::Dir,
                info: None,
                gone: false,
                seen: None,
            },
        );
        Tree {
            nodes,
            by_entry: HashMap::new(),
            children: HashMap::new(),
            next_ino: ROOT,
        }
    }
}

impl Tree {
    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    /// The inode of (owner, id), if the mount has seen it.
    pub fn ino_of(&self, owner: &str, id: u64) -> Option<u64> {
        self.by_entry.get(&(owner.to_string(), id)).copied()
    }

    /// The node named `name` in directory `parent`, as last seen.
    pub fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.children.get(&(parent, name.to_string())).copied()
    }

    /// All inodes (for invalidating everything).
    pub fn inos(&self) -> impl Iterator<Item = u64> + '_ {
        self.nodes.keys().copied()
    }

    /// The folder of `user`, a child of the root.
    pub fn user_folder(&mut self, user: &str) -> u64 {
        if let Some(ino) = self.ino_of(user, ROOT_ID) {
            return ino;
        }
        let ino = self.alloc(Node {
            owner: Some(user.to_string()),
            id: ROOT_ID,
            parent: ROOT,
            name: user.to_string(),
            kind: EntryKind::Dir,
            info: None,
            gone: false,
            seen: None,
        });
        self.by_entry.insert((user.to_string(), ROOT_ID), ino);
        self.children.insert((ROOT, user.to_string()), ino);
        ino
    }

    /// Records what the server says of an entry: its node (created on first sight) with
    /// these attributes, placed at its parent and name if the parent is known. Returns
    /// the node's inode, or `None` for an entry of an unknown directory.
    pub fn place(&mut self, info: &FileInfo) -> Option<u64> {
        if info.id == ROOT_ID {
            let ino = self.user_folder(&info.owner);
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.info = Some(info.clone());
                n.seen = Some(Instant::now());
            }
            return Some(ino);
        }
        let known = self.ino_of(&info.owner, info.id);
        // Older than what the mount already has of the entry (an event overtaken by the
        // reply to a later change): the server's ctime never goes back, so it is ignored.
        if let Some(ino) = known {
            let stale = self
                .nodes
                .get(&ino)
                .and_then(|n| n.info.as_ref())
                .is_some_and(|old| {
                    old.id == info.id && old.owner == info.owner && old.ctime_ns > info.ctime_ns
                });
            if stale {
                return Some(ino);
            }
        }
        let parent = self.ino_of(&info.owner, info.parent);
        let Some(parent) = parent else {
            // Somewhere the mount has not been: only the attributes are worth keeping.
            if let Some(n) = known.and_then(|ino| self.nodes.get_mut(&ino)) {
                n.info = Some(info.clone());
                n.seen = Some(Instant::now());
            }
            return known;
        };
        // A file created here whose create is still travelling: this is its entry.
        let local = self
            .children
            .get(&(parent, info.name.clone()))
            .copied()
            .filter(|i| {
                self.nodes.get(i).is_some_and(|n| {
                    n.id == LOCAL_ID && n.kind == info.kind && n.owner.as_ref() == Some(&info.owner)
                })
            });
        let ino = match known.or(local) {
            Some(ino) => {
                self.bind(ino, info);
                ino
            }
            None => {
                let ino = self.alloc(Node {
                    owner: Some(info.owner.clone()),
                    id: info.id,
                    parent,
                    name: info.name.clone(),
                    kind: info.kind,
                    info: None,
                    gone: false,
                    seen: None,
                });
                self.by_entry.insert((info.owner.clone(), info.id), ino);
                ino
            }
        };
        self.move_to(ino, parent, &info.name);
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.kind = info.kind;
            n.info = Some(info.clone());
            n.seen = Some(Instant::now());
            n.gone = false;
        }
        Some(ino)
    }

    /// Puts `ino` at (`parent`, `name`): whatever was there before is detached.
    pub fn move_to(&mut self, ino: u64, parent: u64, name: &str) {
        if let Some(n) = self.nodes.get(&ino) {
            let old = (n.parent, n.name.clone());
            if self.children.get(&old) == Some(&ino) {
                self.children.remove(&old);
            }
        }
        if let Some(other) = self.children.insert((parent, name.to_string()), ino) {
            if other != ino {
                if let Some(n) = self.nodes.get_mut(&other) {
                    n.gone = true;
                }
            }
        }
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.parent = parent;
            n.name = name.to_string();
        }
    }

    /// The entry is gone: its name no longer leads to it. The node stays for what is
    /// still open on it.
    pub fn detach(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.gone = true;
            let key = (n.parent, n.name.clone());
            if self.children.get(&key) == Some(&ino) {
                self.children.remove(&key);
            }
        }
    }

    /// The nodes below directory `ino`, as last seen (`ino` included).
    pub fn subtree(&self, ino: u64) -> Vec<u64> {
        let mut out = vec![ino];
        let mut i = 0;
        while let Some(dir) = out.get(i).copied() {
            out.extend(
                self.children
                    .iter()
                    .filter(|((parent, _), child)| *parent == dir && **child != dir)
                    .map(|(_, child)| *child),
            );
            i += 1;
        }
        out
    }

    /// The attributes of `ino` changed on the server (a directory whose entries this
    /// mount just changed): the next `getattr` asks.
    pub fn stale(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.seen = None;
        }
    }

    /// Every attribute may be stale (a reconnect, a resync): ask the server again.
    pub fn forget_attrs(&mut self) {
        for n in self.nodes.values_mut() {
            n.seen = None;
        }
    }

    /// A file created here and not uploaded yet: a node with no entry id (0) until its
    /// first upload names one ([`Tree::bind`]), placed at (`parent`, `name`).
    pub fn add_local(&mut self, parent: u64, info: &FileInfo) -> u64 {
        let ino = self.alloc(Node {
            owner: Some(info.owner.clone()),
            id: LOCAL_ID,
            parent,
            name: info.name.clone(),
            kind: info.kind,
            info: Some(info.clone()),
            gone: false,
            seen: None,
        });
        self.move_to(ino, parent, &info.name);
        ino
    }

    /// The server made the local node `ino` the entry `info`.
    pub fn bind(&mut self, ino: u64, info: &FileInfo) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            if n.id == LOCAL_ID {
                n.id = info.id;
                self.by_entry.insert((info.owner.clone(), info.id), ino);
            }
        }
    }

    /// Whether `ino` is a file created here and not uploaded yet.
    pub fn is_local(&self, ino: u64) -> bool {
        self.nodes
            .get(&ino)
            .is_some_and(|n| n.owner.is_some() && n.id == LOCAL_ID)
    }

    /// Forgets what was last seen at (`parent`, `name`), if it is `ino`'s place.
    pub fn unname(&mut self, parent: u64, name: &str) -> Option<u64> {
        let ino = self.child(parent, name)?;
        self.detach(ino);
        Some(ino)
    }

    fn alloc(&mut self, node: Node) -> u64 {
        self.next_ino += 1;
        self.nodes.insert(self.next_ino, node);
        self.next_ino
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(owner: &str, id: u64, parent: u64, name: &str, kind: EntryKind) -> FileInfo {
        FileInfo {
            owner: owner.into(),
            id,
            parent,
            name: name.into(),
            kind,
            mode: 0o644,
            size: 0,
            mtime_ns: 0,
            atime_ns: 0,
            ctime_ns: 0,
            version: 1,
            target: None,
        }
    }

    #[test]
    fn inodes_follow_entries_and_are_never_reused() {
        let mut t = Tree::default();
        let folder = t.user_folder("alice");
        assert_eq!(t.child(ROOT, "alice"), Some(folder));
        let dir = t
            .place(&info("alice", 5, ROOT_ID, "d", EntryKind::Dir))
            .unwrap();
        let file = t.place(&info("alice", 6, 5, "f", EntryKind::File)).unwrap();
        assert_eq!(t.child(dir, "f"), Some(file));
        assert_eq!(t.get(file).unwrap().parent, dir);
        // Moved: same inode, new place, old place empty.
        assert_eq!(
            t.place(&info("alice", 6, ROOT_ID, "g", EntryKind::File)),
            Some(file)
        );
        assert_eq!(t.child(dir, "f"), None);
        assert_eq!(t.child(folder, "g"), Some(file));
        // Another entry at the same name is another inode; the first one is detached.
        let other = t
            .place(&info("alice", 7, ROOT_ID, "g", EntryKind::File))
            .unwrap();
        assert_ne!(other, file);
        assert!(t.get(file).unwrap().gone);
        // An entry of a directory never seen is not placed.
        assert_eq!(t.place(&info("alice", 9, 8, "x", EntryKind::File)), None);
        // Same id in another user's tree: another inode.
        t.user_folder("bob");
        let bobs = t
            .place(&info("bob", 6, ROOT_ID, "f", EntryKind::File))
            .unwrap();
        assert_ne!(bobs, file);
    }
}
