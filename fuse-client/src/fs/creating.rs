//! Creates made here. `create(2)` makes the file a local node of the inode table (no
//! entry id yet) that lookups, listings and writes see at once, and sends nothing: the
//! file's first upload (its `close()`, an `fsync()`) creates it on the server together
//! with its content, so a new file costs one round trip. Whatever else needs the server
//! to know the file before that (a rename, a chmod of a file not written yet, a write
//! past its first chunk, a `close()` of a descriptor that wrote nothing) sends the
//! create first, empty, and waits for its answer. A create the
//! server refuses (the quota, a full disk, the directory removed from another mount)
//! takes the file away again, and the `close()` of whoever created it reports the error;
//! a file unlinked, or last closed without an upload, before its create went out leaves
//! nothing on the server.

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

/// Where a create made here stands (`State::creating`, by the inode of its local node).
#[derive(Debug, Clone)]
pub enum Create {
    /// Not sent yet: the mode it was made with, and when.
    Deferred { mode: u32, at_ns: i64 },
    /// Sent on its own, empty: its answer.
    Sent(Creating),
    /// Carried by an upload of the file under way; resolves when that upload is over,
    /// either way (see [`Carried`]).
    Carried(Shared<BoxFuture<'static, ()>>),
    /// Sent on its own and refused: the file is gone, and whatever needed it (its
    /// `close()` among them) reports this, until its last descriptor is closed.
    Refused(FsError),
}

/// What [`FsCore::settle_create`] does with a create not sent, and with one carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// Sends it; waits for a carried one.
    Send,
    /// Sends it, durably; returns at once if one is carried.
    SendUnlessCarried,
    /// Leaves it; waits for a carried one.
    Wait,
    /// Forgets it; waits for a carried one.
    Withdraw,
}

/// A deferred create taken by an upload, which creates the file. Dropped without
/// [`Carried::done`] (the upload failed), the create is deferred again. Whoever waits
/// for it (`settle_create`) must not hold the file's `stream_order`, which the upload
/// takes to finish a stream.
pub(super) struct Carried<'a, R: Remote> {
    core: &'a FsCore<R>,
    ino: u64,
    mode: u32,
    at_ns: i64,
    done: bool,
    /// Dropped last: wakes whoever waits for the upload to the state left behind.
    _over: tokio::sync::oneshot::Sender<()>,
}

impl<R: Remote> Carried<'_, R> {
    /// The mode the file was created with.
    pub fn mode(&self) -> u32 {
        self.mode
    }

    /// The upload made the file on the server as `info`: the node is bound to it in the
    /// same step that ends the create, so nobody sees the file neither local nor bound
    /// (an unlink meanwhile would send no remove, and the file would stay).
    pub fn done(mut self, info: &FileInfo) {
        self.done = true;
        let mut st = self.core.state();
        if matches!(st.creating.get(&self.ino), Some(Create::Carried(_))) {
            st.creating.remove(&self.ino);
            st.tree.bind(self.ino, info);
        }
    }
}

impl<R: Remote> Drop for Carried<'_, R> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.core.state();
        if matches!(st.creating.get(&self.ino), Some(Create::Carried(_))) {
            st.creating.insert(
                self.ino,
                Create::Deferred {
                    mode: self.mode,
                    at_ns: self.at_ns,
                },
            );
        }
    }
}

impl<R: Remote> FsCore<R> {
    /// Makes the local node of a new file `name` in directory `parent` (the directory
    /// `dir_id` of the user's tree), its create deferred.
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
        let mut st = self.state();
        let ino = st.tree.add_local(parent, &info);
        st.creating.insert(
            ino,
            Create::Deferred {
                mode: mode & 0o7777,
                at_ns: now,
            },
        );
        ino
    }

    /// Sends the create of `ino` if it is still deferred: empty, with its mode, where the
    /// file now is. Lazily (see `durable`), unless `durable`: then it is answered once it
    /// is durable, with every lazy change answered before it.
    pub(super) fn send_create(&self, ino: u64, durable: bool) {
        let mut st = self.state();
        let Some(Create::Deferred { mode, at_ns }) = st.creating.get(&ino).cloned() else {
            return;
        };
        let Some((parent, name)) = st.tree.get(ino).map(|n| (n.parent, n.name.clone())) else {
            st.creating.remove(&ino);
            return;
        };
        let dir_id = st.tree.get(parent).map_or(0, |p| p.id);
        // With the time shown here meanwhile, so the file's mtime does not move when the
        // answer comes (as the mtimes of uploads are those of the writes made here).
        let target = UploadTarget {
            mode: Some(mode),
            mtime_ns: Some(at_ns),
            ..UploadTarget::at(dir_id, &name)
        };
        let remote = self.remote.clone();
        let lazy = self.lazy.clone();
        // Spawned, so the request goes out now even if nothing awaits it yet.
        let sent = tokio::spawn(async move {
            let sent = remote.upload_bytes(&target, Bytes::new());
            if durable {
                let mark = lazy.mark();
                let answer = sent.await;
                if answer.is_ok() {
                    lazy.durable_up_to(mark);
                }
                answer.map_err(FsError::from)
            } else {
                lazy.lazily(sent).await.map_err(FsError::from)
            }
        });
        let answer: Creating = async move {
            sent.await
                .unwrap_or_else(|e| Err(FsError::Io(format!("create task failed: {e}"))))
        }
        .boxed()
        .shared();
        st.creating.insert(ino, Create::Sent(answer));
    }

    /// Makes sure the server knows the file `ino` if it was created here: sends its create
    /// if it is deferred and waits for the answer (or for an upload carrying it). On
    /// success the node has its entry id; a refused create takes the file away.
    pub(super) async fn create_answered(&self, ino: u64) -> FsResult<()> {
        self.settle_create(ino, Settle::Send).await
    }

    /// Waits for a create of `ino` under way (sent, or carried by an upload) to end,
    /// sending none: a deferred create stays deferred, even one an upload failed to carry.
    /// An error: a create sent on its own was refused, and the file is gone.
    pub(super) async fn create_settled(&self, ino: u64) -> FsResult<()> {
        self.settle_create(ino, Settle::Wait).await
    }

    /// [`FsCore::create_answered`] for a write about to start a stream, holding the
    /// file's `stream_order`: the create is sent durably (the stream's upload is resumed
    /// across a server restart, and must find its file), and one carried by an upload
    /// under way is not waited for, since that upload takes `stream_order` to end.
    pub(super) async fn create_answered_unless_carried(&self, ino: u64) -> FsResult<()> {
        self.settle_create(ino, Settle::SendUnlessCarried).await
    }

    /// For an unlink: forgets a create of `ino` that has not gone out (the server never
    /// knew the file), waiting for one under way. In one step with the look at it, so no
    /// upload takes the create between the two. An error: a create sent on its own was
    /// refused, and the file is gone.
    pub(super) async fn create_withdrawn(&self, ino: u64) -> FsResult<()> {
        self.settle_create(ino, Settle::Withdraw).await
    }

    async fn settle_create(&self, ino: u64, how: Settle) -> FsResult<()> {
        loop {
            match how {
                Settle::Send => self.send_create(ino, false),
                // For a stream: a server restart must not lose the file its upload is to
                // commit to, so this create waits for the disk.
                Settle::SendUnlessCarried => self.send_create(ino, true),
                Settle::Wait | Settle::Withdraw => {}
            }
            let state = {
                let mut st = self.state();
                let state = st.creating.get(&ino).cloned();
                if let (Settle::Withdraw, Some(Create::Deferred { .. })) = (how, &state) {
                    st.creating.remove(&ino);
                }
                state
            };
            match state {
                None | Some(Create::Deferred { .. }) => return Ok(()),
                Some(Create::Sent(answer)) => {
                    let answer = answer.await;
                    self.settle(ino, &answer);
                    return answer.map(|_| ());
                }
                Some(Create::Carried(_)) if how == Settle::SendUnlessCarried => return Ok(()),
                // Done, or deferred again (the upload failed): looked at again.
                Some(Create::Carried(over)) => over.await,
                Some(Create::Refused(e)) => return Err(e),
            }
        }
    }

    /// Binds `ino` to its entry if the answer to its create has arrived (without waiting).
    pub(super) fn create_answered_now(&self, ino: u64) {
        let answer = match self.state().creating.get(&ino) {
            Some(Create::Sent(answer)) => answer.peek().cloned(),
            _ => None,
        };
        if let Some(answer) = answer {
            self.settle(ino, &answer);
        }
    }

    /// Whether the create of `ino` was sent on its own and refused (and reported by the
    /// call that needed it).
    pub(super) fn create_refused(&self, ino: u64) -> bool {
        matches!(self.state().creating.get(&ino), Some(Create::Refused(_)))
    }

    /// Takes the deferred create of `ino` into an upload about to be sent, which creates
    /// the file; `None` if there is none.
    pub(super) fn carry_create(&self, ino: u64) -> Option<Carried<'_, R>> {
        let mut st = self.state();
        let Some(Create::Deferred { mode, at_ns }) = st.creating.get(&ino).cloned() else {
            return None;
        };
        let (over, ended) = tokio::sync::oneshot::channel::<()>();
        st.creating
            .insert(ino, Create::Carried(ended.map(|_| ()).boxed().shared()));
        Some(Carried {
            core: self,
            ino,
            mode,
            at_ns,
            done: false,
            _over: over,
        })
    }

    /// Forgets the create of `ino` if nothing of it went out (the server never knew the
    /// file); true if it did.
    pub(super) fn cancel_create(&self, ino: u64) -> bool {
        let mut st = self.state();
        if matches!(st.creating.get(&ino), Some(Create::Deferred { .. })) {
            st.creating.remove(&ino);
            true
        } else {
            false
        }
    }

    /// A file created here that will never reach the server (its last descriptor closed
    /// after its uploads failed or its create was refused, or its create could not be
    /// staged): its create is forgotten and the file taken away, from the kernel's caches
    /// too.
    pub(super) fn forget_unsent(&self, ino: u64) {
        {
            let mut st = self.state();
            if matches!(st.creating.get(&ino), Some(Create::Refused(_))) {
                // Taken away when it was refused.
                st.creating.remove(&ino);
                return;
            }
        }
        if !self.cancel_create(ino) {
            return;
        }
        let place = {
            let mut st = self.state();
            let place = st.tree.get(ino).map(|n| (n.parent, n.name.clone()));
            st.tree.detach(ino);
            place
        };
        if let Some((parent, name)) = place {
            self.invalidate(Invalidation::Entry { parent, name });
            self.invalidate(Invalidation::Inode { ino: parent });
        }
    }

    /// Applies the answer to the create of `ino` sent from here, once.
    fn settle(&self, ino: u64, answer: &FsResult<FileInfo>) {
        let place = {
            let mut st = self.state();
            if !matches!(st.creating.get(&ino), Some(Create::Sent(_))) {
                return;
            }
            match answer {
                Ok(info) => {
                    st.creating.remove(&ino);
                    st.tree.bind(ino, info);
                    None
                }
                Err(e) => {
                    st.creating.insert(ino, Create::Refused(e.clone()));
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
