//! Open files: descriptors reading a pinned server version, descriptors writing a staged
//! copy, and the uploads that make a staged copy the file's new version.
//!
//! An upload names the file by its entry id (`replace`), so a descriptor follows its
//! file through renames of it and of its directories. A file created here has no id
//! until its first upload creates it on the server with its content and mode, or until
//! whatever needs the server to know it sooner sends its create (see `creating`).
//! Mode and times set on a file whose staged content is not uploaded yet (`cp -p` does
//! `fchmod` and `futimens` before `close`) are kept with it and sent with the upload.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use sharefs_protocol::{EntryKind, FileInfo, CHUNK_SIZE};
use tokio::sync::Semaphore;

use super::error::{FsError, FsResult};
use super::read::ReadHandle;
use super::remote::{AttrChange, Remote, UploadTarget};
use super::room;
use super::stream::{self, StreamState};
use super::tree::LOCAL_ID;
use super::write::{Base, Content, StagedWrite};
use super::{Attr, FsCore, OpenDir, OpenMode, Opened, Pinned, HEAD};

pub enum Handle<R: Remote> {
    /// A remote version; `cached` when read through the kernel's cache (`State::pinned`).
    Read {
        reader: Arc<ReadHandle<R>>,
        ino: u64,
        cached: bool,
    },
    Staged {
        ino: u64,
        staged: Arc<StagedWrite>,
        writable: bool,
    },
    Dir(Arc<OpenDir>),
}

impl<R: Remote> Clone for Handle<R> {
    fn clone(&self) -> Self {
        match self {
            Handle::Read {
                reader,
                ino,
                cached,
            } => Handle::Read {
                reader: reader.clone(),
                ino: *ino,
                cached: *cached,
            },
            Handle::Staged {
                ino,
                staged,
                writable,
            } => Handle::Staged {
                ino: *ino,
                staged: staged.clone(),
                writable: *writable,
            },
            Handle::Dir(d) => Handle::Dir(d.clone()),
        }
    }
}

/// A pinned server version as the base of a staged write.
struct BaseReader<R: Remote>(Arc<ReadHandle<R>>);

impl<R: Remote> Base for BaseReader<R> {
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = FsResult<Bytes>> + Send + '_>> {
        Box::pin(self.0.read(offset, len))
    }

    fn close(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.0.close())
    }
}

/// The version a stream just committed, as the base of its staged file: opened at its
/// first read only (most files written by a stream are closed without another access).
struct CommittedBase<R: Remote> {
    remote: Arc<R>,
    info: FileInfo,
    budget: Arc<Semaphore>,
    reader: tokio::sync::Mutex<Option<Arc<ReadHandle<R>>>>,
}

impl<R: Remote> CommittedBase<R> {
    async fn reader(&self) -> FsResult<Arc<ReadHandle<R>>> {
        let mut held = self.reader.lock().await;
        if let Some(r) = held.as_ref() {
            return Ok(r.clone());
        }
        let (handle, info, head) = self.remote.open(&self.info.owner, self.info.id, 0).await?;
        let reader = Arc::new(ReadHandle::new(
            self.remote.clone(),
            handle,
            info.clone(),
            head,
            self.budget.clone(),
        ));
        if info.version != self.info.version {
            // Replaced since (by another mount of the same user).
            reader.close().await;
            return Err(FsError::Stale);
        }
        *held = Some(reader.clone());
        Ok(reader)
    }
}

impl<R: Remote> Base for CommittedBase<R> {
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = FsResult<Bytes>> + Send + '_>> {
        Box::pin(async move { self.reader().await?.read(offset, len).await })
    }

    fn close(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if let Some(r) = self.reader.lock().await.take() {
                r.close().await;
            }
        })
    }
}

/// What became of a write offered to the file's stream.
enum Fed {
    /// The stream took it: the staged content does not hold it.
    Streamed,
    /// The staged content takes it (kept there too while a stream may still start; after
    /// recalling the stream, for a write out of its sequence).
    Staged,
}

/// How a staged write starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Based on the version on the server, fetched only where needed.
    Based,
    /// Empty; `dirty` when an empty upload is due even without writes (truncated).
    Empty { dirty: bool },
}

impl<R: Remote> FsCore<R> {
    pub(super) fn handles(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Handle<R>>> {
        super::lock(&self.handles)
    }

    pub(super) fn insert_handle(&self, h: Handle<R>) -> u64 {
        let fh = self
            .next_fh
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.handles().insert(fh, h);
        fh
    }

    fn handle(&self, fh: u64) -> FsResult<Handle<R>> {
        self.handles().get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    /// Creates a regular file in one of the user's directories and opens it for writing.
    /// The file is this mount's until its first upload (its `close()`) makes it on the
    /// server with its content and mode, in one request; whatever needs the server to
    /// know it earlier sends its create first (see `creating`), so lock files
    /// (`O_CREAT | O_EXCL`, then rename) behave as on a local disk.
    pub async fn create(&self, parent: u64, name: &str, mode: u32) -> FsResult<(Attr, u64)> {
        let dir = self.own_dir(parent)?;
        Self::check_new_name(name)?;
        let ino = self.begin_create(parent, dir.id, name, mode);
        let staged = async {
            let info = self.file_info(ino)?;
            let staged = self
                .stage(ino, &info, Start::Empty { dirty: false })
                .await?;
            Ok::<_, FsError>((info, staged))
        };
        let (info, staged) = match staged.await {
            Ok(staged) => staged,
            Err(e) => {
                // Nothing went out: the file never was.
                self.forget_unsent(ino);
                return Err(e);
            }
        };
        let attr = self.staged_attr(ino, &info, &staged);
        let fh = self.insert_handle(Handle::Staged {
            ino,
            staged,
            writable: true,
        });
        Ok((attr, fh))
    }

    /// mknod(2) of a regular file: an empty file, made at once.
    pub async fn mknod_file(&self, parent: u64, name: &str, mode: u32) -> FsResult<Attr> {
        let (attr, fh) = self.create(parent, name, mode).await?;
        self.release(fh).await?;
        Ok(attr)
    }

    /// The staged write of `ino`, created if needed (see [`Start`]).
    async fn stage(&self, ino: u64, info: &FileInfo, start: Start) -> FsResult<Arc<StagedWrite>> {
        loop {
            if let Some(s) = self.live_staged(ino).await {
                return Ok(s);
            }
            // What the file now is: a release waited for above may have uploaded it
            // (and a file created here got its id).
            let info = self.file_info(ino).unwrap_or_else(|_| info.clone());
            let staged = self.stage_new(&info, start).await?;
            let theirs = {
                let mut st = self.state();
                // Another open may have staged it meanwhile; use theirs.
                match st.staged.get(&ino).cloned() {
                    Some(s) => Some(s),
                    None => {
                        staged.acquire();
                        st.staged.insert(ino, staged.clone());
                        None
                    }
                }
            };
            let Some(theirs) = theirs else {
                return Ok(staged);
            };
            staged.mark_uploaded(staged.changes());
            staged.close_base().await;
            staged.finish(&self.failed_dir);
            if theirs.try_acquire() {
                return Ok(theirs);
            }
            // Theirs is being released already: wait for it, as above.
        }
    }

    /// The staged write of `ino` with one more reference, if one is open. One whose last
    /// descriptor is being released is waited for (its last upload takes the operation
    /// timeout at most): what it uploads is complete, and what comes next starts afresh.
    async fn live_staged(&self, ino: u64) -> Option<Arc<StagedWrite>> {
        loop {
            let s = self.state().staged.get(&ino).cloned()?;
            if s.try_acquire() {
                return Some(s);
            }
            s.wait_finished().await;
        }
    }

    /// A new staged write, not registered yet: see [`FsCore::stage`].
    async fn stage_new(&self, info: &FileInfo, start: Start) -> FsResult<Arc<StagedWrite>> {
        let budget = self.staged_memory.clone();
        let dir = self.staging.dir();
        let name = info.name.as_str();
        let staged = match start {
            Start::Empty { dirty } => StagedWrite::create(dir, name, dirty, budget),
            Start::Based => match self.remote.open(&info.owner, info.id, HEAD).await {
                Ok((handle, info, head)) => {
                    let reader = Arc::new(ReadHandle::new(
                        self.remote.clone(),
                        handle,
                        info.clone(),
                        head,
                        self.prefetch_budget.clone(),
                    ));
                    if info.size == 0 {
                        reader.close().await;
                        StagedWrite::create(dir, name, false, budget)
                    } else {
                        let base = Arc::new(BaseReader(reader.clone()));
                        match StagedWrite::based_on(dir, name, base, info.size, budget) {
                            Ok(s) => s,
                            Err(e) => {
                                reader.close().await;
                                return Err(e);
                            }
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            },
        };
        Ok(Arc::new(staged))
    }

    /// The file `ino` as last described, for a descriptor to open it.
    fn file_info(&self, ino: u64) -> FsResult<FileInfo> {
        let node = self.node(ino)?;
        match node.kind {
            EntryKind::File => {}
            EntryKind::Dir => return Err(FsError::IsDir),
            EntryKind::Symlink => return Err(FsError::InvalidArgument("symbolic link".into())),
        }
        node.info.ok_or(FsError::NotFound)
    }

    pub async fn open(&self, ino: u64, mode: OpenMode) -> FsResult<Opened> {
        let info = match self.file_info(ino) {
            Ok(info) => info,
            Err(FsError::NotFound) => {
                self.getattr(ino).await?;
                self.file_info(ino)?
            }
            Err(e) => return Err(e),
        };
        if mode.changes_file() {
            if info.owner != self.user {
                return Err(FsError::PermissionDenied);
            }
            let start = if mode.truncate {
                Start::Empty { dirty: true }
            } else {
                Start::Based
            };
            let staged = self.stage(ino, &info, start).await?;
            if mode.truncate {
                self.truncate_staged(&staged, 0).await?;
            }
            self.state().cached_version.remove(&ino);
            let fh = self.insert_handle(Handle::Staged {
                ino,
                staged,
                writable: true,
            });
            return Ok(Opened {
                fh,
                keep_cache: false,
                refresh_attrs: false,
                direct: false,
                content: None,
            });
        }
        if let Some(staged) = self.live_staged(ino).await {
            let fh = self.insert_handle(Handle::Staged {
                ino,
                staged,
                writable: false,
            });
            return Ok(Opened {
                fh,
                keep_cache: true,
                refresh_attrs: false,
                direct: false,
                content: None,
            });
        }
        // Always asks the server: this open is the download the owner hears about.
        let (handle, info, head) = self.remote.open(&info.owner, info.id, HEAD).await?;
        let (keep_cache, refresh_attrs, direct) = {
            let mut st = self.state();
            match st.pinned.get_mut(&ino) {
                // Open already, attributes and pages included (once the refresh of the
                // open that pinned it has landed).
                Some(p) if p.info.version == info.version => {
                    p.open += 1;
                    (true, p.refreshing, false)
                }
                // The kernel's size and pages are the other version's while it is open.
                Some(p) => {
                    tracing::debug!(
                        file = %info.name,
                        cached = p.info.version,
                        opened = info.version,
                        "another version is open through the cache: reading past it"
                    );
                    (false, false, true)
                }
                None => {
                    let keep = st.cached_version.get(&ino) == Some(&info.version);
                    // Reads stop at the kernel's size: if it may hold another version's,
                    // it drops it before the reply (see `told`), and takes this one. A
                    // reply under way may carry a size not recorded yet.
                    let refresh = {
                        let mut told = super::lock(&self.told);
                        let refresh = told.may_differ(ino, info.size)
                            || self.attr_replies.load(Ordering::SeqCst) > 0;
                        if refresh {
                            told.dropping(ino);
                        }
                        refresh
                    };
                    st.cached_version.insert(ino, info.version);
                    st.pinned.insert(
                        ino,
                        Pinned {
                            info: info.clone(),
                            open: 1,
                            stale: false,
                            attrs_changed: false,
                            refreshing: refresh,
                        },
                    );
                    (keep, refresh, false)
                }
            }
        };
        self.remember(&info);
        let whole = info.size > 0 && head.len() as u64 == info.size;
        let content = (keep_cache && whole).then(|| head.clone());
        let reader = Arc::new(ReadHandle::new(
            self.remote.clone(),
            handle,
            info,
            head,
            self.prefetch_budget.clone(),
        ));
        let fh = self.insert_handle(Handle::Read {
            reader,
            ino,
            cached: !direct,
        });
        Ok(Opened {
            fh,
            keep_cache,
            refresh_attrs,
            direct,
            content,
        })
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        match self.handle(fh)? {
            Handle::Read { reader, .. } => reader.read(offset, size).await,
            Handle::Staged { staged, .. } => {
                if staged.streaming() {
                    let _order = staged.stream_order.lock().await;
                    self.recall_stream(&staged).await?;
                }
                Ok(Bytes::from(staged.read(offset, size).await?))
            }
            Handle::Dir(_) => Err(FsError::IsDir),
        }
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_bytes(fh, offset, Bytes::copy_from_slice(data))
            .await
    }

    /// [`FsCore::write`] of bytes the caller already owns: a streamed upload takes them
    /// without another copy.
    pub async fn write_bytes(&self, fh: u64, offset: u64, data: Bytes) -> FsResult<u32> {
        let (ino, staged) = match self.handle(fh)? {
            Handle::Staged {
                ino,
                staged,
                writable: true,
            } => (ino, staged),
            Handle::Staged { .. } | Handle::Read { .. } => return Err(FsError::BadHandle),
            Handle::Dir(_) => return Err(FsError::IsDir),
        };
        let _order = staged.stream_order.lock().await;
        let end = offset + data.len() as u64;
        if end > staged.size() {
            self.check_room(ino, end).await?;
        }
        let len = data.len();
        let n = match self.feed_stream(ino, &staged, offset, data.clone()).await? {
            Fed::Streamed => {
                staged.write_streamed(offset, len as u64);
                len as u32
            }
            Fed::Staged => staged.write(offset, &data).await?,
        };
        self.mark_changed(fh);
        Ok(n)
    }

    /// A write out of the stream's sequence: the stream is recalled, the staged content
    /// takes the write.
    async fn recall_then_stage(&self, staged: &Arc<StagedWrite>) -> FsResult<Fed> {
        self.recall_stream(staged).await?;
        Ok(Fed::Staged)
    }

    /// Truncates a staged file, first recalling its stream if the cut goes into it.
    async fn truncate_staged(&self, staged: &Arc<StagedWrite>, size: u64) -> FsResult<()> {
        // Under the stream's order: a write starting a stream meanwhile would otherwise be
        // dropped with it.
        let _order = staged.stream_order.lock().await;
        if staged.truncate_cuts_stream(size) {
            self.recall_stream(staged).await?;
        }
        staged.truncate(size)
    }

    /// Brings the bytes a stream of `staged` carried back into its staged content and
    /// ends the stream (for whatever a stream cannot do: see `stream.rs`). The caller
    /// holds the file's `stream_order`. If they cannot be brought back, the staged file
    /// is marked broken and the error returned.
    pub(super) async fn recall_stream(&self, staged: &Arc<StagedWrite>) -> FsResult<()> {
        let tx = {
            let Ok(mut st) = staged.stream.lock() else {
                return Err(FsError::Io("stream state poisoned".into()));
            };
            match std::mem::take(&mut *st) {
                StreamState::Active { tx, .. } => tx,
                other => {
                    *st = other;
                    return Ok(());
                }
            }
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let result = match tx.send(stream::StreamMsg::Recall { reply }).await {
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err(FsError::Io("the stream's task ended".into()))),
            Err(_) => Err(FsError::Io("the stream's task ended".into())),
        };
        match &result {
            Ok(()) => {
                tracing::debug!(file = %staged.name(), "stream recalled into the staged file")
            }
            Err(e) => {
                tracing::error!(file = %staged.name(), error = %e, "the streamed part of a file could not be brought back; the file cannot be saved");
                staged.set_broken(&e.to_string());
            }
        }
        result
    }

    /// Fails a write that would make file `ino` `end` bytes long if the server has no
    /// room for it (see `room.rs`).
    async fn check_room(&self, ino: u64, end: u64) -> FsResult<()> {
        // The version it replaces is counted as freed by the server.
        let old = {
            let st = self.state();
            st.tree
                .get(ino)
                .filter(|n| n.id != LOCAL_ID)
                .and_then(|n| n.info.as_ref())
                .map_or(0, |i| i.size)
        };
        let need = end.saturating_sub(old);
        if need == 0 {
            return Ok(());
        }
        if let Some(space) = self.room.fresh() {
            if room::refusal(&space, need).is_none() {
                return Ok(());
            }
        }
        let space = match self.remote.statfs().await {
            Ok(space) => space,
            Err(e) => {
                tracing::debug!(error = %e, "statfs for a growing write failed; the upload will tell");
                return Ok(());
            }
        };
        let refused = room::refusal(&space, need);
        self.room.store(space);
        match refused {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Where an upload of the staged file `ino` goes: its entry, wherever it now is, with
    /// the mode and times set on it meanwhile. `creates`: the upload carries the file's
    /// create (see [`FsCore::carry_create`]), made with that mode.
    fn upload_target(
        &self,
        ino: u64,
        staged: &StagedWrite,
        creates: Option<u32>,
    ) -> FsResult<UploadTarget> {
        self.create_answered_now(ino);
        let st = self.state();
        let node = st.tree.get(ino).ok_or(FsError::NotFound)?;
        let parent = st.tree.get(node.parent).map_or(0, |p| p.id);
        if creates.is_none() && st.creating.contains_key(&ino) {
            // Not before the server made it (a stream waits and keeps what it has).
            return Err(FsError::Io("the file's create is not answered yet".into()));
        }
        if creates.is_none() && node.id == LOCAL_ID {
            // Never made on the server, and this upload is not to make it: its create was
            // refused, or it was unlinked before anything went out.
            return Err(FsError::NotFound);
        }
        let pending = staged.pending_attrs();
        Ok(UploadTarget {
            parent,
            name: node.name.clone(),
            // A file created here is created by its first upload.
            replace: (node.id != LOCAL_ID).then_some(node.id),
            mode: pending.mode.or(creates),
            // The time of the last write, which the mount has shown meanwhile.
            mtime_ns: pending.mtime_ns.or(Some(staged.written_ns())),
        })
    }

    /// Offers a write to the file's streamed upload: starts one for the first write of a
    /// fresh file past a chunk, feeds it while writes stay in sequence, and recalls it at
    /// the first write out of sequence.
    async fn feed_stream(
        &self,
        ino: u64,
        staged: &Arc<StagedWrite>,
        offset: u64,
        data: Bytes,
    ) -> FsResult<Fed> {
        let len = data.len() as u64;
        if offset + len >= u64::from(CHUNK_SIZE) {
            // Worth streaming: not before the server made the file (if it refused, the
            // stream's target fails and the staged upload reports it). A create carried
            // by an upload under way (an fsync) is not waited for: that upload may need
            // this write's `stream_order` to end; the stream waits and keeps what it has.
            if self.create_answered_unless_carried(ino).await.is_err() {
                // Refused: the file is gone, and nothing will stream; the staged copy
                // takes the writes, and the close reports the refusal.
                staged.stop_stream();
            }
        }
        let target = self.upload_target(ino, staged, None);
        // `None`: a write out of the stream's sequence (recalled below, without the lock).
        let fed = {
            let Ok(mut st) = staged.stream.lock() else {
                return Ok(Fed::Staged);
            };
            match &mut *st {
                StreamState::Eligible if offset == 0 => {
                    *st = StreamState::Pending {
                        buf: bytes::BytesMut::from(&data[..]),
                        next: len,
                    };
                    Some((None, Fed::Staged))
                }
                StreamState::Pending { buf, next } if *next == offset => {
                    buf.extend_from_slice(&data);
                    *next += len;
                    match target {
                        Ok(target) if buf.len() >= CHUNK_SIZE as usize => {
                            // Big enough to be worth streaming: start, with what we kept.
                            let head = buf.split().freeze();
                            let next = *next;
                            let (tx, rx) = tokio::sync::mpsc::channel(stream::STREAM_QUEUE);
                            let into = staged.clone();
                            let fill: stream::Fill =
                                Box::new(move |offset, data| into.fill_streamed(offset, data));
                            tokio::spawn(stream::run(
                                self.remote.clone(),
                                target,
                                self.stream_budget.clone(),
                                fill,
                                rx,
                            ));
                            *st = StreamState::Active {
                                tx: tx.clone(),
                                next,
                            };
                            Some((Some((tx, head)), Fed::Streamed))
                        }
                        _ => Some((None, Fed::Staged)),
                    }
                }
                StreamState::Active { tx, next } if *next == offset => {
                    *next += len;
                    Some((Some((tx.clone(), data)), Fed::Streamed))
                }
                // Out of sequence: recalled below.
                StreamState::Active { .. } => None,
                StreamState::Eligible | StreamState::Pending { .. } => {
                    *st = StreamState::Off;
                    Some((None, Fed::Staged))
                }
                StreamState::Off => Some((None, Fed::Staged)),
            }
        };
        let Some((send, fed)) = fed else {
            return self.recall_then_stage(staged).await;
        };
        if let Some((tx, payload)) = send {
            if tx.send(stream::StreamMsg::Data(payload)).await.is_err() {
                // The stream's task is gone with what it carried: nothing can bring it
                // back.
                staged.stop_stream();
                staged.set_broken("the stream's task ended");
                return Err(FsError::Io("the file's streamed upload ended".into()));
            }
        }
        Ok(fed)
    }

    /// Commits the file's stream if it carries the whole content (`None` if there is no
    /// stream); a stream that carries less is recalled first, for the whole staged file
    /// to go up. A stream that fails has no fallback: its bytes are not staged.
    async fn finish_stream(
        &self,
        staged: &Arc<StagedWrite>,
        mtime_ns: Option<i64>,
    ) -> FsResult<Option<FileInfo>> {
        // No write, read or truncation of the file meanwhile: each would see the stream
        // gone before its bytes are anywhere (a write would land in the staged content
        // that the rebase below empties).
        let _order = staged.stream_order.lock().await;
        let tx = {
            let Ok(mut st) = staged.stream.lock() else {
                return Err(FsError::Io("stream state poisoned".into()));
            };
            match std::mem::take(&mut *st) {
                StreamState::Active { tx, next } if next == staged.size() => Some(tx),
                active @ StreamState::Active { .. } => {
                    *st = active;
                    None
                }
                _ => return Ok(None),
            }
        };
        let Some(tx) = tx else {
            self.recall_stream(staged).await?;
            return Ok(None);
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let ended = || FsError::Io("the stream's task ended".into());
        tx.send(stream::StreamMsg::Finish { mtime_ns, reply })
            .await
            .map_err(|_| ended())?;
        let info = match answer.await.map_err(|_| ended())? {
            Ok(info) => info,
            Err(unfinished) => {
                if !unfinished.given_back {
                    staged.set_broken(&unfinished.error.to_string());
                }
                return Err(unfinished.error);
            }
        };
        // The staged content never held what the stream carried: from now on the file's
        // bytes come from the version just committed.
        staged
            .rebase(Arc::new(CommittedBase {
                remote: self.remote.clone(),
                info: info.clone(),
                budget: self.prefetch_budget.clone(),
                reader: tokio::sync::Mutex::new(None),
            }))
            .await;
        Ok(Some(info))
    }

    /// Uploads a staged file if it changed; returns once the server committed it.
    pub(super) async fn upload(&self, ino: u64, staged: &Arc<StagedWrite>) -> FsResult<()> {
        let _serial = staged.upload_lock.lock().await;
        self.upload_locked(ino, staged).await
    }

    /// [`FsCore::upload`] with the file's upload lock held by the caller.
    async fn upload_locked(&self, ino: u64, staged: &Arc<StagedWrite>) -> FsResult<()> {
        // A file created here whose create has not gone out is created by this upload,
        // even an empty one; else the server is to know the file first.
        let carried = self.carry_create(ino);
        if carried.is_none() {
            self.create_answered(ino).await?;
            if !staged.dirty() {
                return Ok(());
            }
            if self.state().tree.is_local(ino) {
                // Its create was withdrawn by an unlink (which may not have marked the
                // staged copy yet): nothing is to reach the server.
                return Ok(());
            }
        }
        if let Some(why) = staged.broken() {
            return Err(FsError::Io(format!(
                "{}: part of its content was lost ({why})",
                staged.name()
            )));
        }
        let changes = staged.changes();
        let name = staged.name();
        if let Err(e) = staged.materialize().await {
            tracing::warn!(file = %name, error = %e, "cannot fetch the rest of the file");
            return Err(e);
        }
        let target = self.upload_target(ino, staged, carried.as_ref().map(|c| c.mode()))?;
        // The upload's fdatasync covers every lazy change answered before it is sent.
        let lazy_mark = self.lazy.mark();
        let streamed = self.finish_stream(staged, target.mtime_ns).await;
        let mut info = match streamed {
            Ok(Some(info)) => Ok(info),
            Err(e) => {
                tracing::warn!(file = %name, error = %e, "streamed upload failed");
                return Err(e);
            }
            Ok(None) => match staged.content() {
                Content::Memory(data) => self.remote.upload_bytes(&target, data).await,
                Content::File(path) => self.remote.upload_file(&target, &path).await,
            },
        }
        .map_err(|e| {
            tracing::warn!(file = %name, error = %e, "upload failed");
            FsError::from(e)
        })?;
        staged.mark_uploaded(changes);
        let created = carried.is_some();
        if let Some(carried) = carried {
            carried.done(&info);
        }
        self.lazy.durable_up_to(lazy_mark);
        self.room.spend(info.size);
        tracing::info!(file = %name, size = info.size, "uploaded");
        // What the upload did not carry (a mode set after a stream began, an access
        // time) follows in one more request.
        let pending = staged.pending_attrs();
        let fix = AttrChange {
            mode: pending.mode.filter(|m| *m & 0o7777 != info.mode & 0o7777),
            atime_ns: pending.atime_ns.filter(|t| *t != info.atime_ns),
            mtime_ns: pending.mtime_ns.filter(|t| *t != info.mtime_ns),
        };
        if !fix.is_empty() {
            info = self.remote.setattr(info.id, fix).await.map_err(|e| {
                tracing::warn!(file = %name, error = %e, "setting mode or times after the upload failed");
                FsError::from(e)
            })?;
        }
        staged.clear_pending_attrs(&pending);
        let created = {
            let mut st = self.state();
            let local = created || st.tree.is_local(ino);
            st.tree.bind(ino, &info);
            local.then(|| st.tree.get(ino).map(|n| n.parent)).flatten()
        };
        if let Some(parent) = created {
            self.dir_changed(parent);
        }
        self.remember(&info);
        let mut st = self.state();
        match st.pinned.get_mut(&ino) {
            // A descriptor here still reads an earlier version through the cache, so its
            // pages are mixed with these writes': they go after its last close.
            Some(p) if p.info.version != info.version => {
                p.stale = true;
                st.cached_version.remove(&ino);
            }
            // The kernel's pages of this file came from these writes (or from the version
            // they were made on): they are this version's, and the next open may keep them
            // instead of dropping what may be a gigabyte of cache.
            _ => {
                st.cached_version.insert(ino, info.version);
            }
        }
        Ok(())
    }

    pub(super) fn mark_changed(&self, fh: u64) {
        super::lock(&self.changed_since_flush).insert(fh);
    }

    fn take_changed(&self, fh: u64) -> bool {
        super::lock(&self.changed_since_flush).remove(&fh)
    }

    /// `close()` of a descriptor: uploads what this handle changed. The check happens under
    /// the file's upload lock, so a `close()` never returns while another close of the same
    /// open file (a forked child closing its inherited copy, say) is still uploading this
    /// handle's writes.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        match self.handle(fh)? {
            Handle::Staged {
                ino,
                staged,
                writable: true,
            } => {
                let _serial = staged.upload_lock.lock().await;
                if !self.take_changed(fh) {
                    // close() of a new file means it is made on the server, durably,
                    // with what was done to it (a mode, times) since. Empty: what another
                    // descriptor wrote goes up at that one's close.
                    self.send_create(ino, true);
                    self.create_answered(ino).await?;
                    return self.make_durable().await;
                }
                let result = Box::pin(self.upload_locked(ino, &staged)).await;
                if result.is_err() {
                    // Not committed: the next close of this open file tries again and
                    // reports (a parent's close after its forked child's close failed);
                    // the last release does not.
                    self.mark_changed(fh);
                    staged.report_failure();
                }
                result
            }
            _ => Ok(()),
        }
    }

    /// fsync(2): uploads pending changes, whoever made them.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        match self.handle(fh)? {
            Handle::Staged {
                ino,
                staged,
                writable: true,
            } => {
                let result = self.upload(ino, &staged).await;
                if result.is_err() {
                    staged.report_failure();
                }
                result?;
                // Its mode and times set lazily, its create, or a directory made for it.
                self.make_durable().await
            }
            _ => self.make_durable().await,
        }
    }

    /// fsync(2) of a directory: its entries made here are durable on the server.
    pub async fn fsync_dir(&self) -> FsResult<()> {
        self.make_durable().await
    }

    /// Last close of a handle. A staged file with changes no `close()` uploaded (one
    /// truncated without writes, or written after its last `close()`) is uploaded now,
    /// unless a `close()` or `fsync()` already reported its upload failed: then nobody is
    /// left to tell of a later outcome, and the server's file stays as that caller was
    /// told. Data not uploaded is kept locally (see [`StagedWrite::finish`]).
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let Some(handle) = self.handles().remove(&fh) else {
            return Err(FsError::BadHandle);
        };
        self.take_changed(fh);
        match handle {
            Handle::Read {
                reader,
                ino,
                cached,
            } => {
                if cached {
                    self.unpin(ino);
                }
                reader.close().await;
                Ok(())
            }
            Handle::Dir(_) => Ok(()),
            Handle::Staged { ino, staged, .. } => {
                if !staged.release() {
                    return Ok(());
                }
                // No open joins it from here on (see `live_staged`).
                let result = {
                    let _serial = staged.upload_lock.lock().await;
                    if staged.dirty() && staged.failure_reported() {
                        tracing::warn!(
                            file = %staged.name(),
                            "not uploaded at the last close: its close() or fsync() reported the failure"
                        );
                        Ok(())
                    } else if self.create_refused(ino) {
                        // Gone; the call that sent its create reported why.
                        Ok(())
                    } else {
                        // Boxed: inline, its state made every release's future (a
                        // read-only descriptor's too) 8 KiB to move between threads.
                        Box::pin(self.upload_locked(ino, &staged)).await
                    }
                };
                staged.close_base().await;
                {
                    let mut st = self.state();
                    if st.staged.get(&ino).is_some_and(|s| Arc::ptr_eq(s, &staged)) {
                        st.staged.remove(&ino);
                    }
                }
                // Created here and never uploaded (its upload failed): it never was.
                self.forget_unsent(ino);
                staged.finish(&self.failed_dir);
                result
            }
        }
    }

    /// Truncates the file `ino` to `size`: through the descriptor `fh` if it is one
    /// writing it, else by staging it (joining the descriptors open on it) and, with no
    /// descriptor open, uploading at once.
    pub(super) async fn truncate(&self, ino: u64, size: u64, fh: Option<u64>) -> FsResult<Attr> {
        let info = self.file_info(ino)?;
        if info.owner != self.user {
            return Err(FsError::PermissionDenied);
        }
        if let Some((fh, Handle::Staged { staged, .. })) =
            fh.and_then(|fh| self.handle(fh).ok().map(|h| (fh, h)))
        {
            self.truncate_staged(&staged, size).await?;
            self.mark_changed(fh);
            return Ok(self.staged_attr(ino, &info, &staged));
        }
        let start = if size == 0 {
            Start::Empty { dirty: true }
        } else {
            Start::Based
        };
        let staged = self.stage(ino, &info, start).await?;
        self.truncate_staged(&staged, size).await?;
        let fh = self.insert_handle(Handle::Staged {
            ino,
            staged: staged.clone(),
            writable: true,
        });
        let attr = self.staged_attr(ino, &info, &staged);
        self.release(fh).await?;
        Ok(attr)
    }

    /// The live staged write of `ino`, without taking a reference.
    pub(super) fn staged_of(&self, ino: u64) -> Option<Arc<StagedWrite>> {
        self.state().staged.get(&ino).cloned()
    }

    /// A descriptor reading through the kernel's cache closed. After the last one of a
    /// version that changed meanwhile, the kernel's attributes and pages of it go (only
    /// its attributes, if only those changed). The invalidation is queued before the
    /// state is let go, so it reaches the kernel before the refresh of a next open that
    /// pins the file again.
    fn unpin(&self, ino: u64) {
        let mut st = self.state();
        let Some(p) = st.pinned.get_mut(&ino) else {
            return;
        };
        p.open = p.open.saturating_sub(1);
        if p.open > 0 {
            return;
        }
        let (stale, attrs_changed) = (p.stale, p.attrs_changed);
        st.pinned.remove(&ino);
        if stale {
            st.cached_version.remove(&ino);
            self.invalidate(super::Invalidation::Inode { ino });
        } else if attrs_changed {
            self.invalidate(super::Invalidation::Attr { ino });
        }
    }

    /// Checks a name for a new entry.
    pub(super) fn check_new_name(name: &str) -> FsResult<()> {
        if name.len() > sharefs_protocol::name::MAX_FILE_NAME {
            return Err(FsError::NameTooLong);
        }
        sharefs_protocol::name::check_file_name(name).map_err(FsError::InvalidName)
    }
}
