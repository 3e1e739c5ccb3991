//! Reading remote files: ranged reads with sequential prefetch.
//!
//! A handle splits the file into 1 MiB blocks. While reads stay sequential, it keeps a
//! window of blocks ahead in flight (fetched by spawned tasks, so they progress while the
//! kernel is busy elsewhere) and doubles the window up to [`MAX_WINDOW`]. A read that
//! jumps elsewhere fetches exactly the bytes asked for and resets the window. Blocks behind
//! the reader are dropped; prefetched blocks hold permits of a budget shared by all
//! handles, so memory stays bounded however many files are open.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use sharefs_protocol::FileInfo;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::{FsError, FsResult};
use super::remote::Remote;
use crate::connection::{current_operation, in_operation, RemoteHandle};
use crate::error::ClientError;

pub const BLOCK: u64 = 1 << 20;
/// Blocks a single handle keeps in flight ahead of a sequential reader.
pub const MAX_WINDOW: u64 = 8;

type BlockFuture = Shared<BoxFuture<'static, FsResult<Bytes>>>;

struct Block {
    data: BlockFuture,
    /// Prefetch budget; `None` for blocks a read is waiting on right now.
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(Default)]
struct Prefetch {
    /// Where the next sequential read would start.
    next_offset: u64,
    window: u64,
    blocks: BTreeMap<u64, Block>,
}

/// An open remote file, pinned to the version current at open.
pub struct ReadHandle<R: Remote> {
    remote: Arc<R>,
    pub info: FileInfo,
    handle: Mutex<RemoteHandle>,
    /// The start of the file, as it came with the open.
    head: Bytes,
    prefetch: Mutex<Prefetch>,
    budget: Arc<Semaphore>,
    /// The last fetch that failed for want of the server, and when. The kernel answers a
    /// failed readahead by reading the same pages again at once, each a new operation that
    /// would wait a whole timeout again; within [`FAILURE_ECHO`] it gets the same answer.
    failed: Mutex<Option<(std::time::Instant, FsError)>>,
}

/// How long a fetch that failed for want of the server answers the fetches after it.
const FAILURE_ECHO: std::time::Duration = std::time::Duration::from_secs(1);

impl<R: Remote> ReadHandle<R> {
    pub fn new(
        remote: Arc<R>,
        handle: RemoteHandle,
        info: FileInfo,
        head: Bytes,
        budget: Arc<Semaphore>,
    ) -> Self {
        ReadHandle {
            remote,
            info,
            head,
            handle: Mutex::new(handle),
            prefetch: Mutex::new(Prefetch::default()),
            budget,
            failed: Mutex::new(None),
        }
    }

    fn current_handle(&self) -> RemoteHandle {
        match self.handle.lock() {
            Ok(h) => *h,
            Err(p) => *p.into_inner(),
        }
    }

    /// Reads `len` bytes at `offset` from the server, reopening the file (at the same
    /// version) if the connection was replaced since it was opened.
    async fn fetch(self: Arc<Self>, offset: u64, len: u32) -> FsResult<Bytes> {
        if let Ok(failed) = self.failed.lock() {
            if let Some((at, e)) = failed
                .as_ref()
                .filter(|(at, _)| at.elapsed() < FAILURE_ECHO)
            {
                tracing::debug!(ago = ?at.elapsed(), "read fails as the one just before it did");
                return Err(e.clone());
            }
        }
        let mut reopened = 0;
        loop {
            let handle = self.current_handle();
            match self.remote.read(handle, offset, len).await {
                Ok(data) => return Ok(data),
                Err(ClientError::Disconnected(_)) if reopened < 3 => {
                    reopened += 1;
                    self.reopen(handle).await?;
                }
                Err(e) => {
                    let no_server = e.is_connection_error();
                    let e = FsError::from(e);
                    if no_server {
                        if let Ok(mut failed) = self.failed.lock() {
                            *failed = Some((std::time::Instant::now(), e.clone()));
                        }
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn reopen(&self, failed: RemoteHandle) -> FsResult<()> {
        if self.current_handle() != failed {
            return Ok(()); // another fetch reopened it already
        }
        let (handle, info, _) = self.remote.open(&self.info.owner, self.info.id, 0).await?;
        if info.version != self.info.version {
            self.remote.close(handle).await;
            tracing::warn!(owner = %self.info.owner, name = %self.info.name, "file changed while open; failing reads");
            return Err(FsError::Stale);
        }
        if let Ok(mut h) = self.handle.lock() {
            *h = handle;
        }
        Ok(())
    }

    /// Starts fetching block `index`. A block a read waits for works under that read's
    /// deadline (`awaited`); one fetched ahead has a timeout of its own.
    fn spawn_block(self: &Arc<Self>, index: u64, awaited: bool) -> BlockFuture {
        let offset = index * BLOCK;
        let len = BLOCK.min(self.info.size.saturating_sub(offset)) as u32;
        let this = self.clone();
        let deadline = awaited.then(current_operation).flatten();
        let task = tokio::spawn(in_operation(deadline, async move {
            this.fetch(offset, len).await
        }));
        async move {
            match task.await {
                Ok(r) => r,
                Err(e) => Err(FsError::Io(format!("read task failed: {e}"))),
            }
        }
        .boxed()
        .shared()
    }

    /// Reads up to `size` bytes at `offset`; short only at end of file.
    pub async fn read(self: &Arc<Self>, offset: u64, size: u32) -> FsResult<Bytes> {
        let file_size = self.info.size;
        if offset >= file_size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = file_size.min(offset + size as u64);
        if end <= self.head.len() as u64 {
            if let Ok(mut p) = self.prefetch.lock() {
                p.next_offset = end;
            }
            return Ok(self.head.slice(offset as usize..end as usize));
        }
        let wanted: Vec<(u64, BlockFuture)> = {
            let mut p = self
                .prefetch
                .lock()
                .map_err(|_| FsError::Io("read state poisoned".into()))?;
            let sequential = offset == p.next_offset;
            p.next_offset = end;
            if !sequential {
                p.window = 0;
                p.blocks.clear();
                None
            } else {
                p.window = (p.window * 2).clamp(1, MAX_WINDOW);
                let first = offset / BLOCK;
                let last = (end - 1) / BLOCK;
                let last_block = (file_size - 1) / BLOCK;
                // Drop what the reader has passed.
                p.blocks = p.blocks.split_off(&first);
                let mut wanted = Vec::new();
                for index in first..=last {
                    let block = match p.blocks.get(&index) {
                        Some(b) => b.data.clone(),
                        None => {
                            let data = self.spawn_block(index, true);
                            p.blocks.insert(
                                index,
                                Block {
                                    data: data.clone(),
                                    _permit: None,
                                },
                            );
                            data
                        }
                    };
                    wanted.push((index, block));
                }
                for index in last + 1..=(last + p.window).min(last_block) {
                    if p.blocks.contains_key(&index) {
                        continue;
                    }
                    let Ok(permit) = self.budget.clone().try_acquire_owned() else {
                        break; // over the global budget: read on demand only
                    };
                    let data = self.spawn_block(index, false);
                    p.blocks.insert(
                        index,
                        Block {
                            data,
                            _permit: Some(permit),
                        },
                    );
                }
                Some(wanted)
            }
        }
        .unwrap_or_default();

        if wanted.is_empty() {
            // Random access: exactly the bytes asked for, in one piece when they fit one.
            if end - offset <= BLOCK {
                return self.clone().fetch(offset, (end - offset) as u32).await;
            }
            let mut out = BytesMut::with_capacity((end - offset) as usize);
            let mut pos = offset;
            while pos < end {
                let len = (end - pos).min(BLOCK) as u32;
                let data = self.clone().fetch(pos, len).await?;
                if data.is_empty() {
                    break;
                }
                pos += data.len() as u64;
                out.extend_from_slice(&data);
            }
            return Ok(out.freeze());
        }
        if let [(index, block)] = wanted.as_slice() {
            // Common case: one block; slice it without copying.
            let data = block.clone().await?;
            let start = (offset - index * BLOCK) as usize;
            let stop = ((end - index * BLOCK) as usize).min(data.len());
            return Ok(if start >= stop {
                Bytes::new()
            } else {
                data.slice(start..stop)
            });
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (index, block) in wanted {
            let data = block.await?;
            let base = index * BLOCK;
            let start = offset.saturating_sub(base) as usize;
            let stop = ((end - base) as usize).min(data.len());
            if start < stop {
                out.extend_from_slice(&data[start..stop]);
            }
        }
        Ok(out.freeze())
    }

    pub async fn close(&self) {
        self.remote.close(self.current_handle()).await;
    }
}
