//! One user's tree in memory, inode style: entries by id, and per directory its names
//! sorted in a `BTreeMap`, so a lookup, a stat and a listing page cost O(log n) and a walk
//! up the ancestors (permissions, paths, "is this inside that") costs O(depth), whatever
//! the size of the tree. Every change is a list of [`Op`]s, the same list a journal record
//! holds: the tree is the fold of its snapshot and its journal.
//!
//! The checks of a change (names taken, kinds, a directory moved into itself) are made
//! here, before anything is written, and produce the ops; applying them cannot fail.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use sharefs_protocol::name::MAX_PATH;
use sharefs_protocol::{EntryKind, FileInfo, Place, ROOT_ID};

use super::digest::Digest;
use crate::error::{Result, ServerError};

/// Where a file's bytes are: its own blob, or a range of one of the folder's packs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// `<id:016x>.blob`, named by the version it was written for.
    Blob(u64),
    Pack(PackRef),
}

/// A content's place in a pack (its length is the entry's size). Written as
/// `[pack, offset]`; read from that or from `{"pack": .., "offset": ..}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct PackRef {
    pub pack: u64,
    pub offset: u64,
}

/// One entry: what a row of an entries table holds.
///
/// Snapshots and journal records write it as an array of its fields in this order,
/// without the trailing ones left at their defaults (no field names: a snapshot of many
/// entries parses several times faster); it is read from that or from an object with
/// the field names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Node {
    pub id: u64,
    /// 0 for the root.
    pub parent: u64,
    /// Empty for the root.
    pub name: String,
    pub kind: EntryKind,
    pub mode: u32,
    #[serde(default)]
    pub size: u64,
    pub mtime_ns: i64,
    pub atime_ns: i64,
    pub ctime_ns: i64,
    #[serde(default)]
    pub version: u64,
    /// BLAKE3 of a file's content.
    #[serde(default, skip_serializing_if = "Digest::is_none")]
    pub blake3: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    /// A symbolic link's target, as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Serialize for PackRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        (self.pack, self.offset).serialize(s)
    }
}

impl Serialize for Node {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        // Fields after the last one that differs from its default are left out.
        let len = if self.target.is_some() {
            13
        } else if self.content.is_some() {
            12
        } else if !self.blake3.is_none() {
            11
        } else if self.version != 0 {
            10
        } else {
            9
        };
        let mut seq = s.serialize_seq(Some(len))?;
        seq.serialize_element(&self.id)?;
        seq.serialize_element(&self.parent)?;
        seq.serialize_element(&self.name)?;
        seq.serialize_element(&self.kind)?;
        seq.serialize_element(&self.mode)?;
        seq.serialize_element(&self.size)?;
        seq.serialize_element(&self.mtime_ns)?;
        seq.serialize_element(&self.atime_ns)?;
        seq.serialize_element(&self.ctime_ns)?;
        if len > 9 {
            seq.serialize_element(&self.version)?;
        }
        if len > 10 {
            seq.serialize_element(&self.blake3)?;
        }
        if len > 11 {
            seq.serialize_element(&self.content)?;
        }
        if len > 12 {
            seq.serialize_element(&self.target)?;
        }
        seq.end()
    }
}

impl Node {
    /// A new directory, file or link with every time `now`.
    pub fn new(id: u64, parent: u64, name: &str, kind: EntryKind, mode: u32, now: i64) -> Node {
        Node {
            id,
            parent,
            name: name.to_string(),
            kind,
            mode,
            size: 0,
            mtime_ns: now,
            atime_ns: now,
            ctime_ns: now,
            version: 0,
            blake3: Digest::default(),
            content: None,
            target: None,
        }
    }

    pub fn info(&self, owner: &str) -> FileInfo {
        FileInfo {
            owner: owner.to_string(),
            id: self.id,
            parent: self.parent,
            name: self.name.clone(),
            kind: self.kind,
            mode: self.mode,
            size: self.size,
            mtime_ns: self.mtime_ns,
            atime_ns: self.atime_ns,
            ctime_ns: self.ctime_ns,
            version: self.version,
            target: self.target.clone(),
        }
    }

    pub fn place(&self) -> Place {
        Place {
            parent: self.parent,
            name: self.name.clone(),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == EntryKind::Dir
    }

    /// Bytes this entry counts against its owner's quota.
    pub fn used(&self) -> u64 {
        match self.kind {
            EntryKind::File => self.size,
            _ => 0,
        }
    }
}

/// One step of a change, as a journal record lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The entry as it now is (created, changed or moved).
    Put(Node),
    /// The entry is gone.
    Remove { id: u64 },
}

/// The most directories above an entry that others' permission checks walk: a path of
/// [`MAX_PATH`] bytes has at most this many. Entries created or moved into place have
/// paths within [`MAX_PATH`], but a directory moved under a deep one takes a subtree that
/// may be deeper; what lies below this depth is the owner's alone.
pub const MAX_DEPTH: usize = MAX_PATH / 2 + 1;

/// The "other" read bit.
pub const OTHER_READ: u32 = 0o004;
/// The "other" execute (search) bit.
pub const OTHER_EXEC: u32 = 0o001;

/// Hashes entry ids with one multiplication (Fibonacci hashing): ids are small
/// sequential numbers chosen by the server, not by clients, so they need no protection
/// against collisions crafted to slow the table down, and loading a large tree spends
/// much of its time hashing them.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHash(u64);

impl std::hash::Hasher for IdHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHash>>;

/// One user's tree.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: IdMap<Node>,
    /// Per directory, its entries by name.
    children: IdMap<BTreeMap<String, u64>>,
    /// The next id to hand out: above every id ever used.
    next_id: u64,
    /// Bytes of file content.
    used: u64,
}

impl Tree {
    /// A tree of `nodes` (a snapshot), ids handed out from `next_id` on. Call
    /// [`Tree::finish_load`] once the journal is replayed over it.
    pub fn from_nodes(nodes: Vec<Node>, next_id: u64) -> Tree {
        let mut tree = Tree {
            next_id: next_id.max(ROOT_ID + 1),
            ..Tree::default()
        };
        tree.nodes.reserve(nodes.len());
        for node in nodes {
            tree.apply(Op::Put(node));
        }
        tree
    }

    /// Raises the next id to hand out to at least `next_id` (a snapshot's).
    pub fn raise_next_id(&mut self, next_id: u64) {
        self.next_id = self.next_id.max(next_id).max(ROOT_ID + 1);
    }

    /// Makes a missing root, and drops (and returns) the entries that do not hang below
    /// the root (their parent missing: metadata damaged by hand).
    pub fn finish_load(&mut self, now: i64) -> Vec<Node> {
        if !self.nodes.get(&ROOT_ID).is_some_and(Node::is_dir) {
            let root = Node::new(ROOT_ID, 0, "", EntryKind::Dir, 0o755, now);
            self.apply(Op::Put(root));
        }
        self.drop_unreachable()
    }

    /// An empty tree: the root alone.
    pub fn empty(now: i64) -> Tree {
        let mut tree = Tree::from_nodes(Vec::new(), ROOT_ID + 1);
        tree.finish_load(now);
        tree
    }

    /// Removes the entries not reachable from the root; O(n), at load only.
    pub fn drop_unreachable(&mut self) -> Vec<Node> {
        let mut reached: std::collections::HashSet<u64, std::hash::BuildHasherDefault<IdHash>> =
            std::collections::HashSet::with_capacity_and_hasher(
                self.nodes.len(),
                Default::default(),
            );
        let mut stack = vec![ROOT_ID];
        while let Some(id) = stack.pop() {
            if !reached.insert(id) {
                continue;
            }
            if let Some(kids) = self.children.get(&id) {
                stack.extend(kids.values().copied());
            }
        }
        let lost: Vec<u64> = self
            .nodes
            .keys()
            .filter(|id| !reached.contains(id))
            .copied()
            .collect();
        let mut dropped = Vec::new();
        for id in lost {
            if let Some(node) = self.apply(Op::Remove { id }) {
                dropped.push(node);
            }
        }
        // Directory maps of entries that are gone (or never were directories).
        let nodes = &self.nodes;
        self.children
            .retain(|id, _| nodes.get(id).is_some_and(Node::is_dir));
        dropped
    }

    /// Applies one op, returning the entry it replaced or removed.
    pub fn apply(&mut self, op: Op) -> Option<Node> {
        match op {
            Op::Put(node) => {
                let id = node.id;
                let old = self.nodes.remove(&id);
                if let Some(old) = &old {
                    self.used = self.used.saturating_sub(old.used());
                    if old.parent != node.parent || old.name != node.name {
                        self.unlink(old);
                    }
                }
                if node.parent != 0 {
                    self.children
                        .entry(node.parent)
                        .or_default()
                        .insert(node.name.clone(), id);
                }
                self.used += node.used();
                self.next_id = self.next_id.max(id.saturating_add(1));
                self.nodes.insert(id, node);
                old
            }
            Op::Remove { id } => {
                let old = self.nodes.remove(&id)?;
                self.used = self.used.saturating_sub(old.used());
                self.unlink(&old);
                if self.children.get(&id).is_some_and(BTreeMap::is_empty) {
                    self.children.remove(&id);
                }
                Some(old)
            }
        }
    }

    /// Takes `node` out of its parent's names (if the name still points at it).
    fn unlink(&mut self, node: &Node) {
        if let Some(kids) = self.children.get_mut(&node.parent) {
            if kids.get(&node.name) == Some(&node.id) {
                kids.remove(&node.name);
            }
        }
    }

    pub fn get(&self, id: u64) -> Option<&Node> {
        self.nodes.get(&id)
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<&Node> {
        let id = self.children.get(&parent)?.get(name)?;
        self.nodes.get(id)
    }

    /// Entries of `dir` after `after`, by name.
    pub fn children_after<'a>(
        &'a self,
        dir: u64,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Node> + 'a {
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        self.children
            .get(&dir)
            .into_iter()
            .flat_map(move |kids| kids.range::<str, _>((start, Bound::Unbounded)))
            .filter_map(|(_, id)| self.nodes.get(id))
    }

    pub fn is_empty_dir(&self, id: u64) -> bool {
        self.children.get(&id).is_none_or(BTreeMap::is_empty)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Hands out a fresh id.
    pub fn allocate_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The directories holding `id`, from its parent up to the root. O(depth).
    pub fn ancestors(&self, id: u64) -> impl Iterator<Item = &Node> + '_ {
        let first = self.nodes.get(&id).map(|n| n.parent).unwrap_or(0);
        std::iter::successors(self.nodes.get(&first), move |n| self.nodes.get(&n.parent))
    }

    /// Whether `id` is `dir` or lies below it.
    pub fn is_within(&self, id: u64, dir: u64) -> bool {
        id == dir || self.ancestors(id).any(|n| n.id == dir)
    }

    /// The path of `id` from the root ("a/b/c.pdf"; "" for the root). One longer than
    /// [`MAX_PATH`] (possible below a moved directory) keeps its last names after "…/".
    pub fn path_of(&self, id: u64) -> String {
        let Some(node) = self.nodes.get(&id) else {
            return String::new();
        };
        if id == ROOT_ID {
            return String::new();
        }
        // Leaf first; the walk stops once past the limit.
        let mut names = vec![node.name.as_str()];
        let mut len = node.name.len();
        for a in self.ancestors(id).filter(|n| n.id != ROOT_ID) {
            if len > MAX_PATH {
                break;
            }
            len += 1 + a.name.len();
            names.push(&a.name);
        }
        if len > MAX_PATH {
            const MORE: &str = "…";
            while names.len() > 1 && len + MORE.len() + 1 > MAX_PATH {
                if let Some(n) = names.pop() {
                    len -= n.len() + 1;
                }
            }
            names.push(MORE);
        }
        names.reverse();
        names.join("/")
    }

    /// Bytes of the path a new entry `name` in `parent` would have; O(depth).
    fn path_len_in(&self, parent: u64, name: &str) -> usize {
        let mut len = name.len();
        if parent != ROOT_ID {
            if let Some(p) = self.nodes.get(&parent) {
                len += 1 + p.name.len();
            }
            for a in self.ancestors(parent).filter(|n| n.id != ROOT_ID) {
                len += 1 + a.name.len();
                if len > MAX_PATH {
                    break;
                }
            }
        }
        len
    }

    /// Refuses a new place whose path would be longer than [`MAX_PATH`].
    pub fn check_path_room(&self, parent: u64, name: &str) -> Result<()> {
        if self.path_len_in(parent, name) > MAX_PATH {
            return Err(ServerError::NameTooLong(format!(
                "{name}: its path would be longer than {MAX_PATH} bytes"
            )));
        }
        Ok(())
    }

    /// Whether others (not the owner) may pass through `dir` and every directory above it.
    pub fn others_may_search(&self, dir: u64) -> bool {
        match self.nodes.get(&dir) {
            Some(d) => {
                let mut depth = 0;
                d.mode & OTHER_EXEC != 0
                    && self.ancestors(dir).all(|a| {
                        depth += 1;
                        depth <= MAX_DEPTH && a.mode & OTHER_EXEC != 0
                    })
            }
            None => false,
        }
    }

    /// Whether others may see the entry `id` where it is: search its every ancestor.
    pub fn others_may_see(&self, id: u64) -> bool {
        match self.nodes.get(&id) {
            Some(n) if n.id == ROOT_ID => true,
            Some(n) => self.others_may_search(n.parent),
            None => false,
        }
    }

    /// The directory `id`, for an operation on its entries.
    pub fn dir(&self, id: u64, what: &str) -> Result<&Node> {
        match self.nodes.get(&id) {
            Some(n) if n.is_dir() => Ok(n),
            Some(_) => Err(ServerError::NotADirectory(what.to_string())),
            None => Err(ServerError::NotFound(what.to_string())),
        }
    }

    /// `dir` with its mtime and ctime set to `now` (its entries changed).
    pub fn touched_dir(&self, dir: u64, now: i64) -> Option<Node> {
        let mut d = self.nodes.get(&dir)?.clone();
        d.mtime_ns = now;
        d.ctime_ns = now;
        Some(d)
    }

    /// The ops of a rename, checked as rename(2) checks them. `None`: nothing to do (the
    /// entry is renamed onto itself).
    pub fn plan_rename(
        &self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        noreplace: bool,
        now: i64,
    ) -> Result<Option<Vec<Op>>> {
        self.dir(parent, name)?;
        let src = self
            .lookup(parent, name)
            .ok_or_else(|| ServerError::NotFound(name.to_string()))?;
        self.dir(new_parent, new_name)?;
        if parent == new_parent && name == new_name {
            return Ok(None);
        }
        if src.is_dir() && self.is_within(new_parent, src.id) {
            return Err(ServerError::InvalidArgument(format!(
                "cannot move directory {name} into itself"
            )));
        }
        self.check_path_room(new_parent, new_name)?;
        let mut ops = Vec::new();
        if let Some(dst) = self.lookup(new_parent, new_name) {
            if noreplace {
                return Err(ServerError::Exists(new_name.to_string()));
            }
            match (src.is_dir(), dst.is_dir()) {
                (true, false) => return Err(ServerError::NotADirectory(new_name.to_string())),
                (false, true) => return Err(ServerError::IsADirectory(new_name.to_string())),
                (true, true) if !self.is_empty_dir(dst.id) => {
                    return Err(ServerError::NotEmpty(new_name.to_string()))
                }
                _ => {}
            }
            ops.push(Op::Remove { id: dst.id });
        }
        let mut moved = src.clone();
        moved.parent = new_parent;
        moved.name = new_name.to_string();
        moved.ctime_ns = now;
        ops.push(Op::Put(moved));
        ops.extend(self.touched_dir(parent, now).map(Op::Put));
        if new_parent != parent {
            ops.extend(self.touched_dir(new_parent, now).map(Op::Put));
        }
        Ok(Some(ops))
    }

    /// The ops of removing `name` from `parent`: a non-directory, or with `dir` an empty
    /// directory.
    pub fn plan_remove(&self, parent: u64, name: &str, dir: bool, now: i64) -> Result<Vec<Op>> {
        self.dir(parent, name)?;
        let node = self
            .lookup(parent, name)
            .ok_or_else(|| ServerError::NotFound(name.to_string()))?;
        match (dir, node.is_dir()) {
            (false, true) => return Err(ServerError::IsADirectory(name.to_string())),
            (true, false) => return Err(ServerError::NotADirectory(name.to_string())),
            (true, true) if !self.is_empty_dir(node.id) => {
                return Err(ServerError::NotEmpty(name.to_string()))
            }
            _ => {}
        }
        let mut ops = vec![Op::Remove { id: node.id }];
        ops.extend(self.touched_dir(parent, now).map(Op::Put));
        Ok(ops)
    }

    /// The ops of creating `node` (a directory or link with a fresh id) in its parent.
    pub fn plan_create(&self, node: Node, now: i64) -> Result<Vec<Op>> {
        self.dir(node.parent, &node.name)?;
        if self.lookup(node.parent, &node.name).is_some() {
            return Err(ServerError::Exists(node.name));
        }
        self.check_path_room(node.parent, &node.name)?;
        let parent = node.parent;
        let mut ops = vec![Op::Put(node)];
        ops.extend(self.touched_dir(parent, now).map(Op::Put));
        Ok(ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tree: &mut Tree, parent: u64, name: &str) -> u64 {
        let id = tree.allocate_id();
        let ops = tree
            .plan_create(Node::new(id, parent, name, EntryKind::Dir, 0o755, 1), 1)
            .unwrap();
        for op in ops {
            tree.apply(op);
        }
        id
    }

    fn file(tree: &mut Tree, parent: u64, name: &str, size: u64) -> u64 {
        let id = tree.allocate_id();
        let mut n = Node::new(id, parent, name, EntryKind::File, 0o644, 1);
        n.size = size;
        for op in tree.plan_create(n, 1).unwrap() {
            tree.apply(op);
        }
        id
    }

    fn run(tree: &mut Tree, ops: Vec<Op>) {
        for op in ops {
            tree.apply(op);
        }
    }

    #[test]
    fn rename_moves_a_subtree_with_one_op_per_place() {
        let mut tree = Tree::empty(0);
        let a = dir(&mut tree, ROOT_ID, "a");
        let b = dir(&mut tree, a, "b");
        let c = file(&mut tree, b, "c.pdf", 10);
        let x = dir(&mut tree, ROOT_ID, "x");
        assert_eq!(tree.path_of(c), "a/b/c.pdf");
        let ops = tree
            .plan_rename(ROOT_ID, "a", x, "moved", false, 5)
            .unwrap();
        let ops = ops.unwrap();
        // The moved directory and the two parents; nothing of the subtree.
        assert_eq!(ops.len(), 3);
        run(&mut tree, ops);
        assert_eq!(tree.path_of(c), "x/moved/b/c.pdf");
        assert_eq!(tree.get(ROOT_ID).unwrap().mtime_ns, 5);
        assert_eq!(tree.get(x).unwrap().mtime_ns, 5);
        assert!(tree.lookup(ROOT_ID, "a").is_none());
        assert_eq!(tree.used(), 10);
        // Into itself.
        let moved = tree.lookup(x, "moved").unwrap().id;
        assert!(matches!(
            tree.plan_rename(x, "moved", b, "loop", false, 6),
            Err(ServerError::InvalidArgument(_))
        ));
        assert!(matches!(
            tree.plan_rename(x, "moved", moved, "loop", false, 6),
            Err(ServerError::InvalidArgument(_))
        ));
        // Onto itself: nothing.
        assert!(tree
            .plan_rename(x, "moved", x, "moved", false, 6)
            .unwrap()
            .is_none());
    }

    #[test]
    fn rename_and_remove_errors() {
        let mut tree = Tree::empty(0);
        let d = dir(&mut tree, ROOT_ID, "d");
        file(&mut tree, d, "inside", 1);
        dir(&mut tree, ROOT_ID, "empty");
        file(&mut tree, ROOT_ID, "f", 1);
        file(&mut tree, ROOT_ID, "g", 2);
        let err = |r: Result<Option<Vec<Op>>>| r.unwrap_err().code();
        use sharefs_protocol::ErrorCode as E;
        assert_eq!(
            err(tree.plan_rename(ROOT_ID, "empty", ROOT_ID, "d", false, 1)),
            E::NotEmpty
        );
        assert_eq!(
            err(tree.plan_rename(ROOT_ID, "f", ROOT_ID, "d", false, 1)),
            E::IsADirectory
        );
        assert_eq!(
            err(tree.plan_rename(ROOT_ID, "d", ROOT_ID, "f", false, 1)),
            E::NotADirectory
        );
        assert_eq!(
            err(tree.plan_rename(ROOT_ID, "f", ROOT_ID, "g", true, 1)),
            E::Exists
        );
        assert_eq!(
            err(tree.plan_rename(ROOT_ID, "nope", ROOT_ID, "g", false, 1)),
            E::NotFound
        );
        // A file replaces a file: the target goes in the same ops.
        let ops = tree
            .plan_rename(ROOT_ID, "f", ROOT_ID, "g", false, 1)
            .unwrap()
            .unwrap();
        assert!(matches!(ops[0], Op::Remove { .. }));
        run(&mut tree, ops);
        assert_eq!(tree.used(), 2);
        let code = |r: Result<Vec<Op>>| r.unwrap_err().code();
        assert_eq!(
            code(tree.plan_remove(ROOT_ID, "d", false, 1)),
            E::IsADirectory
        );
        assert_eq!(
            code(tree.plan_remove(ROOT_ID, "g", true, 1)),
            E::NotADirectory
        );
        assert_eq!(code(tree.plan_remove(ROOT_ID, "d", true, 1)), E::NotEmpty);
        let ops = tree.plan_remove(d, "inside", false, 1).unwrap();
        run(&mut tree, ops);
        let ops = tree.plan_remove(ROOT_ID, "d", true, 1).unwrap();
        run(&mut tree, ops);
        assert!(tree.lookup(ROOT_ID, "d").is_none());
        assert_eq!(tree.used(), 1);
    }

    #[test]
    fn others_need_search_on_every_ancestor() {
        let mut tree = Tree::empty(0);
        let a = dir(&mut tree, ROOT_ID, "a");
        let b = dir(&mut tree, a, "b");
        let f = file(&mut tree, b, "f", 1);
        assert!(tree.others_may_see(f));
        let mut private = tree.get(a).unwrap().clone();
        private.mode = 0o700;
        tree.apply(Op::Put(private));
        assert!(!tree.others_may_see(f));
        assert!(!tree.others_may_see(b));
        assert!(tree.others_may_see(a));
    }

    #[test]
    fn unreachable_entries_are_dropped_at_load() {
        let orphan = Node::new(9, 42, "lost", EntryKind::File, 0o644, 0);
        let kept = Node::new(3, ROOT_ID, "kept", EntryKind::File, 0o644, 0);
        let mut tree = Tree::from_nodes(vec![orphan, kept], 2);
        let dropped = tree.finish_load(0);
        assert_eq!(dropped.len(), 1);
        assert!(tree.lookup(ROOT_ID, "kept").is_some());
        assert_eq!(tree.next_id(), 10, "ids are never reused");
    }

    #[test]
    fn paths_stay_within_the_limit() {
        let mut tree = Tree::empty(0);
        let long = "x".repeat(255);
        let mut parent = ROOT_ID;
        for _ in 0..15 {
            parent = dir(&mut tree, parent, &long);
        }
        // 15 names of 255 bytes and their slashes: one more makes exactly 4095 bytes...
        let full = dir(&mut tree, parent, &long);
        assert_eq!(tree.path_of(full).len(), MAX_PATH);
        // ...and nothing fits below it.
        let id = tree.allocate_id();
        let node = Node::new(id, full, "f", EntryKind::File, 0o644, 1);
        assert!(matches!(
            tree.plan_create(node, 1),
            Err(ServerError::NameTooLong(_))
        ));
        let f = file(&mut tree, parent, "f", 1);
        assert_eq!(tree.path_of(f).len(), 15 * 256 + 1);
        // Moved under another deep chain, the subtree's paths are shortened in display.
        let mut other = ROOT_ID;
        for i in 0..15 {
            other = dir(&mut tree, other, &format!("{i}{}", "y".repeat(250)));
        }
        let first = tree.lookup(ROOT_ID, &long).unwrap().id;
        let ops = tree
            .plan_rename(ROOT_ID, &long, other, "z", false, 1)
            .unwrap()
            .unwrap();
        run(&mut tree, ops);
        let shown = tree.path_of(f);
        assert!(shown.starts_with("…/") && shown.ends_with("/f"), "{shown}");
        assert!(shown.len() <= MAX_PATH);
        assert!(tree.is_within(f, first));
    }
}

/// A snapshot's entries, read straight into a tree as they are parsed: no list of them in
/// between, which halves what loading a large tree moves through memory.
#[derive(Debug, Default)]
pub struct Entries(pub Tree);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Entries, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entries;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of entries")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut tree = Tree::default();
                if let Some(n) = seq.size_hint() {
                    tree.nodes.reserve(n);
                }
                while let Some(node) = seq.next_element::<Node>()? {
                    tree.apply(Op::Put(node));
                }
                Ok(Entries(tree))
            }
        }
        d.deserialize_seq(Visitor)
    }
}
