//! Streaming sequential writes to the server while they happen.
//!
//! A file written through the mount strictly sequentially from offset 0 — `cp`, `dd`, most
//! editors' saves, `fio`'s rewrite of an existing file — is sent to the server chunk by chunk as
//! the writes arrive, so `close()` only waits for the tail and the commit, instead of
//! uploading the whole file after the last write. The staged local copy is still written:
//! it remains the source of truth, and any deviation (a write elsewhere, a truncate, a
//! lost connection, a failed stream) drops the stream and falls back to uploading the
//! staged file whole at close. Only a stream that covers exactly the staged content from
//! byte 0 to its end is ever committed.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sharefs_protocol::{FileInfo, CHUNK_SIZE};
use tokio::sync::{mpsc, oneshot};

use super::error::FsError;
use super::remote::{Remote, UploadTarget};

pub enum StreamMsg {
    Data(Bytes),
    /// All data was sent: commit (with this modification time) and answer.
    Finish {
        mtime_ns: Option<i64>,
        reply: oneshot::Sender<Result<FileInfo, FsError>>,
    },
}

/// Where a staged file's stream stands.
#[derive(Default)]
pub enum StreamState {
    /// Not written yet: a first write at offset 0 starts a stream.
    Eligible,
    /// Written sequentially but less than a chunk so far: kept here, and streamed only if
    /// the file grows past a chunk (small files go up in one `put` at close instead).
    Pending { buf: BytesMut, next: u64 },
    /// Streaming; `next` is the offset the next sequential write must have.
    Active {
        tx: mpsc::Sender<StreamMsg>,
        next: u64,
    },
    /// Not streaming (never eligible, broken, or finished): upload whole at close.
    #[default]
    Off,
}

/// Messages buffered between the writer and the uploader (each up to one FUSE write).
pub const STREAM_QUEUE: usize = 2;

/// Receives the written data in order, uploads it in chunks, commits on `Finish`; aborts
/// the server-side upload if the sender goes away without finishing.
pub async fn run<R: Remote>(
    remote: Arc<R>,
    target: UploadTarget,
    mut rx: mpsc::Receiver<StreamMsg>,
) {
    let handle = remote.upload_begin(&target).await;
    let mut failed: Option<FsError> = handle.as_ref().err().map(|e| FsError::from(e.clone()));
    let mut hasher = blake3::Hasher::new();
    let mut buf = BytesMut::new();
    let mut sent = 0u64;
    while let Some(msg) = rx.recv().await {
        match msg {
            StreamMsg::Data(data) => {
                let Ok(h) = &handle else { continue };
                if failed.is_some() {
                    continue;
                }
                hasher.update(&data);
                // Chunks of exactly CHUNK_SIZE; whole-chunk pieces of a write (the kernel's
                // usual 1 MiB) go out without a copy.
                let chunk = CHUNK_SIZE as usize;
                let mut data = data;
                let mut out = Vec::new();
                if !buf.is_empty() {
                    let take = (chunk - buf.len()).min(data.len());
                    buf.extend_from_slice(&data[..take]);
                    data = data.slice(take..);
                    if buf.len() == chunk {
                        out.push(buf.split().freeze());
                    }
                }
                while data.len() >= chunk {
                    out.push(data.split_to(chunk));
                }
                buf.extend_from_slice(&data);
                for piece in out {
                    let len = piece.len() as u64;
                    match remote.upload_chunk(*h, sent, piece).await {
                        Ok(()) => sent += len,
                        Err(e) => {
                            failed = Some(e.into());
                            break;
                        }
                    }
                }
            }
            StreamMsg::Finish { mtime_ns, reply } => {
                let result = match (&handle, failed.take()) {
                    (_, Some(e)) => Err(e),
                    (Err(e), None) => Err(FsError::from(e.clone())),
                    (Ok(h), None) => {
                        let tail = buf.split().freeze();
                        let len = tail.len() as u64;
                        let tail_sent = if tail.is_empty() {
                            Ok(())
                        } else {
                            remote.upload_chunk(*h, sent, tail).await
                        };
                        match tail_sent {
                            Ok(()) => {
                                let hash = hasher.finalize().to_hex();
                                remote
                                    .upload_commit(*h, sent + len, hash.as_str(), mtime_ns)
                                    .await
                                    .map_err(FsError::from)
                            }
                            Err(e) => Err(e.into()),
                        }
                    }
                };
                if result.is_err() {
                    if let Ok(h) = &handle {
                        remote.upload_abort(*h).await;
                    }
                }
                let _ = reply.send(result);
                return;
            }
        }
    }
    if let Ok(h) = handle {
        remote.upload_abort(h).await;
    }
}
