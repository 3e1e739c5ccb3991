//! What the server's pushed events change: the listings, the inode table, and what the
//! kernel must forget so that changes made elsewhere show within the TTL-free window the
//! events give (entries by (parent inode, name), attributes, pages).
//!
//! Pages are dropped only when a file's content version changed: a `chmod` or a move
//! leaves them cached. A file open for reading through the kernel's cache keeps its
//! version's pages and size until its last descriptor closes (`State::pinned`); a file
//! being written here keeps what this mount wrote.

use sharefs_protocol::{EntryKind, Event, FileInfo, Place};

use super::remote::Remote;
use super::{FsCore, Invalidation, State, ROOT};

impl<R: Remote> FsCore<R> {
    /// Applies a server event to the caches; returns what the kernel must forget.
    pub fn handle_event(&self, event: &Event) -> Vec<Invalidation> {
        tracing::trace!(?event, "event");
        match event {
            Event::Changed { owner, file, from } => self.entry_changed(owner, file, from.as_ref()),
            Event::Removed {
                owner,
                id,
                parent,
                name,
            } => self.entry_removed(owner, *id, *parent, name),
            Event::UsersChanged => {
                self.listings().users = None;
                vec![Invalidation::Inode { ino: ROOT }]
            }
            Event::Resync => self.forget_all(),
            Event::Notification { .. } => Vec::new(),
        }
    }

    fn entry_changed(
        &self,
        owner: &str,
        file: &FileInfo,
        from: Option<&Place>,
    ) -> Vec<Invalidation> {
        if file.owner != owner {
            tracing::warn!(%owner, file = %file.owner, "event about an entry of another tree; ignored");
            return Vec::new();
        }
        {
            let mut l = self.listings();
            if let Some(from) = from {
                l.changed(&(owner.to_string(), from.parent), &from.name, None);
            }
            if file.id != sharefs_protocol::ROOT_ID {
                l.changed(&(owner.to_string(), file.parent), &file.name, Some(file));
            }
        }
        let mut out = Vec::new();
        let mut st = self.state();
        if let Some(from) = from {
            if let Some(p) = st.tree.ino_of(owner, from.parent) {
                out.push(Invalidation::Entry {
                    parent: p,
                    name: from.name.clone(),
                });
                if st.tree.child(p, &from.name) == st.tree.ino_of(owner, file.id) {
                    st.tree.unname(p, &from.name);
                }
            }
        }
        let parent = st.tree.ino_of(owner, file.parent);
        let before = parent.and_then(|p| st.tree.child(p, &file.name));
        let known = st.tree.ino_of(owner, file.id);
        let seen = known
            .and_then(|k| st.tree.get(k))
            .and_then(|n| n.info.as_ref());
        let before_version = seen.map(|i| i.version);
        let before_mode = seen.map(|i| i.mode);
        let ino = st.tree.place(file);
        if let Some(p) = parent.filter(|_| file.id != sharefs_protocol::ROOT_ID) {
            // The name now leads elsewhere (a new entry, one moved or replaced here):
            // the kernel's dentry, negative or not, is to go.
            if before != ino {
                out.push(Invalidation::Entry {
                    parent: p,
                    name: file.name.clone(),
                });
            }
        }
        if ino.is_none() {
            // Moved where the mount has not been: its old name leads nowhere now.
            if let Some(k) = known {
                st.tree.detach(k);
            }
        }
        if let Some(ino) = ino.or(known) {
            match file.kind {
                EntryKind::File => {
                    Self::file_changed(&mut st, ino, before_version, Some(file), &mut out)
                }
                EntryKind::Dir if owner != self.user && before_mode != Some(file.mode) => {
                    // What another user may see below a directory depends on its mode:
                    // what was listed below it is to be asked for again.
                    let below = st.tree.subtree(ino);
                    let dirs: Vec<(String, u64)> = below
                        .iter()
                        .filter_map(|i| st.tree.get(*i))
                        .filter(|n| n.kind == EntryKind::Dir)
                        .filter_map(|n| n.entry().map(|(o, id)| (o.to_string(), id)))
                        .collect();
                    for i in below {
                        st.tree.stale(i);
                        // Names below may no longer be reachable: the kernel is to look
                        // them up again rather than walk its cached path.
                        if let Some(n) = st.tree.get(i).filter(|_| i != ino) {
                            out.push(Invalidation::Entry {
                                parent: n.parent,
                                name: n.name.clone(),
                            });
                        }
                    }
                    drop(st);
                    let mut l = self.listings();
                    for dir in dirs {
                        l.forget(&dir);
                    }
                    out.push(Invalidation::Inode { ino });
                    return out;
                }
                EntryKind::Dir | EntryKind::Symlink => out.push(Invalidation::Attr { ino }),
            }
        }
        out
    }

    /// The file `ino`, last seen as version `before`, is now `file` (`None`: gone): unless
    /// the kernel's pages are that version's or this mount's own writes, they go with its
    /// attributes. A version open for reading through the kernel's cache keeps its pages
    /// and attributes until its last close (`unpin`), and the kernel is told nothing
    /// meanwhile, not even of new attributes of that same version (a mode, times): its
    /// size may still be an earlier version's, which only a short read of this one
    /// corrects, and the kernel skips that correction when the inode's attributes changed
    /// while the read was under way, keeping the earlier size with zeros past this
    /// version's end.
    fn file_changed(
        st: &mut State,
        ino: u64,
        before: Option<u64>,
        file: Option<&FileInfo>,
        out: &mut Vec<Invalidation>,
    ) {
        if st.staged.contains_key(&ino) {
            return;
        }
        let version = file.map(|f| f.version);
        if let Some(p) = st.pinned.get_mut(&ino) {
            // Same content: its new attributes are reported from now on (the kernel asks
            // when its own expire) and dropped from the kernel at the last close.
            if !file.is_some_and(|f| p.same_version_changed(f)) {
                p.stale = true;
            }
            return;
        }
        let cached = st.cached_version.get(&ino).copied().or(before);
        if version.is_some() && cached == version {
            out.push(Invalidation::Attr { ino });
            return;
        }
        st.cached_version.remove(&ino);
        out.push(Invalidation::Inode { ino });
    }

    fn entry_removed(&self, owner: &str, id: u64, parent: u64, name: &str) -> Vec<Invalidation> {
        {
            let mut l = self.listings();
            l.changed(&(owner.to_string(), parent), name, None);
            l.forget(&(owner.to_string(), id));
        }
        let mut out = Vec::new();
        let mut st = self.state();
        let ino = st.tree.ino_of(owner, id);
        if let Some(p) = st.tree.ino_of(owner, parent) {
            out.push(Invalidation::Entry {
                parent: p,
                name: name.to_string(),
            });
        }
        if let Some(ino) = ino {
            st.tree.detach(ino);
            Self::file_changed(&mut st, ino, None, None, &mut out);
        }
        out
    }

    /// After a reconnect: every listing and every attribute may be stale.
    pub fn reconnected(&self) -> Vec<Invalidation> {
        self.forget_all()
    }

    fn forget_all(&self) -> Vec<Invalidation> {
        self.listings().clear();
        let mut st = self.state();
        st.tree.forget_attrs();
        st.tree
            .inos()
            .map(|ino| Invalidation::Attr { ino })
            .collect()
    }
}
