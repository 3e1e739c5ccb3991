//! Writes to one's own files are staged in a local temp file and uploaded on flush/fsync.
//!
//! One [`StagedWrite`] per inode, shared by every handle open on it, so two descriptors
//! of one file see each other's writes as on a local disk. `close()` (flush) uploads the
//! whole staged content if anything changed and returns only once the server committed it,
//! with the server's error if it did not. A staged file whose upload never succeeded is not
//! deleted: on the last release it moves to the `failed/` directory and its path is logged.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::error::{FsError, FsResult};
use super::stream::StreamState;

#[derive(Debug)]
struct State {
    /// Name in the user's folder (changes on rename).
    name: String,
    size: u64,
    /// Bumped by every change; an upload is current if nothing changed since it started.
    changes: u64,
    uploaded: u64,
    /// Open handles on this staged file.
    refs: usize,
    /// Unlinked while open: writes go nowhere, as on a local disk.
    unlinked: bool,
}

pub struct StagedWrite {
    file: File,
    path: PathBuf,
    state: Mutex<State>,
    /// Serialises uploads of this file.
    pub upload_lock: tokio::sync::Mutex<()>,
    /// The streamed upload, if any (see `stream.rs`). std `Mutex`: never held across an
    /// await; `stream_order` keeps feeds in write order.
    pub stream: Mutex<StreamState>,
    pub stream_order: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for StagedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedWrite")
            .field("path", &self.path)
            .finish()
    }
}

impl StagedWrite {
    /// A new empty staged file in `dir`. `dirty` says whether an empty upload is due even
    /// without writes (a newly created or truncated file).
    pub fn create(dir: &Path, name: &str, dirty: bool) -> FsResult<StagedWrite> {
        let tmp = tempfile::Builder::new()
            .prefix("staged-")
            .tempfile_in(dir)?;
        let (file, path) = tmp.keep().map_err(|e| FsError::Io(e.to_string()))?;
        Ok(StagedWrite {
            file,
            path,
            state: Mutex::new(State {
                name: name.to_string(),
                size: 0,
                changes: u64::from(dirty),
                uploaded: 0,
                refs: 0,
                unlinked: false,
            }),
            upload_lock: tokio::sync::Mutex::new(()),
            stream: Mutex::new(if dirty {
                StreamState::Eligible
            } else {
                StreamState::Off
            }),
            stream_order: tokio::sync::Mutex::new(()),
        })
    }

    /// Stops streaming (the stream's task then aborts its server-side upload).
    pub fn stop_stream(&self) {
        if let Ok(mut s) = self.stream.lock() {
            *s = StreamState::Off;
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn name(&self) -> String {
        self.state().name.clone()
    }

    pub fn set_name(&self, name: &str) {
        self.state().name = name.to_string();
    }

    pub fn size(&self) -> u64 {
        self.state().size
    }

    pub fn acquire(&self) {
        self.state().refs += 1;
    }

    pub fn refs(&self) -> usize {
        self.state().refs
    }

    /// The file was deleted: nothing of it is to be uploaded any more.
    pub fn unlink(&self) {
        self.stop_stream();
        let mut s = self.state();
        s.unlinked = true;
        s.uploaded = s.changes;
    }

    /// Drops one reference; true when it was the last.
    pub fn release(&self) -> bool {
        let mut s = self.state();
        s.refs = s.refs.saturating_sub(1);
        s.refs == 0
    }

    /// Appends downloaded content while filling the staged copy of an existing file.
    /// Does not count as a change.
    pub fn fill(&self, offset: u64, data: &[u8]) -> FsResult<()> {
        self.file.write_all_at(data, offset)?;
        let mut s = self.state();
        s.size = s.size.max(offset + data.len() as u64);
        Ok(())
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.file.write_all_at(data, offset)?;
        let mut s = self.state();
        s.size = s.size.max(offset + data.len() as u64);
        s.changes += 1;
        Ok(data.len() as u32)
    }

    pub fn read(&self, offset: u64, len: u32) -> FsResult<Vec<u8>> {
        let size = self.size();
        if offset >= size {
            return Ok(Vec::new());
        }
        let len = (len as u64).min(size - offset) as usize;
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    pub fn truncate(&self, size: u64) -> FsResult<()> {
        if let Ok(mut s) = self.stream.lock() {
            // Truncating a never-written file keeps it eligible; anything else ends a stream.
            if !(matches!(*s, StreamState::Eligible) && size == 0) {
                *s = StreamState::Off;
            }
        }
        self.file.set_len(size)?;
        let mut s = self.state();
        s.size = size;
        s.changes += 1;
        Ok(())
    }

    /// Whether the staged content differs from what the server has.
    pub fn dirty(&self) -> bool {
        let s = self.state();
        !s.unlinked && s.changes != s.uploaded
    }

    /// The change counter before an upload starts; pass it to [`StagedWrite::mark_uploaded`].
    pub fn changes(&self) -> u64 {
        self.state().changes
    }

    pub fn mark_uploaded(&self, changes: u64) {
        let mut s = self.state();
        s.uploaded = s.uploaded.max(changes);
    }

    /// Called after the last release: removes the staged file, or keeps it in `failed_dir`
    /// when its content never reached the server.
    pub fn finish(&self, failed_dir: &Path) {
        if self.dirty() {
            let name = self.name();
            let keep = unique_path(failed_dir, &name);
            let kept = std::fs::create_dir_all(failed_dir)
                .and_then(|()| std::fs::rename(&self.path, &keep));
            match kept {
                Ok(()) => tracing::error!(
                    file = %name,
                    kept = %keep.display(),
                    "upload never succeeded; the data is kept locally"
                ),
                Err(e) => tracing::error!(
                    file = %name,
                    kept = %self.path.display(),
                    error = %e,
                    "upload never succeeded; the data is kept locally"
                ),
            }
        } else if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove staged file");
        }
    }
}

/// `dir/<time>-<n>-<name>` that does not exist yet, within the 255-byte name limit.
fn unique_path(dir: &Path, name: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut short = name;
    while short.len() > 200 {
        let mut cut = 200;
        while !short.is_char_boundary(cut) {
            cut -= 1;
        }
        short = &short[..cut];
    }
    (0u32..)
        .map(|n| dir.join(format!("{secs}-{n}-{short}")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| dir.join(short))
}
