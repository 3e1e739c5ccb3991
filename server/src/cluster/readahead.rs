//! Read-ahead for a read handle on a content in the object store. A reader whose reads
//! follow each other (each starts where an earlier one ended) has the next [`AHEAD`]
//! blocks fetched whole in the background, one GET each. Other reads go straight to
//! ranged GETs and fetch nothing ahead.
//!
//! A mount already keeps several ranged reads of a sequential reader in flight, which
//! the node turns into as many ranged GETs at once; that hides a near store's latency,
//! and fetching ahead on top of it costs more than it brings. A store tens of ms away is
//! where it pays (measured in BENCHMARKS.md), so it is off unless `--s3-read-ahead`
//! gives it a budget.
//!
//! The blocks fetched ahead are bounded node-wide by a byte budget ([`Budget`]): a
//! block is fetched ahead only if its bytes fit, and gives them back when the reader
//! moves past it or closes. With the budget spent, readers read as if there were no
//! read-ahead; nothing waits for it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::objects::{blocks_of, Objects, BLOCK};
use crate::error::{Result, ServerError};

/// Blocks fetched ahead of a sequential reader.
pub const AHEAD: u64 = 2;

/// How many recent read ends a reader remembers: requests of one stream that are served
/// in parallel may arrive a little out of order.
const ENDS: usize = 4;

/// The node-wide budget for blocks fetched ahead, in KiB.
#[derive(Debug, Clone)]
pub struct Budget(Arc<Semaphore>);

impl Budget {
    pub fn new(bytes: u64) -> Budget {
        let kib = usize::try_from(bytes / 1024)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Budget(Arc::new(Semaphore::new(kib)))
    }

    /// The bytes not taken now.
    #[cfg(test)]
    pub fn available(&self) -> u64 {
        self.0.available_permits() as u64 * 1024
    }

    fn try_take(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let kib = u32::try_from(bytes.div_ceil(1024)).ok()?;
        self.0.clone().try_acquire_many_owned(kib).ok()
    }
}

type Fetched = Shared<BoxFuture<'static, std::result::Result<Bytes, Arc<str>>>>;

/// One block being fetched, or fetched, with the budget it holds. The fetch holds the
/// budget too, until it ends: a block dropped while reads still wait on it (requests
/// served out of order) keeps its bytes counted while they come in.
struct Ahead {
    data: Fetched,
    _held: Arc<OwnedSemaphorePermit>,
}

#[derive(Default)]
struct State {
    /// The ends of the latest reads, newest first.
    ends: [u64; ENDS],
    blocks: BTreeMap<u64, Ahead>,
}

/// The read-ahead of one read handle.
pub struct ReadAhead {
    objects: Objects,
    content: u64,
    size: u64,
    budget: Budget,
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("content", &self.content)
            .field("size", &self.size)
            .field("blocks", &self.blocks())
            .finish_non_exhaustive()
    }
}

impl ReadAhead {
    pub fn new(
        objects: Objects,
        content: u64,
        size: u64,
        budget: Budget,
        runtime: tokio::runtime::Handle,
    ) -> ReadAhead {
        ReadAhead {
            objects,
            content,
            size,
            budget,
            runtime,
            state: Mutex::default(),
        }
    }

    /// The blocks fetched or being fetched ahead.
    pub fn blocks(&self) -> Vec<u64> {
        self.state
            .lock()
            .map(|s| s.blocks.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Up to `len` bytes at `offset` (fewer at the end).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let end = self.size.min(offset.saturating_add(len as u64));
        if offset >= end {
            return Ok(Bytes::new());
        }
        if let Some(fetches) = self.plan(offset, end) {
            match join(fetches, offset, end).await {
                Ok(data) => return Ok(data),
                Err(e) => {
                    tracing::debug!(content = self.content, error = %e, "read-ahead failed");
                    self.forget(offset, end);
                }
            }
        }
        self.objects
            .read(self.content, self.size, offset, len)
            .await
    }

    /// Like `read`, but only if the bytes are here already.
    pub fn read_ready(&self, offset: u64, len: usize) -> Option<Bytes> {
        let end = self.size.min(offset.saturating_add(len as u64));
        if offset >= end {
            return Some(Bytes::new());
        }
        let ready: Vec<(u64, Bytes)> = {
            let state = self.state.lock().ok()?;
            (offset / BLOCK..=(end - 1) / BLOCK)
                .map(|n| {
                    let bytes = state.blocks.get(&n)?.data.peek()?.as_ref().ok()?.clone();
                    Some((n, bytes))
                })
                .collect::<Option<_>>()?
        };
        // A read served from here counts as a read: it moves the window on.
        self.plan(offset, end);
        Some(slice(&ready, offset, end))
    }

    /// Records a read of `offset..end`; if the reader is sequential, starts fetching the
    /// blocks ahead of it, and returns the fetches that hold the whole range if it has
    /// them.
    fn plan(&self, offset: u64, end: u64) -> Option<Vec<(u64, Fetched)>> {
        let mut state = self.state.lock().ok()?;
        let sequential = offset > 0 && state.ends.contains(&offset);
        state.ends.rotate_right(1);
        state.ends[0] = end;
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let held = (first..=last).all(|n| state.blocks.contains_key(&n));
        if !sequential && !held {
            // Not necessarily a jump: the requests of a stream served in parallel come a
            // little out of order. What was fetched stays until the reader moves past
            // it or closes.
            return None;
        }
        // Blocks behind the reader give their budget back.
        state.blocks = state.blocks.split_off(&first);
        let blocks = blocks_of(self.size);
        for n in last + 1..(last + 1 + AHEAD).min(blocks) {
            if state.blocks.contains_key(&n) {
                continue;
            }
            let bytes = (self.size - n * BLOCK).min(BLOCK);
            let Some(held) = self.budget.try_take(bytes) else {
                break;
            };
            let held = Arc::new(held);
            let (objects, content, size) = (self.objects.clone(), self.content, self.size);
            let hold = held.clone();
            let task = self.runtime.spawn(async move {
                let _hold = hold;
                objects
                    .read(content, size, n * BLOCK, bytes as usize)
                    .await
                    .map_err(|e| Arc::<str>::from(e.to_string()))
            });
            let data = async move {
                task.await
                    .map_err(|e| Arc::<str>::from(format!("read-ahead task: {e}")))?
            }
            .boxed()
            .shared();
            state.blocks.insert(n, Ahead { data, _held: held });
        }
        if !held {
            return None;
        }
        Some(
            (first..=last)
                .filter_map(|n| Some((n, state.blocks.get(&n)?.data.clone())))
                .collect(),
        )
    }

    /// Drops the blocks of a range whose fetch failed, so they are fetched again.
    fn forget(&self, offset: u64, end: u64) {
        if let Ok(mut state) = self.state.lock() {
            for n in offset / BLOCK..=(end - 1) / BLOCK {
                state.blocks.remove(&n);
            }
        }
    }
}

/// The bytes `offset..end` from the blocks that hold them, copied: a reply must not
/// keep a whole block alive (its bytes are counted as the reply's length only).
async fn join(fetches: Vec<(u64, Fetched)>, offset: u64, end: u64) -> Result<Bytes> {
    let mut blocks = Vec::with_capacity(fetches.len());
    for (n, fetch) in fetches {
        let bytes = fetch
            .await
            .map_err(|e| ServerError::Backend(e.to_string()))?;
        blocks.push((n, bytes));
    }
    Ok(slice(&blocks, offset, end))
}

fn slice(blocks: &[(u64, Bytes)], offset: u64, end: u64) -> Bytes {
    let mut out = BytesMut::with_capacity((end - offset) as usize);
    for (n, bytes) in blocks {
        let base = n * BLOCK;
        let from = (offset.max(base) - base) as usize;
        let to = ((end.min(base + BLOCK) - base) as usize).min(bytes.len());
        out.extend_from_slice(&bytes[from.min(to)..to]);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    async fn reader(size: usize, budget: &Budget) -> (ReadAhead, Vec<u8>) {
        let objects = Objects::new(Arc::new(InMemory::new()));
        let data = pattern(size);
        objects.put_all(7, Bytes::from(data.clone())).await.unwrap();
        let ahead = ReadAhead::new(
            objects,
            7,
            size as u64,
            budget.clone(),
            tokio::runtime::Handle::current(),
        );
        (ahead, data)
    }

    #[tokio::test]
    async fn a_sequential_reader_has_the_next_blocks_fetched_and_reads_them() {
        let budget = Budget::new(64 << 20);
        let size = 5 * BLOCK as usize + 123;
        let (ahead, data) = reader(size, &budget).await;
        let chunk = 1 << 20;
        let mut at = 0;
        // The first read is not known to be sequential: nothing ahead.
        let got = ahead.read(0, chunk).await.unwrap();
        assert_eq!(&got[..], &data[..chunk]);
        assert!(ahead.blocks().is_empty());
        at += chunk;
        // The second follows it: the next two blocks are fetched.
        let got = ahead.read(at as u64, chunk).await.unwrap();
        assert_eq!(&got[..], &data[at..at + chunk]);
        assert_eq!(ahead.blocks(), vec![1, 2]);
        at += chunk;
        // Reads across a block boundary and to the end come out whole.
        let odd = chunk + 4096 + 17;
        while at < size {
            let got = ahead.read(at as u64, odd).await.unwrap();
            let stop = (at + odd).min(size);
            assert_eq!(&got[..], &data[at..stop], "at {at}");
            at = stop;
        }
        // Only the blocks of the last read stay held (it began in block 4), and the
        // budget is back when the reader goes.
        assert_eq!(ahead.blocks(), vec![4, 5]);
        drop(ahead);
        assert_eq!(budget.available(), 64 << 20);
    }

    #[tokio::test]
    async fn ready_blocks_are_read_without_waiting() {
        let budget = Budget::new(64 << 20);
        let size = 3 * BLOCK as usize;
        let (ahead, data) = reader(size, &budget).await;
        ahead.read(0, 4096).await.unwrap();
        ahead.read(4096, 4096).await.unwrap();
        // Wait for block 1 through a read, then it is there without waiting.
        let at = BLOCK as usize;
        assert_eq!(
            &ahead.read(at as u64, 10).await.unwrap()[..],
            &data[at..at + 10]
        );
        let got = ahead.read_ready(at as u64 + 10, 5000).unwrap();
        assert_eq!(&got[..], &data[at + 10..at + 5010]);
        // Block 0 was never fetched whole.
        assert!(ahead.read_ready(8192, 10).is_none());
    }

    #[tokio::test]
    async fn random_reads_fetch_nothing_ahead() {
        let budget = Budget::new(64 << 20);
        let size = 6 * BLOCK as usize;
        let (ahead, data) = reader(size, &budget).await;
        for i in 0..50u64 {
            let at = (i * 7_919_993) % (size as u64 - 4096);
            let got = ahead.read(at, 4096).await.unwrap();
            assert_eq!(&got[..], &data[at as usize..at as usize + 4096]);
        }
        assert!(ahead.blocks().is_empty());
        assert_eq!(budget.available(), 64 << 20);
    }

    #[tokio::test]
    async fn a_spent_budget_fetches_nothing_ahead_and_reads_go_on() {
        let budget = Budget::new(BLOCK);
        let size = 4 * BLOCK as usize;
        let (first, data) = reader(size, &budget).await;
        first.read(0, 4096).await.unwrap();
        first.read(4096, 4096).await.unwrap();
        assert_eq!(first.blocks(), vec![1]);
        assert_eq!(budget.available(), 0);
        let (second, _) = reader(size, &budget).await;
        let mut at = 0;
        while at < size {
            let got = second.read(at as u64, 1 << 20).await.unwrap();
            assert_eq!(&got[..], &data[at..at + (1 << 20)]);
            at += 1 << 20;
        }
        assert!(second.blocks().is_empty());
    }
}
