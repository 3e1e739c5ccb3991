//! Contents in the object store: a content is cut into blocks of [`BLOCK`] bytes, each
//! one object, `blocks/<content:016x>/<n:08x>`, so an upload is durable block by block as
//! it arrives (and resumable from any node), a read fetches the byte ranges it needs from
//! one or two blocks, and a resumed upload can read back what it holds. Content ids come
//! from the database's `sharefs_objects` sequence and are never reused: a block is
//! written once (a partial last block may be rewritten longer before its content is
//! committed) and deleted once nothing names it.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

use crate::error::{Result, ServerError};

/// Bytes per block object.
pub const BLOCK: u64 = 4 * 1024 * 1024;

/// The object store of a cluster.
#[derive(Debug, Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
}

pub fn s3_error(e: object_store::Error) -> ServerError {
    ServerError::Backend(format!("object store: {e}"))
}

fn block_path(content: u64, n: u64) -> Path {
    Path::from(format!("blocks/{content:016x}/{n:08x}"))
}

/// The number of blocks of a content of `size` bytes.
pub fn blocks_of(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

impl Objects {
    pub fn new(store: Arc<dyn ObjectStore>) -> Objects {
        Objects { store }
    }

    /// Writes block `n` of `content`: durable when this returns.
    pub async fn put_block(&self, content: u64, n: u64, data: Bytes) -> Result<()> {
        self.store
            .put(&block_path(content, n), PutPayload::from(data))
            .await
            .map_err(s3_error)?;
        Ok(())
    }

    /// Writes a whole content, block after block.
    pub async fn put_all(&self, content: u64, data: Bytes) -> Result<()> {
        let mut n = 0u64;
        let mut at = 0usize;
        while at < data.len() {
            let end = (at + BLOCK as usize).min(data.len());
            self.put_block(content, n, data.slice(at..end)).await?;
            at = end;
            n += 1;
        }
        Ok(())
    }

    /// Up to `len` bytes at `offset` of a content of `size` bytes (fewer at its end).
    pub async fn read(&self, content: u64, size: u64, offset: u64, len: usize) -> Result<Bytes> {
        let end = size.min(offset.saturating_add(len as u64));
        if offset >= end {
            return Ok(Bytes::new());
        }
        let mut parts: Vec<Bytes> = Vec::new();
        let mut at = offset;
        while at < end {
            let n = at / BLOCK;
            let start = at - n * BLOCK;
            let stop = (end - n * BLOCK).min(BLOCK);
            let bytes = self
                .store
                .get_range(&block_path(content, n), start..stop)
                .await
                .map_err(s3_error)?;
            if bytes.len() as u64 != stop - start {
                return Err(ServerError::Backend(format!(
                    "block {n} of content {content:016x} is shorter than its entry says"
                )));
            }
            at += bytes.len() as u64;
            parts.push(bytes);
        }
        Ok(match parts.len() {
            1 => parts.pop().unwrap_or_default(),
            _ => Bytes::from(parts.concat()),
        })
    }

    /// Deletes the blocks of a content of `size` bytes (missing ones are fine).
    pub async fn delete(&self, content: u64, size: u64) -> Result<()> {
        // A partial block beyond the size may exist (an upload's last sync).
        for n in 0..blocks_of(size).max(1) {
            match self.store.delete(&block_path(content, n)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(s3_error(e)),
            }
        }
        Ok(())
    }

    /// Deletes block `n` of `content`; false if it was not there.
    pub async fn delete_block(&self, content: u64, n: u64) -> Result<bool> {
        let path = block_path(content, n);
        match self.store.head(&path).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(s3_error(e)),
        }
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(s3_error(e)),
        }
    }

    /// The ids of every content with blocks in the store, each with the seconds since
    /// its newest block was written (for the collector of contents nothing names).
    pub async fn contents(&self) -> Result<Vec<(u64, u64)>> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut list = self.store.list(Some(&Path::from("blocks")));
        let mut out: Vec<(u64, u64)> = Vec::new();
        while let Some(meta) = list.next().await {
            let meta = meta.map_err(s3_error)?;
            let Some(id) = meta
                .location
                .parts()
                .nth(1)
                .and_then(|p| u64::from_str_radix(p.as_ref(), 16).ok())
            else {
                continue;
            };
            let written = u64::try_from(meta.last_modified.timestamp()).unwrap_or(0);
            let age = now.saturating_sub(written);
            match out.last_mut() {
                Some((last, a)) if *last == id => *a = (*a).min(age),
                _ => out.push((id, age)),
            }
        }
        Ok(out)
    }
}
