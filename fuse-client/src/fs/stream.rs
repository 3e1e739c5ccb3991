//! Streaming sequential writes to the server while they happen.
//!
//! A file written through the mount strictly sequentially from offset 0 — `cp`, `dd`, most
//! editors' saves, `fio`'s rewrite of an existing file — is sent to the server chunk by
//! chunk as the writes arrive, so `close()` only waits for the tail and the commit. Its
//! bytes are not staged locally: the stream keeps only what the server has not yet made
//! durable, in memory ([`WINDOW`] per file, [`STREAM_BUDGET`] per mount), and asks for a
//! sync every [`SYNC_EVERY`] bytes to let go of what came before. When the connection
//! drops, or the server restarts, the stream takes its upload up again on the next
//! connection (`upload_resume`), sends again what the server did not keep, and goes on;
//! a commit whose answer was lost is confirmed by the file's content hash, and an upload
//! the server lost before it made any of it durable is begun again. Whatever the
//! writer does out of sequence (a write elsewhere, a read, a truncate into streamed
//! bytes, a close while the file is longer than the stream) first brings the streamed
//! bytes back into the staged file ([`StreamMsg::Recall`]); from there the staged file
//! is the source of truth and is uploaded whole at close.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sharefs_protocol::{FileInfo, CHUNK_SIZE};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::error::{FsError, FsResult};
use super::remote::{Remote, UploadTarget};
use crate::connection::RemoteHandle;
use crate::error::ClientError;

/// Bytes sent and not yet durable that one stream keeps for a resend.
pub const WINDOW: u64 = 32 << 20;
/// A stream asks the server for a sync every this many bytes.
pub const SYNC_EVERY: u64 = 8 << 20;
/// Bytes all streams of a mount keep together, in KiB permits.
pub const STREAM_BUDGET: u64 = 32 << 20;
/// Times a stream takes its upload up again before it gives up.
const RESUMES: u32 = 8;
/// A stream that received nothing for this long syncs what it holds.
const IDLE_SYNC: std::time::Duration = std::time::Duration::from_secs(1);
/// A stream that holds nothing unsynced syncs this often all the same, which keeps the
/// server from letting its upload go (its idle bound is 120 s by default).
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);

/// Writes the recalled bytes of a stream into the staged file, at an offset.
pub type Fill = Box<dyn FnMut(u64, &[u8]) -> FsResult<()> + Send>;

/// A stream that could not commit: why, and whether every byte it carried went back
/// into the staged file (true while the server had made none of them durable: the
/// stream still held them all).
#[derive(Debug)]
pub struct Unfinished {
    pub error: FsError,
    pub given_back: bool,
}

pub enum StreamMsg {
    Data(Bytes),
    /// All data was sent: commit (with this modification time) and answer. If that
    /// fails, what the stream still holds from byte 0 on goes back to the staged file,
    /// and the error says whether that was everything.
    Finish {
        mtime_ns: Option<i64>,
        reply: oneshot::Sender<Result<FileInfo, Unfinished>>,
    },
    /// Give every byte streamed so far back to the staged file, then abort the upload.
    Recall {
        reply: oneshot::Sender<FsResult<()>>,
    },
}

/// Where a staged file's stream stands.
#[derive(Default)]
pub enum StreamState {
    /// Not written yet: a first write at offset 0 starts a stream.
    Eligible,
    /// Written sequentially but less than a chunk so far: kept here (and staged), and
    /// streamed only if the file grows past a chunk (small files go up in one `put` at
    /// close instead).
    Pending { buf: BytesMut, next: u64 },
    /// Streaming; `next` is the offset the next sequential write must have. The staged
    /// file does not hold bytes `0..next`: the stream does.
    Active {
        tx: mpsc::Sender<StreamMsg>,
        next: u64,
    },
    /// Not streaming (never eligible, recalled, or finished): upload whole at close.
    #[default]
    Off,
}

/// Messages buffered between the writer and the uploader (each up to one FUSE write).
pub const STREAM_QUEUE: usize = 2;

/// Whether a failure is the connection's (the upload may be resumed) rather than the
/// server's answer.
fn lost(e: &ClientError) -> bool {
    e.is_connection_error()
}

/// Whether a failure of a sync or commit means the upload may be taken up again: its
/// connection was lost, or the server let it go (it went without data for the server's
/// idle bound: a writer that paused) and keeps it for a resume.
fn resumable(e: &ClientError) -> bool {
    lost(e) || not_found(e)
}

/// Whether the server answered that it has no such upload (any more).
fn not_found(e: &ClientError) -> bool {
    e.code() == Some(sharefs_protocol::ErrorCode::NotFound)
}

/// The answer of the sync in flight; never, without one.
async fn sync_done(
    sync: &mut Option<JoinHandle<Result<u64, ClientError>>>,
) -> Result<u64, ClientError> {
    match sync {
        Some(task) => task
            .await
            .unwrap_or_else(|e| Err(ClientError::Io(format!("sync task: {e}")))),
        None => std::future::pending().await,
    }
}

/// What the stream's loop wakes up for.
enum Next {
    Msg(Option<StreamMsg>),
    Synced(Result<u64, ClientError>),
}

/// One chunk sent and not yet durable, with its share of the mount's budget.
struct Unsynced {
    offset: u64,
    data: Bytes,
    _permit: Option<OwnedSemaphorePermit>,
}

struct Uploader<R: Remote> {
    remote: Arc<R>,
    target: UploadTarget,
    handle: RemoteHandle,
    budget: Arc<Semaphore>,
    hasher: blake3::Hasher,
    /// The unsent end of the data: less than a chunk.
    buf: BytesMut,
    /// Bytes handed to the server.
    sent: u64,
    /// Bytes the server said are durable.
    durable: u64,
    window: VecDeque<Unsynced>,
    /// Where the last sync was asked for, and the sync in flight.
    asked: u64,
    sync: Option<JoinHandle<Result<u64, ClientError>>>,
}

/// Receives the written data in order, uploads it in chunks, commits on `Finish`; aborts
/// the server-side upload if the sender goes away without finishing.
pub async fn run<R: Remote>(
    remote: Arc<R>,
    target: UploadTarget,
    budget: Arc<Semaphore>,
    fill: Fill,
    mut rx: mpsc::Receiver<StreamMsg>,
) {
    let begun = remote.upload_begin(&target).await;
    let mut up = match begun {
        Ok(handle) => Uploader {
            remote,
            target,
            handle,
            budget,
            hasher: blake3::Hasher::new(),
            buf: BytesMut::new(),
            sent: 0,
            durable: 0,
            window: VecDeque::new(),
            asked: 0,
            sync: None,
        },
        Err(e) => return hold(FsError::from(e), fill, rx).await,
    };
    let mut fill = fill;
    let mut failed: Option<FsError> = None;
    // Bytes given to the stream after it failed: gone, so nothing can be handed back
    // whole.
    let mut dropped = false;
    loop {
        // An idle stream still syncs: what it holds is let go of (for other streams'
        // memory), and the server keeps its upload attached past its idle bound.
        let idle = if up.window.is_empty() {
            KEEPALIVE
        } else {
            IDLE_SYNC
        };
        let next = tokio::select! {
            msg = rx.recv() => Next::Msg(msg),
            done = sync_done(&mut up.sync) => Next::Synced(done),
            () = tokio::time::sleep(idle), if up.sync.is_none() && failed.is_none() => {
                up.ask_sync();
                continue;
            }
        };
        let msg = match next {
            Next::Msg(msg) => msg,
            Next::Synced(done) => {
                up.sync = None;
                if failed.is_none() {
                    if let Err(e) = up.synced(done).await {
                        failed = Some(e);
                    }
                }
                continue;
            }
        };
        match msg {
            None => break,
            Some(StreamMsg::Data(data)) => {
                if failed.is_none() {
                    if let Err(e) = up.data(data).await {
                        // Part of this write may not have gone out.
                        dropped = true;
                        failed = Some(e);
                    }
                } else {
                    dropped = true;
                }
            }
            Some(StreamMsg::Finish { mtime_ns, reply }) => {
                let result = match failed.take() {
                    Some(e) => Err(e),
                    None => up.finish(mtime_ns).await,
                };
                let result = match result {
                    Ok(info) => Ok(info),
                    Err(error) => {
                        up.abort().await;
                        let given_back = !dropped && up.give_back(&mut fill);
                        Err(Unfinished { error, given_back })
                    }
                };
                let _ = reply.send(result);
                return;
            }
            Some(StreamMsg::Recall { reply }) => {
                let result = match failed.take() {
                    Some(e) => Err(e),
                    None => up.recall(&mut fill).await,
                };
                up.abort().await;
                let _ = reply.send(result);
                return;
            }
        }
    }
    up.abort().await;
}

/// A stream whose upload could not begin: hands what it is given straight to the staged
/// file (as if it had never streamed), and answers with the error.
async fn hold(error: FsError, mut fill: Fill, mut rx: mpsc::Receiver<StreamMsg>) {
    let mut pos = 0u64;
    let mut whole = true;
    while let Some(msg) = rx.recv().await {
        match msg {
            StreamMsg::Data(data) => {
                whole = whole && fill(pos, &data).is_ok();
                pos += data.len() as u64;
            }
            StreamMsg::Finish { reply, .. } => {
                let _ = reply.send(Err(Unfinished {
                    error,
                    given_back: whole,
                }));
                return;
            }
            StreamMsg::Recall { reply } => {
                let _ = reply.send(match whole {
                    true => Ok(()),
                    false => Err(error),
                });
                return;
            }
        }
    }
}

impl<R: Remote> Uploader<R> {
    /// Hashes and sends written bytes, in chunks of exactly [`CHUNK_SIZE`]; whole-chunk
    /// pieces of a write (the kernel's usual 1 MiB) go out without a copy.
    async fn data(&mut self, data: Bytes) -> FsResult<()> {
        self.hasher.update(&data);
        let chunk = CHUNK_SIZE as usize;
        let mut data = data;
        if !self.buf.is_empty() {
            let take = (chunk - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = data.slice(take..);
            if self.buf.len() == chunk {
                let piece = self.buf.split().freeze();
                self.send(piece).await?;
            }
        }
        while data.len() >= chunk {
            let piece = data.split_to(chunk);
            self.send(piece).await?;
        }
        self.buf.extend_from_slice(&data);
        Ok(())
    }

    /// Sends one chunk, keeping it until the server makes it durable.
    async fn send(&mut self, data: Bytes) -> FsResult<()> {
        let len = data.len() as u64;
        let kib = len.div_ceil(1024).min(u64::from(u32::MAX)) as u32;
        let permit = loop {
            match self.budget.clone().try_acquire_many_owned(kib) {
                Ok(p) => break Some(p),
                Err(tokio::sync::TryAcquireError::Closed) => break None,
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    // Other streams hold the budget: let go of what this one can, and
                    // wait for theirs to go.
                    if !self.window.is_empty() {
                        self.wait_sync().await?;
                        continue;
                    }
                    match self.budget.clone().acquire_many_owned(kib).await {
                        Ok(p) => break Some(p),
                        Err(_) => break None,
                    }
                }
            }
        };
        let offset = self.sent;
        if let Err(e) = self
            .remote
            .upload_chunk(self.handle, offset, data.clone())
            .await
        {
            if !lost(&e) {
                return Err(e.into());
            }
            // Kept with the rest, and sent again on the next connection.
            self.window.push_back(Unsynced {
                offset,
                data,
                _permit: permit,
            });
            self.sent += len;
            return self.resume(e, false).await;
        }
        self.window.push_back(Unsynced {
            offset,
            data,
            _permit: permit,
        });
        self.sent += len;
        if self.sync.is_none() && self.sent - self.asked >= SYNC_EVERY {
            self.ask_sync();
        }
        if self.sent - self.durable > WINDOW {
            self.wait_sync().await?;
        }
        Ok(())
    }

    fn ask_sync(&mut self) {
        let (remote, handle) = (self.remote.clone(), self.handle);
        self.asked = self.sent;
        self.sync = Some(tokio::spawn(
            async move { remote.upload_sync(handle).await },
        ));
    }

    /// Waits for a sync of everything sent so far (asking for one if none is in flight).
    async fn wait_sync(&mut self) -> FsResult<()> {
        if self.sync.is_none() {
            self.ask_sync();
        }
        let Some(task) = self.sync.take() else {
            return Ok(());
        };
        let mut task = Some(task);
        let done = sync_done(&mut task).await;
        self.synced(done).await
    }

    /// The answer to a sync: lets go of the bytes now durable.
    async fn synced(&mut self, done: Result<u64, ClientError>) -> FsResult<()> {
        match done {
            Ok(durable) => {
                self.release(durable);
                Ok(())
            }
            Err(e) if resumable(&e) => self.resume(e, false).await,
            Err(e) => Err(e.into()),
        }
    }

    /// Drops the kept chunks that end at or before `durable`.
    fn release(&mut self, durable: u64) {
        self.durable = self.durable.max(durable.min(self.sent));
        while let Some(front) = self.window.front() {
            if front.offset + front.data.len() as u64 > self.durable {
                break;
            }
            self.window.pop_front();
        }
    }

    /// Whether the stream still holds every byte it sent: the server made none durable.
    fn holds_all(&self) -> bool {
        self.window
            .front()
            .map_or(self.sent == 0, |c| c.offset == 0)
    }

    /// Takes the upload up again after its connection was lost, and sends again what the
    /// server did not keep. An upload the server no longer has (it died before making
    /// any of it durable) is begun again, as long as the stream holds all of it; but
    /// not `after_commit`: then the commit may have made it.
    async fn resume(&mut self, mut cause: ClientError, after_commit: bool) -> FsResult<()> {
        for _ in 0..RESUMES {
            tracing::info!(upload = self.handle.id, error = %cause, "upload's connection lost; resuming");
            // A sync in flight went with the connection.
            if let Some(task) = self.sync.take() {
                task.abort();
            }
            let resumed = match self.remote.upload_resume(self.handle).await {
                Err(e) if !after_commit && not_found(&e) && self.holds_all() => {
                    tracing::info!(
                        upload = self.handle.id,
                        "the server lost the upload; beginning it again"
                    );
                    self.remote
                        .upload_begin(&self.target)
                        .await
                        .map(|handle| (handle, 0))
                }
                other => other,
            };
            let (handle, offset) = match resumed {
                Ok(r) => r,
                Err(e) if lost(&e) => {
                    cause = e;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            self.handle = handle;
            let kept_from = self.window.front().map_or(self.sent, |c| c.offset);
            if offset < kept_from || offset > self.sent {
                return Err(FsError::Io(format!(
                    "the server resumed the upload at byte {offset}, but this mount kept \
                     bytes {kept_from}..{} of it",
                    self.sent
                )));
            }
            // What the server has is let go of at its next sync, not before: after a
            // restart of its machine it may hold less than it says now.
            match self.resend(offset).await {
                Ok(()) => {
                    tracing::info!(upload = handle.id, offset, "upload resumed");
                    return Ok(());
                }
                Err(e) if lost(&e) => cause = e,
                Err(e) => return Err(e.into()),
            }
        }
        Err(FsError::from(cause))
    }

    /// Sends the kept chunks again from `offset` on.
    async fn resend(&self, offset: u64) -> Result<(), ClientError> {
        for chunk in &self.window {
            let end = chunk.offset + chunk.data.len() as u64;
            if end <= offset {
                continue;
            }
            let skip = offset.saturating_sub(chunk.offset) as usize;
            self.remote
                .upload_chunk(
                    self.handle,
                    chunk.offset + skip as u64,
                    chunk.data.slice(skip..),
                )
                .await?;
        }
        Ok(())
    }

    /// Sends the tail and commits; a commit whose answer the connection lost is taken up
    /// again, or found done by the file's content hash.
    async fn finish(&mut self, mtime_ns: Option<i64>) -> Result<FileInfo, FsError> {
        if !self.buf.is_empty() {
            let tail = self.buf.split().freeze();
            self.send(tail).await?;
        }
        let hash = self.hasher.finalize().to_hex();
        for _ in 0..RESUMES {
            let committed = self
                .remote
                .upload_commit(self.handle, self.sent, hash.as_str(), mtime_ns)
                .await;
            let cause = match committed {
                Ok(info) => return Ok(info),
                Err(e) if resumable(&e) => e,
                Err(e) => return Err(e.into()),
            };
            match self.resume(cause, true).await {
                Ok(()) => continue,
                Err(FsError::NotFound) => {}
                Err(e) => return Err(e),
            }
            if let Some(info) = self.committed_meanwhile(hash.as_str()).await? {
                return Ok(info);
            }
            if !self.holds_all() {
                return Err(FsError::Io(format!(
                    "{}: the upload was lost with the connection before its commit",
                    self.target.name
                )));
            }
            // The server lost the upload before it made any of it durable: begin again.
            let gone = ClientError::Io("the server no longer has the upload".into());
            self.resume(gone, false).await?;
        }
        Err(FsError::Io(
            "upload commit: connection lost too often".into(),
        ))
    }

    /// After a commit's answer was lost and the server no longer has the upload: whether
    /// the commit made it (the file holds exactly this content), and the file if so.
    async fn committed_meanwhile(&self, hash: &str) -> FsResult<Option<FileInfo>> {
        let owner = self.remote.user().to_string();
        let gone = |e: ClientError| {
            FsError::Io(format!(
                "{}: the upload's connection was lost during its commit, and the file \
                 cannot be checked: {e}",
                self.target.name
            ))
        };
        let info = match self.target.replace {
            Some(id) => self.remote.stat(&owner, id).await,
            None => {
                self.remote
                    .lookup(&owner, self.target.parent, &self.target.name)
                    .await
            }
        }
        .map_err(gone)?;
        let (version, size, blake3) = self.remote.content_hash(info.id).await.map_err(gone)?;
        if size == self.sent && blake3.eq_ignore_ascii_case(hash) {
            tracing::info!(file = %info.name, version, "upload commit's answer was lost; the commit made it");
            return Ok(Some(info));
        }
        Ok(None)
    }

    /// Hands every byte streamed so far to `fill`, read back from the server.
    async fn recall(&mut self, fill: &mut Fill) -> FsResult<()> {
        if !self.buf.is_empty() {
            let tail = self.buf.split().freeze();
            self.send(tail).await?;
        }
        let mut pos = 0u64;
        let mut resumes = 0;
        while pos < self.sent {
            let want = (self.sent - pos).min(u64::from(CHUNK_SIZE)) as u32;
            let data = match self.remote.upload_read(self.handle, pos, want).await {
                Ok(data) => data,
                Err(e) if resumable(&e) && resumes < RESUMES => {
                    resumes += 1;
                    self.resume(e, false).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if data.is_empty() {
                return Err(FsError::Io(format!(
                    "the server holds {pos} of the {} bytes streamed",
                    self.sent
                )));
            }
            fill(pos, &data)?;
            pos += data.len() as u64;
        }
        Ok(())
    }

    /// Hands what the stream holds to `fill` if that is every byte from 0 on (nothing
    /// durable yet, so nothing let go); true if so.
    fn give_back(&mut self, fill: &mut Fill) -> bool {
        if self.window.front().map_or(self.sent, |c| c.offset) != 0 {
            return false;
        }
        for chunk in &self.window {
            if fill(chunk.offset, &chunk.data).is_err() {
                return false;
            }
        }
        self.buf.is_empty() || fill(self.sent, &self.buf).is_ok()
    }

    async fn abort(&mut self) {
        if let Some(task) = self.sync.take() {
            task.abort();
        }
        self.remote.upload_abort(self.handle).await;
    }
}
