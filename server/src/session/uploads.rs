//! A session's uploads: begun (or resumed) with a slot of the per-user limit, fed by
//! chunks in arrival order by the reader loop itself (natural back-pressure: a client
//! cannot send faster than the disk takes it, and a sync, read or commit that follows its
//! chunks knows they are written), committed by a request task, discarded when aborted,
//! and let go for a resume (see `store::parts`) when idle past the bound or left behind
//! by the connection.

use std::time::{Duration, Instant};

use bytes::Bytes;
use sharefs_protocol::Reply;

use super::requests::{Context, Handled, ENTRY_REPLY, SMALL_REPLY};
use super::Session;
use crate::cutoff::Cutoff;
use crate::error::ServerError;
use crate::storage::{ContentWriter, UploadTarget};

/// How often uploads are checked for having gone without data for `bound`.
pub(super) fn idle_upload_sweep(bound: Duration) -> tokio::time::Interval {
    let period = (bound / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut sweep = tokio::time::interval(period);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep
}

/// An upload of this session: idle, or writing its last chunk on the blocking pool while
/// the reader goes on decrypting the next one.
pub(super) enum Upload {
    Idle(Box<dyn ContentWriter>),
    Writing(tokio::task::JoinHandle<Box<dyn ContentWriter>>),
}

impl Upload {
    /// The upload once its last write is done; `None` if that write task died.
    async fn settle(self) -> Option<Box<dyn ContentWriter>> {
        match self {
            Upload::Idle(up) => Some(up),
            Upload::Writing(task) => match task.await {
                Ok(up) => Some(up),
                Err(e) => {
                    tracing::error!(error = %e, "upload write task failed");
                    None
                }
            },
        }
    }
}

/// What an `upload_sync` or `upload_read` does, after the chunks sent before it.
pub(super) enum Step {
    Sync,
    Read { offset: u64, len: usize },
}

/// What an `upload_begin` asks for.
pub(super) struct Begin {
    pub owner: String,
    pub target: UploadTarget,
    pub size: Option<u64>,
    pub mode: Option<u32>,
}

impl Session {
    /// Drops the uploads that received nothing for the configured bound: each holds a temp
    /// file, a disk claim and a quota reservation, which a client must not keep by
    /// stalling.
    pub(super) fn drop_idle_uploads(&mut self) {
        let bound = self.shared.config.upload_idle_timeout;
        self.uploads.retain(|upload, (_, _, last)| {
            let keep = last.elapsed() < bound;
            if !keep {
                tracing::info!(
                    upload,
                    ?bound,
                    "upload received no data for too long; let go for a resume"
                );
            }
            keep
        });
    }

    pub(super) async fn chunk(&mut self, upload: u64, offset: u64, data: Bytes) {
        let Some((state, slot, _)) = self.uploads.remove(&upload) else {
            tracing::debug!(upload, "chunk for an unknown upload ignored");
            return;
        };
        // One write in flight per upload: chunks stay in order, and this one is written
        // while the next is read.
        let Some(mut up) = state.settle().await else {
            return;
        };
        let task = tokio::task::spawn_blocking(move || {
            up.write_chunk(offset, &data);
            up
        });
        self.uploads
            .insert(upload, (Upload::Writing(task), slot, Instant::now()));
    }

    pub(super) async fn begin_upload(&mut self, begin: Begin) -> Result<Reply, ServerError> {
        let ctx = self.context();
        ctx.own(&begin.owner)?;
        let slot = self
            .shared
            .upload_slot(&self.user)
            .ok_or(ServerError::Busy("uploads in progress for this user"))?;
        let up = ctx
            .blocking(move |shared| {
                let quota = shared.users.fresh(&begin.owner)?.and_then(|u| u.quota);
                shared
                    .store
                    .begin_upload(&begin.owner, begin.target, begin.size, begin.mode, quota)
            })
            .await?;
        let upload = up.id();
        self.uploads
            .insert(upload, (Upload::Idle(up), slot, Instant::now()));
        Ok(Reply::UploadStarted { upload, offset: 0 })
    }

    /// Takes up an upload of this user left by a lost connection or a restart.
    pub(super) async fn resume_upload(&mut self, upload: u64) -> Result<Reply, ServerError> {
        if self.uploads.contains_key(&upload) {
            return Err(ServerError::InUse(
                "the upload is attached to this connection",
            ));
        }
        let slot = self
            .shared
            .upload_slot(&self.user)
            .ok_or(ServerError::Busy("uploads in progress for this user"))?;
        let user = self.user.clone();
        let up = self
            .context()
            .blocking(move |shared| {
                let quota = shared.users.fresh(&user)?.and_then(|u| u.quota);
                shared.store.resume_upload(&user, upload, quota)
            })
            .await?;
        let offset = up.written();
        tracing::info!(upload, offset, "upload resumed");
        self.uploads
            .insert(upload, (Upload::Idle(up), slot, Instant::now()));
        Ok(Reply::UploadStarted { upload, offset })
    }

    /// Runs `step` on an upload once the chunks before it are written, answering request
    /// `id` from a task of its own (a sync waits for the disk).
    pub(super) async fn upload_step(&mut self, id: u64, upload: u64, step: Step, arrived: Instant) {
        let Some((state, slot, _)) = self.uploads.remove(&upload) else {
            self.reply(id, Err(not_here(upload))).await;
            return;
        };
        let Some(mut up) = state.settle().await else {
            let e = ServerError::Internal("upload write failed".into());
            self.reply(id, Err(e)).await;
            return;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (kind, room) = match step {
            Step::Sync => ("upload_sync", SMALL_REPLY),
            Step::Read { len, .. } => ("upload_read", len + SMALL_REPLY),
        };
        let task = tokio::task::spawn_blocking(move || {
            match step {
                // The flush runs beside the chunks that follow, not in their way.
                Step::Sync => match up.sync_point() {
                    Ok(flush) => {
                        tokio::task::spawn_blocking(move || {
                            let done = flush()
                                .map(|durable| (Reply::UploadDurable { durable }, Bytes::new()));
                            let _ = tx.send(done);
                        });
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                },
                Step::Read { offset, len } => {
                    let done = up
                        .read(offset, len)
                        .map(|data| (Reply::Data, Bytes::from(data)));
                    let _ = tx.send(done);
                }
            }
            up
        });
        self.uploads
            .insert(upload, (Upload::Writing(task), slot, Instant::now()));
        let metrics = self.shared.metrics.clone();
        self.spawn(id, room, async move {
            let done = rx
                .await
                .unwrap_or_else(|_| Err(ServerError::Internal("upload step failed".into())));
            metrics.request(kind, arrived.elapsed(), done.is_err());
            done
        })
        .await
    }

    /// Commits upload `upload` as request `id` (a task of its own: it fsyncs).
    pub(super) async fn commit_upload(
        &mut self,
        id: u64,
        upload: u64,
        size: u64,
        blake3: String,
        mtime_ns: Option<i64>,
        cutoff: Cutoff,
    ) {
        let Some((state, slot, _)) = self.uploads.remove(&upload) else {
            self.reply(id, Err(not_here(upload))).await;
            return;
        };
        let ctx = self.context();
        let arrived = Instant::now();
        self.spawn(id, ENTRY_REPLY, async move {
            // The upload counts against the user's limit until committed.
            let _slot = slot;
            let metrics = ctx.shared.metrics.clone();
            let committed = commit(ctx, state, size, blake3, mtime_ns, cutoff).await;
            metrics.request("upload_commit", arrived.elapsed(), committed.is_err());
            committed
        })
        .await
    }

    pub(super) async fn abort_upload(&mut self, id: u64, upload: u64) {
        if let Some((state, _, _)) = self.uploads.remove(&upload) {
            if let Some(mut up) = state.settle().await {
                up.abort();
            }
            tracing::info!(upload, "upload aborted");
        }
        self.reply(id, Ok(Reply::Ok)).await;
    }
}

/// The error for an upload this connection does not have.
fn not_here(upload: u64) -> ServerError {
    ServerError::NotFound(format!(
        "upload {upload} on this connection (never begun or resumed here, aborted, failed, \
         or let go after going without data)"
    ))
}

/// Settles an upload's last writes and commits it (the work of an `upload_commit`).
async fn commit(
    ctx: Context,
    state: Upload,
    size: u64,
    blake3: String,
    mtime_ns: Option<i64>,
    cutoff: Cutoff,
) -> Handled {
    let up = state
        .settle()
        .await
        .ok_or_else(|| ServerError::Internal("upload write failed".into()))?;
    let owner = ctx.user.clone();
    let (info, events) = ctx
        .blocking(move |shared| {
            shared
                .store
                .commit_upload(up, size, &blake3, mtime_ns, &cutoff)
        })
        .await?;
    tracing::info!(id = info.id, name = %info.name, size, "upload committed");
    ctx.publish(&owner, &events);
    Ok((Reply::File { file: info }, Bytes::new()))
}
