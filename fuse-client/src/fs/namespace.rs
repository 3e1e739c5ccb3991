//! Names and attributes in one's own tree: mkdir, symlink, unlink, rmdir, rename and
//! setattr. Each is one request to the server; its answer updates the inode table and
//! the listings at once, so the mount sees its own change before any event about it.

use sharefs_protocol::name::check_symlink_target;
use sharefs_protocol::{EntryKind, FileInfo, ROOT_ID};

use super::error::{FsError, FsResult};
use super::remote::{AttrChange, Move, Remote};
use super::tree::LOCAL_ID;
use super::{ns_of, Attr, FsCore, SetAttr};

impl<R: Remote> FsCore<R> {
    /// chmod, utimes and truncate. Writes only in one's own tree. A file whose staged
    /// content is not uploaded yet keeps mode and times with it, for its upload to set.
    pub async fn setattr(&self, ino: u64, set: SetAttr, fh: Option<u64>) -> FsResult<Attr> {
        let change = AttrChange {
            mode: set.mode.map(|m| m & 0o7777),
            atime_ns: set.atime.map(ns_of),
            mtime_ns: set.mtime.map(ns_of),
        };
        if set.size.is_none() && change.is_empty() {
            return self.getattr(ino).await;
        }
        let node = self.node(ino)?;
        let Some((owner, _)) = node.entry() else {
            return Err(FsError::PermissionDenied);
        };
        if owner != self.user {
            return Err(FsError::PermissionDenied);
        }
        if let Some(size) = set.size {
            match node.kind {
                EntryKind::File => {}
                EntryKind::Dir => return Err(FsError::IsDir),
                EntryKind::Symlink => {
                    return Err(FsError::InvalidArgument("truncate of a link".into()))
                }
            }
            self.truncate(ino, size, fh).await?;
        }
        if !change.is_empty() {
            // Under the file's upload lock: an upload under way (a last release right
            // after close()) either carries the change or is over, and the server is
            // told directly.
            let kept = match self.staged_of(ino) {
                Some(staged) => {
                    let _serial = staged.upload_lock.lock().await;
                    let dirty = staged.dirty();
                    if dirty {
                        staged.set_pending_attrs(change);
                    }
                    dirty
                }
                None => false,
            };
            if !kept {
                // Nothing staged carries the change: the server is told, and is to know
                // the file first.
                self.create_answered(ino).await?;
                let id = self.node(ino)?.id;
                if id == LOCAL_ID {
                    // Created here, and its upload failed: it never existed.
                    return Err(FsError::NotFound);
                }
                let info = self.lazy.lazily(self.remote.setattr(id, change)).await?;
                self.remember(&info);
                // A descriptor reading this version through the cache shows its attributes
                // until its last close; the mode and times set here are of that same
                // version, and this mount's own change shows at once.
                if let Some(p) = self.state().pinned.get_mut(&ino) {
                    p.same_version_changed(&info);
                }
            }
        }
        self.getattr(ino).await
    }

    /// Records a new entry made here and returns its attributes.
    fn created(&self, info: &FileInfo) -> FsResult<Attr> {
        let ino = self.remember(info).ok_or(FsError::NotFound)?;
        let st = self.state();
        Ok(self.reported_attr(&st, ino, info))
    }

    pub async fn mkdir(&self, parent: u64, name: &str, mode: u32) -> FsResult<Attr> {
        let dir = self.own_dir(parent)?;
        Self::check_new_name(name)?;
        let info = self
            .lazy
            .lazily(self.remote.mkdir(dir.id, name, mode & 0o7777))
            .await?;
        self.dir_changed(parent);
        let attr = self.created(&info)?;
        // A new directory is empty: no need to ask.
        self.listings()
            .set(&(info.owner.clone(), info.id), Default::default());
        Ok(attr)
    }

    pub async fn symlink(&self, parent: u64, name: &str, target: &str) -> FsResult<Attr> {
        let dir = self.own_dir(parent)?;
        Self::check_new_name(name)?;
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        if target.len() > sharefs_protocol::name::MAX_PATH {
            return Err(FsError::NameTooLong);
        }
        check_symlink_target(target).map_err(FsError::InvalidArgument)?;
        let info = self
            .lazy
            .lazily(self.remote.symlink(dir.id, name, target))
            .await?;
        self.dir_changed(parent);
        self.created(&info)
    }

    /// Forgets the entry at (`parent`, `name`) after it was removed or replaced: a
    /// file being written there uploads nothing more.
    fn removed(&self, dir: &super::Dir, name: &str, ino: Option<u64>) {
        if let Some(ino) = ino {
            let staged = {
                let mut st = self.state();
                st.tree.detach(ino);
                st.cached_version.remove(&ino);
                st.staged.remove(&ino)
            };
            if let Some(staged) = staged {
                staged.unlink();
            }
            let id = self.state().tree.get(ino).map(|n| n.id);
            if let Some(id) = id {
                self.listings().forget(&(dir.owner.clone(), id));
            }
        }
        self.listings().changed(&dir.key(), name, None);
    }

    pub async fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        let dir = self.own_dir(parent)?;
        let ino = self.state().tree.child(parent, name);
        if let Some(i) = ino {
            // A file whose create has not gone out is not sent one to be removed; one
            // under way is waited for (an upload that fails to carry it leaves it unsent).
            if self.create_withdrawn(i).await.is_err() {
                // Its create was refused: there is no such file.
                return Err(FsError::NotFound);
            }
        }
        let local = ino.is_some_and(|i| self.state().tree.is_local(i));
        // A file created here and not uploaded yet exists here only: the server's entry
        // of that name, if any, is someone else's.
        if !local {
            self.remote.remove(dir.id, name, false).await?;
            self.dir_changed(parent);
        }
        self.removed(&dir, name, ino);
        Ok(())
    }

    pub async fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        if parent == super::ROOT {
            // Users' folders are the server's, never the mount's to remove.
            return Err(FsError::PermissionDenied);
        }
        let dir = self.own_dir(parent)?;
        // Creates inside it that went out are answered first: the server then decides
        // whether it is empty.
        let inside: Vec<u64> = {
            let st = self.state();
            match st.tree.child(parent, name) {
                Some(d) => st
                    .creating
                    .keys()
                    .copied()
                    .filter(|i| st.tree.get(*i).is_some_and(|n| n.parent == d))
                    .collect(),
                None => Vec::new(),
            }
        };
        for ino in inside {
            let _ = self.create_settled(ino).await;
        }
        // Files created inside it and not uploaded yet make it not empty.
        let busy = {
            let st = self.state();
            st.tree.child(parent, name).is_some_and(|d| {
                st.staged.keys().any(|i| {
                    st.tree.is_local(*i)
                        && st.tree.get(*i).is_some_and(|n| n.parent == d && !n.gone)
                })
            })
        };
        if busy {
            return Err(FsError::NotEmpty);
        }
        self.remote.remove(dir.id, name, true).await?;
        self.dir_changed(parent);
        let ino = self.state().tree.child(parent, name);
        self.removed(&dir, name, ino);
        Ok(())
    }

    /// rename(2) within one's own tree, across directories and of directories. An open
    /// file with unsaved changes is uploaded first, so the rename moves current content.
    pub async fn rename(
        &self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        noreplace: bool,
    ) -> FsResult<()> {
        let from = self.own_dir(parent)?;
        let to = self.own_dir(new_parent)?;
        Self::check_new_name(new_name)?;
        let moved = self.state().tree.child(parent, name);
        // Both names as the server knows them: creates of them made here answered first.
        let replaced = self.state().tree.child(new_parent, new_name);
        if let Some(ino) = replaced {
            let _ = self.create_answered(ino).await;
        }
        if let Some(ino) = moved {
            if self.create_answered(ino).await.is_err() {
                return Err(FsError::NotFound);
            }
            if let Some(staged) = self.staged_of(ino) {
                self.upload(ino, &staged).await?;
            }
        }
        let mv = Move {
            parent: from.id,
            name: name.to_string(),
            new_parent: to.id,
            new_name: new_name.to_string(),
            noreplace,
        };
        let info = self.remote.rename(&mv).await?;
        self.dir_changed(parent);
        self.dir_changed(new_parent);
        let replaced = {
            let st = self.state();
            st.tree
                .child(new_parent, new_name)
                .filter(|ino| st.tree.get(*ino).is_some_and(|n| n.id != info.id))
        };
        if replaced.is_some() {
            self.removed(&to, new_name, replaced);
        }
        self.listings().changed(&from.key(), name, None);
        if let Some(ino) = self.remember(&info) {
            if let Some(staged) = self.staged_of(ino) {
                staged.set_name(new_name);
            }
        }
        Ok(())
    }

    /// Whether `ino` is the folder of a user (never removed or renamed by the mount).
    pub fn is_user_folder(&self, ino: u64) -> bool {
        self.state()
            .tree
            .get(ino)
            .is_some_and(|n| n.owner.is_some() && n.id == ROOT_ID)
    }
}
