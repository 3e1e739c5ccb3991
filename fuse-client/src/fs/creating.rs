//! Creates in flight. `create(2)` sends the new, empty file to the server (lazily, see
//! `durable`) and returns without waiting for the answer: the file is a local node of the inode table (no entry
//! id yet) that lookups, listings and writes see at once, while the request travels. What
//! needs the server to know the file (its upload at `close()`, `fsync`, a rename, an
//! unlink, a mode or times) first waits for the answer here; by then it has usually
//! arrived, so a new file costs one round trip (its upload) instead of two. A create the
//! server refuses (the name taken meanwhile from another mount, the quota, a full disk)
//! takes the file away again, and the `close()` of whoever created it reports the error.

use std::time::SystemTime;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use sharefs_protocol::{EntryKind, FileInfo};

use super::error::{FsError, FsResult};
use super::remote::{Remote, UploadTarget};
use super::tree::LOCAL_ID;
use super::{FsCore, Invalidation};

/// The server's answer to a create sent from here, awaited by whoever needs it first.
pub type Creating = Shared<BoxFuture<'static, FsResult<FileInfo>>>;

impl<R: Remote> FsCore<R> {
    /// Sends the create of `name` in directory `parent` (the directory `dir_id` of the
    /// user's tree) and returns its local node at once.
    pub(super) fn begin_create(&self, parent: u64, dir_id: u64, name: &str, mode: u32) -> u64 {
        let now = super::ns_of(SystemTime::now());
        let info = FileInfo {
            owner: self.user.clone(),
            id: LOCAL_ID,
            parent: dir_id,
            name: name.to_string(),
            kind: EntryKind::File,
            mode: mode & 0o7777,
            size: 0,
            mtime_ns: now,
            atime_ns: now,
            ctime_ns: now,
            version: 0,
            target: None,
        };
        // With the time shown here meanwhile, so the file's mtime does not move when the
        // answer comes (as the mtimes of uploads are those of the writes made here).
        let target = UploadTarget {
            mode: Some(mode & 0o7777),
            mtime_ns: Some(now),
            ..UploadTarget::at(dir_id, name)
        };
        let remote = self.remote.clone();
        let lazy = self.lazy.clone();
        // Spawned, so the request goes out now even if nothing awaits it yet. Lazy: the
        // upload at `close()` makes it durable (or a `sync`, see `durable`).
        let sent = tokio::spawn(async move {
            lazy.lazily(remote.upload_bytes(&target, Bytes::new()))
                .await
                .map_err(FsError::from)
        });
        let answer: Creating = async move {
            sent.await
                .unwrap_or_else(|e| Err(FsError::Io(format!("create task failed: {e}"))))
        }
        .boxed()
        .shared();
        let mut st = self.state();
        let ino = st.tree.add_local(parent, &info);
        st.creating.insert(ino, answer);
        ino
    }

    /// Waits for the answer to the create of `ino` sent from here, if one is pending: on
    /// success the node has its entry id; a refused create takes the file away.
    pub(super) async fn create_answered(&self, ino: u64) -> FsResult<()> {
        let pending = self.state().creating.get(&ino).cloned();
        let Some(pending) = pending else {
            return Ok(());
        };
        let answer = pending.await;
        self.settle(ino, &answer);
        answer.map(|_| ())
    }

    /// Binds `ino` to its entry if the answer to its create has arrived (without waiting).
    pub(super) fn create_answered_now(&self, ino: u64) {
        let answer = self
            .state()
            .creating
            .get(&ino)
            .and_then(|c| c.peek().cloned());
        if let Some(answer) = answer {
            self.settle(ino, &answer);
        }
    }

    /// Applies the answer to the create of `ino`, once.
    fn settle(&self, ino: u64, answer: &FsResult<FileInfo>) {
        let place = {
            let mut st = self.state();
            if st.creating.remove(&ino).is_none() {
                return;
            }
            match answer {
                Ok(info) => {
                    st.tree.bind(ino, info);
                    None
                }
                Err(_) => {
                    let place = st.tree.get(ino).map(|n| (n.parent, n.name.clone()));
                    st.tree.detach(ino);
                    place
                }
            }
        };
        match answer {
            Ok(info) => {
                self.remember(info);
                let parent = self.state().tree.get(ino).map(|n| n.parent);
                if let Some(parent) = parent {
                    self.dir_changed(parent);
                }
            }
            Err(e) => {
                tracing::warn!(ino, error = %e, "the server refused a file created here; it is gone");
                if let Some((parent, name)) = place {
                    self.invalidate(Invalidation::Entry { parent, name });
                    // A listing the kernel kept may show it: the directory's mtime on
                    // the server did not move, so that cache is dropped here.
                    self.invalidate(Invalidation::Inode { ino: parent });
                }
            }
        }
    }
}
