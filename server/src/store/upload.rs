//! Uploads being received: a part file under `tmp/` written chunk by chunk (large ones
//! with direct I/O in aligned blocks), hashed as it comes, holding its share of the quota
//! and of the disk from the start, so concurrent uploads add up. `sync` makes what came
//! durable, after which the upload survives its connection and a restart (see `parts`).
//! Dropping one without an outcome (disconnect, shutdown) detaches it for a resume;
//! aborting or failing it removes its part; committing it is the store's job.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::parts::Parts;
use crate::error::{Result, ServerError};
use crate::fsutil;
use crate::reservations::Reservation;
use crate::space::Claim;

/// Bytes of an upload after which their writeback to disk is started.
const WRITEBACK_EVERY: u64 = 8 << 20;
/// Alignment of `O_DIRECT` writes: offsets, lengths and buffer addresses.
const DIRECT_ALIGN: usize = 4096;
/// Bytes an upload gathers before writing them to disk directly.
pub const DIRECT_BLOCK: usize = 1 << 20;
/// Disk space an upload of undeclared size claims at a time.
const CLAIM_STEP: u64 = 16 << 20;

/// Where a committed upload goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadTarget {
    /// A new version of this file, wherever it then is.
    Replace(u64),
    /// The regular file `name` in `parent`, created or replaced.
    At { parent: u64, name: String },
}

/// An upload being received into a part file. Dropping it detaches it (see `parts`),
/// unless it was aborted or failed: then its part is removed.
#[derive(Debug)]
pub struct StagedUpload {
    /// Its id, unique across restarts (see `parts`).
    pub(super) id: u64,
    pub(super) parts: Arc<Parts>,
    /// Whether the part's sidecar and directory entry were made durable (by the first
    /// `sync`).
    pub(super) anchored: bool,
    /// Aborted: dropping it removes the part instead of keeping it for a resume.
    pub(super) discard: bool,
    pub(super) owner: String,
    pub(super) target: UploadTarget,
    /// Permission bits for the file, if the client gave them.
    pub(super) mode: Option<u32>,
    pub(super) file: Option<File>,
    /// Whole aligned blocks go to disk through this `O_DIRECT` descriptor of the same file,
    /// bypassing the page cache: copying a large upload into the page cache was half the
    /// server's CPU. `None` where the filesystem has no direct I/O (tmpfs), or after it
    /// failed: then writes are buffered, with early writeback.
    pub(super) direct: Option<DirectWriter>,
    pub(super) path: PathBuf,
    pub(super) hasher: blake3::Hasher,
    pub(super) written: u64,
    /// Where the next early writeback starts.
    pub(super) writeback_from: u64,
    /// Bytes the owner's quota left above what the folder held when the upload began;
    /// the owner's uploads in progress together hold at most this much of it.
    pub(super) allowance: u64,
    /// The owner's quota this upload holds (`None` without a quota): its declared size
    /// from the start, grown as chunks go past it.
    pub(super) held: Option<Reservation>,
    /// The owner's quota, checked again at commit against what the folder holds then
    /// (other uploads of the owner may have committed meanwhile).
    pub(super) quota: Option<u64>,
    /// Disk space claimed for bytes not yet written: the declared size at the start, or
    /// [`CLAIM_STEP`] at a time where the size was not declared.
    pub(super) room: Claim,
    /// The first failure; later chunks are ignored and commit reports it.
    pub(super) failed: Option<ServerError>,
}

/// The unwritten tail of an upload, gathered in an aligned buffer until a whole block can
/// go to disk with one direct write.
pub(super) struct DirectWriter {
    file: File,
    buf: Vec<u8>,
    /// Where the aligned block starts in `buf`.
    start: usize,
    /// Bytes gathered.
    len: usize,
    /// The file offset of the gathered bytes: a multiple of the block size.
    base: u64,
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter")
            .field("len", &self.len)
            .field("base", &self.base)
            .finish()
    }
}

impl DirectWriter {
    /// A writer of the part at `path` whose first `written` bytes are there (none for a
    /// new one): the last, unaligned ones are gathered again from the file. `None` where
    /// the filesystem has no direct I/O.
    pub(super) fn resume(path: &Path, file: &File, written: u64) -> Option<DirectWriter> {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .ok()?;
        let mut buf = vec![0u8; DIRECT_BLOCK + DIRECT_ALIGN];
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        if start >= DIRECT_ALIGN {
            return None;
        }
        let base = written - written % DIRECT_BLOCK as u64;
        let len = (written - base) as usize;
        file.read_exact_at(&mut buf[start..start + len], base)
            .ok()?;
        Some(DirectWriter {
            file: direct,
            buf,
            start,
            len,
            base,
        })
    }

    fn block(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    /// Gathers `data` (the bytes after those gathered so far), writing each block that
    /// fills up. On an error, the gathered bytes are still those at `base`.
    fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = data.len().min(DIRECT_BLOCK - self.len);
            let from = self.start + self.len;
            self.buf[from..from + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
            if self.len == DIRECT_BLOCK {
                self.file.write_all_at(self.block(), self.base)?;
                self.base += DIRECT_BLOCK as u64;
                self.len = 0;
            }
        }
        Ok(())
    }
}

impl StagedUpload {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn target(&self) -> &UploadTarget {
        &self.target
    }

    /// Makes every byte received so far durable, the part's sidecar and name included;
    /// returns how many. Blocking.
    pub fn sync(&mut self) -> Result<u64> {
        self.sync_point()?()
    }

    /// Writes out what is gathered and returns the rest of a [`StagedUpload::sync`]: the
    /// flush of the bytes received so far, which may run while more are written (a flush
    /// covers every write completed before it).
    pub fn sync_point(&mut self) -> Result<Box<dyn FnOnce() -> Result<u64> + Send>> {
        if let Some(e) = &self.failed {
            return Err(ServerError::Again(e.body()));
        }
        self.write_gathered()?;
        let file = match self.file.as_ref() {
            Some(f) => Some(f.try_clone()?),
            None => None,
        };
        let anchor = (!self.anchored).then(|| {
            self.anchored = true;
            (self.parts.meta_path(self.id), self.parts.path(self.id))
        });
        let written = self.written;
        Ok(Box::new(move || {
            if let Some(file) = file {
                file.sync_data()?;
            }
            if let Some((meta, part)) = anchor {
                File::open(meta)?.sync_all()?;
                fsutil::sync_dir(part.parent().unwrap_or(Path::new(".")))?;
            }
            Ok(written)
        }))
    }

    /// Up to `len` bytes of what was received, from `offset`. Blocking.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        if let Some(e) = &self.failed {
            return Err(ServerError::Again(e.body()));
        }
        self.write_gathered()?;
        let end = self.written.min(offset.saturating_add(len as u64));
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        if let Some(file) = self.file.as_ref() {
            file.read_exact_at(&mut buf, offset)?;
        }
        Ok(buf)
    }

    /// Writes the bytes the direct writer gathers through the page cache, keeping them
    /// gathered: its next whole block rewrites them, with the same bytes.
    fn write_gathered(&self) -> Result<()> {
        if let (Some(file), Some(direct)) = (self.file.as_ref(), self.direct.as_ref()) {
            file.write_all_at(direct.block(), direct.base)?;
        }
        Ok(())
    }

    /// Ends the upload with nothing kept: its part is removed when it is dropped.
    pub fn abort(&mut self) {
        self.discard = true;
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends a chunk. Blocking. A failure is kept and reported by commit.
    pub fn write_chunk(&mut self, offset: u64, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if offset != self.written {
            self.failed = Some(ServerError::Protocol(format!(
                "chunk at offset {offset}, expected {}",
                self.written
            )));
            return;
        }
        if let Some(held) = self.held.as_mut() {
            let short = (self.written + data.len() as u64).saturating_sub(held.bytes());
            if let Err(e) = held.grow(short, self.allowance) {
                tracing::warn!(owner = %self.owner, target = ?self.target, error = %e, "upload refused");
                self.failed = Some(e);
                return;
            }
        }
        if let Err(e) = self.claim_room(data.len() as u64) {
            tracing::warn!(owner = %self.owner, target = ?self.target, error = %e, "upload refused");
            self.failed = Some(e);
            return;
        }
        if let Err(e) = self.store(data) {
            tracing::warn!(owner = %self.owner, target = ?self.target, error = %e, "upload failed");
            self.failed = Some(e.into());
            return;
        }
        self.room.consume(data.len() as u64);
        self.hasher.update(data);
        self.written += data.len() as u64;
    }

    /// Makes sure `n` bytes are claimed for the next chunk. An upload of undeclared size
    /// claims [`CLAIM_STEP`] at a time, so its chunks do not each cost a `statvfs`.
    fn claim_room(&mut self, n: u64) -> Result<()> {
        match n.checked_sub(self.room.bytes()) {
            // Near a full disk a whole step may not fit where the chunk still does.
            Some(short) if short > 0 => self
                .room
                .grow(short.max(CLAIM_STEP))
                .or_else(|_| self.room.grow(short)),
            _ => Ok(()),
        }
    }

    /// Puts a chunk's bytes on their way to disk: directly in whole blocks where possible,
    /// else through the page cache with early writeback.
    fn store(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(file) = self.file.as_ref() else {
            return Ok(());
        };
        if let Some(mut direct) = self.direct.take() {
            let Err(e) = direct.write(data) else {
                self.direct = Some(direct);
                return Ok(());
            };
            // Direct I/O refused after all: the gathered bytes and this chunk go through
            // the page cache instead (rewriting any of the chunk's bytes already written
            // directly, with the same bytes), as does the rest.
            tracing::debug!(error = %e, "direct write failed; buffering this upload");
            self.writeback_from = direct.base;
            file.write_all_at(direct.block(), direct.base)?;
        }
        file.write_all_at(data, self.written)?;
        let end = self.written + data.len() as u64;
        if end - self.writeback_from >= WRITEBACK_EVERY {
            // Start writing what came so far to disk now, so the fsync at commit waits for
            // the tail only instead of the whole file (the disk works during the transfer).
            use std::os::fd::AsRawFd;
            let (from, len) = (self.writeback_from, end - self.writeback_from);
            // SAFETY: plain syscall on an owned descriptor; errors only cost the overlap,
            // the commit's fsync still makes everything durable.
            unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    from as i64,
                    len as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.writeback_from = end;
        }
        Ok(())
    }

    /// Writes what is still gathered (the unaligned tail) through the page cache.
    pub(super) fn finish_writes(&mut self) -> Result<()> {
        let (Some(file), Some(direct)) = (self.file.as_ref(), self.direct.take()) else {
            return Ok(());
        };
        file.write_all_at(direct.block(), direct.base)?;
        Ok(())
    }
}

impl Drop for StagedUpload {
    fn drop(&mut self) {
        if self.file.is_none() {
            // Committed, or its commit failed: that path settled the part.
            return;
        }
        if self.discard || self.failed.is_some() {
            self.parts.finish(self.id);
        } else {
            self.parts.detach(self.id);
        }
    }
}
