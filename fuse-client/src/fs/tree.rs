//! The inode table: which inode number stands for which entry of which user's tree, and
//! where the mount last saw it.
//!
//! An inode is handed out on first sight of an (owner, entry id) and never reused for the
//! life of the mount, since the server never reuses an id within a tree: a renamed entry
//! keeps its inode, and an open file follows its entry wherever it moves. Inode 1 is the
//! mount's root, whose children are the users' folders, each the entry [`ROOT_ID`] of its
//! owner's tree. Nodes are also indexed by (parent inode, name) so that a name is found
//! without the server and `..` is the real parent.
//!
//! A listing of N entries places N nodes, so the indexes are looked up without building
//! keys: owners are numbered once, and names are found in their directory's own map.
//! Inode and entry numbers are hashed with FxHash (the mount and the server choose them);
//! names, which other users choose, keep the default keyed hasher.

use std::collections::HashMap;
use std::time::Instant;

use rustc_hash::FxHashMap;

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
    nodes: FxHashMap<u64, Node>,
    /// A number for each owner seen, for `by_entry`'s keys.
    owners: HashMap<String, u32>,
    /// (owner number, entry id) -> inode.
    by_entry: FxHashMap<(u32, u64), u64>,
    /// Directory inode -> name -> inode, as last seen.
    children: FxHashMap<u64, HashMap<String, u64>>,
    next_ino: u64,
}

impl Default for Tree {
    fn default() -> Self {
        let mut nodes = FxHashMap::default();
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
            owners: HashMap::new(),
            by_entry: FxHashMap::default(),
            children: FxHashMap::default(),
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
        let owner = *self.owners.get(owner)?;
        self.by_entry.get(&(owner, id)).copied()
    }

    /// The node named `name` in directory `parent`, as last seen.
    pub fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.children.get(&parent)?.get(name).copied()
    }

    /// Makes room for the entries of a listing of `count` entries of directory `dir`
    /// about to be placed: a listing of a directory never seen grows every index at
    /// once instead of by doubling.
    pub fn reserve_listing(&mut self, dir: u64, count: usize) {
        let known = self.children.get(&dir).map_or(0, |names| names.len());
        let new = count.saturating_sub(known);
        if new > 0 {
            self.nodes.reserve(new);
            self.by_entry.reserve(new);
            self.children.entry(dir).or_default().reserve(new);
        }
    }

    /// Indexes inode `ino` as (owner, id).
    fn index_entry(&mut self, owner: &str, id: u64, ino: u64) {
        let next = u32::try_from(self.owners.len()).unwrap_or(u32::MAX);
        let n = match self.owners.get(owner) {
            Some(n) => *n,
            None => *self.owners.entry(owner.to_string()).or_insert(next),
        };
        self.by_entry.insert((n, id), ino);
    }

    /// Puts `ino` at (`parent`, `name`) in the name index; returns what was there.
    fn name_child(&mut self, parent: u64, name: &str, ino: u64) -> Option<u64> {
        let names = self.children.entry(parent).or_default();
        match names.get_mut(name) {
            Some(at) => Some(std::mem::replace(at, ino)),
            None => names.insert(name.to_string(), ino),
        }
    }

    /// Takes (`parent`, `name`) out of the name index if it leads to `ino`.
    fn unname_child(&mut self, parent: u64, name: &str, ino: u64) {
        if let Some(names) = self.children.get_mut(&parent) {
            if names.get(name) == Some(&ino) {
                names.remove(name);
                if names.is_empty() {
                    self.children.remove(&parent);
                }
            }
        }
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
        self.index_entry(user, ROOT_ID, ino);
        self.name_child(ROOT, user, ino);
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
        let local = self.child(parent, &info.name).filter(|i| {
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
                self.index_entry(&info.owner, info.id, ino);
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
        let Some(n) = self.nodes.get(&ino) else {
            return;
        };
        if n.parent == parent && n.name == name && self.child(parent, name) == Some(ino) {
            // Where it was last seen: the common case of a listing seen again.
            return;
        }
        let (old_parent, old_name) = (n.parent, n.name.clone());
        self.unname_child(old_parent, &old_name, ino);
        if let Some(other) = self.name_child(parent, name, ino) {
            if other != ino {
                if let Some(n) = self.nodes.get_mut(&other) {
                    n.gone = true;
                }
            }
        }
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.parent = parent;
            if n.name != name {
                n.name = name.to_string();
            }
        }
    }

    /// The entry is gone: its name no longer leads to it. The node stays for what is
    /// still open on it.
    pub fn detach(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.gone = true;
            let (parent, name) = (n.parent, n.name.clone());
            self.unname_child(parent, &name, ino);
        }
    }

    /// The nodes below directory `ino`, as last seen (`ino` included).
    pub fn subtree(&self, ino: u64) -> Vec<u64> {
        let mut out = vec![ino];
        let mut i = 0;
        while let Some(dir) = out.get(i).copied() {
            if let Some(names) = self.children.get(&dir) {
                out.extend(names.values().copied().filter(|child| *child != dir));
            }
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
                self.index_entry(&info.owner, info.id, ino);
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

    #[test]
    fn names_and_subtrees_follow_moves_and_removals() {
        let mut t = Tree::default();
        let folder = t.user_folder("alice");
        t.reserve_listing(folder, 3);
        let d = t
            .place(&info("alice", 2, ROOT_ID, "d", EntryKind::Dir))
            .unwrap();
        let e = t.place(&info("alice", 3, 2, "e", EntryKind::Dir)).unwrap();
        let f = t.place(&info("alice", 4, 3, "f", EntryKind::File)).unwrap();
        let g = t
            .place(&info("alice", 5, ROOT_ID, "g", EntryKind::File))
            .unwrap();
        let mut below = t.subtree(d);
        below.sort_unstable();
        assert_eq!(below, vec![d, e, f]);
        // Placed again where it is: nothing moves.
        assert_eq!(t.place(&info("alice", 4, 3, "f", EntryKind::File)), Some(f));
        assert_eq!(t.child(e, "f"), Some(f));
        // Renamed within its directory, then detached.
        t.move_to(f, e, "f2");
        assert_eq!((t.child(e, "f"), t.child(e, "f2")), (None, Some(f)));
        assert_eq!(t.get(f).unwrap().name, "f2");
        assert_eq!(t.unname(e, "f2"), Some(f));
        assert!(t.get(f).unwrap().gone);
        assert_eq!(t.subtree(e), vec![e]);
        // A detach of a name now held by another node leaves that one.
        t.move_to(g, e, "x");
        t.detach(f);
        assert_eq!(t.child(e, "x"), Some(g));
        assert_eq!(t.ino_of("alice", 5), Some(g));
        assert_eq!(t.ino_of("bob", 5), None);
    }
}
