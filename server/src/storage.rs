//! The two interfaces storage sits behind, so that a scale-out backend (PostgreSQL rows
//! for the tree, S3 objects for contents) can replace the embedded one without touching
//! sessions.
//!
//! - [`MetaStore`]: each user's tree, entries addressed by (owner, id), inode style: a row
//!   per entry (`store::tree::Node`: parent, name, kind, mode, size, three times, version,
//!   content reference, link target) with (owner, parent, name) unique. Every change is
//!   one transaction, checked as POSIX checks it, whatever the subtree it moves; it returns
//!   the events it makes, already split into what the owner and what others may see.
//!   Reads take the [`Caller`], and refuse others what the modes do not let them see.
//! - [`BlobStore`]: contents by reference: a streamed write of an upload (a temp file, a
//!   multipart upload), a one-piece put of a small one, a read handle pinned to one
//!   version that serves ranged reads. Committing a content makes it an entry's version in
//!   the same transaction as its row; a content no row names any more is deleted (the
//!   embedded store removes it at once or at its next load; open handles keep reading it).
//!
//! `store::Store` implements both over plain files: a JSON journal with snapshots, a pack
//! of small contents and one blob file per large one. Sessions hold the storage as a
//! [`Storage`] trait object and see nothing else of it; uploads and read handles reach
//! them as [`ContentWriter`] and [`ContentReader`] objects.

use std::any::Any;
use std::fmt::Debug;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use sharefs_protocol::{FileInfo, Space};

use crate::cutoff::Cutoff;
use crate::error::{Result, ServerError};
pub use crate::store::{Caller, Published, UploadTarget};
use crate::store::{OpenFile, StagedUpload, Store};

/// A content being received, chunk by chunk, in order. Dropping it without an outcome
/// keeps it for a resume (for the upload idle bound); aborted or failed, it is discarded.
pub trait ContentWriter: Send + Sync + Debug {
    /// The upload's id, unique across restarts: what a resume names.
    fn id(&self) -> u64;
    /// Appends a chunk at `offset`. Blocking. A failure is kept and reported by commit.
    fn write_chunk(&mut self, offset: u64, data: &[u8]);
    /// Bytes received so far.
    fn written(&self) -> u64;
    /// Starts making every byte received so far durable and resumable: the returned
    /// work (blocking, and free to run while more chunks are written) finishes it and
    /// says how many bytes that was.
    fn sync_point(&mut self) -> Result<Box<dyn FnOnce() -> Result<u64> + Send>>;
    /// Up to `len` bytes received, from `offset`. Blocking.
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Discards the upload when it is dropped.
    fn abort(&mut self);
    /// The writer as `Any`, for the store that made it to take it back at commit.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// A read handle pinned to the version current when it was opened.
pub trait ContentReader: Send + Sync + Debug {
    /// The entry as it was when opened.
    fn info(&self) -> &FileInfo;
    /// Up to `len` bytes at `offset` (fewer at the end). Blocking.
    fn read(&self, offset: u64, len: usize) -> io::Result<Bytes>;
    /// Like `read`, but only if that needs no waiting for a disk; `None` otherwise.
    fn read_cached(&self, _offset: u64, _len: usize) -> Option<Bytes> {
        None
    }
}

/// Both stores, as sessions hold them.
pub trait Storage: MetaStore + BlobStore + Debug {}

impl<T: MetaStore + BlobStore + Debug> Storage for T {}

/// The storage sessions use.
pub type SharedStorage = Arc<dyn Storage>;

/// Users' trees.
pub trait MetaStore: Send + Sync {
    /// The entry `id`, wherever it is.
    fn stat(&self, owner: &str, id: u64, caller: Caller) -> Result<FileInfo>;
    /// The entry `name` in directory `parent`.
    fn lookup(&self, owner: &str, parent: u64, name: &str, caller: Caller) -> Result<FileInfo>;
    /// The entry at a path from the root, by lookups.
    fn resolve(&self, owner: &str, path: &str, caller: Caller) -> Result<FileInfo>;
    /// A page of a directory's entries by name after `after`, bounded in count and in
    /// bytes of JSON; true if more follow.
    fn list_page(
        &self,
        owner: &str,
        dir: u64,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
        caller: Caller,
    ) -> Result<(Vec<FileInfo>, bool)>;
    /// The path of an entry from its owner's root.
    fn path_of(&self, owner: &str, id: u64) -> Result<String>;
    /// Version, size and hex BLAKE3 hash of the current content of `owner`'s file `id`.
    fn content_hash(&self, owner: &str, id: u64) -> Result<(u64, u64, String)>;
    fn mkdir(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        mode: u32,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)>;
    fn symlink(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        target: &str,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)>;
    fn remove(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        dir: bool,
        cutoff: &Cutoff,
    ) -> Result<Vec<Published>>;
    #[allow(clippy::too_many_arguments)]
    fn rename(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        noreplace: bool,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)>;
    fn set_attr(
        &self,
        owner: &str,
        id: u64,
        mode: Option<u32>,
        atime_ns: Option<i64>,
        mtime_ns: Option<i64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)>;
    /// Bytes and entries used, and what is left under `quota`.
    fn usage(&self, owner: &str, quota: Option<u64>) -> Result<Space>;
    /// Makes every change of `owner`'s tree answered so far durable, the ones made with a
    /// `lazy` cutoff included (they are answered before they are).
    fn sync(&self, owner: &str) -> Result<()>;
    /// Removes a user's whole tree and contents (account removal).
    fn remove_tree(&self, owner: &str) -> Result<()>;
    /// Hands the events of changes made elsewhere (other nodes of a cluster) to `sink`,
    /// from now on; a store only this server changes has none.
    fn watch(&self, _sink: crate::cluster::feed::Sink) {}
}

/// File contents.
pub trait BlobStore: Send + Sync {
    /// Starts receiving a content for `target`, checked against `quota` and free space.
    fn begin_upload(
        &self,
        owner: &str,
        target: UploadTarget,
        size: Option<u64>,
        mode: Option<u32>,
        quota: Option<u64>,
    ) -> Result<Box<dyn ContentWriter>>;
    /// Takes up `owner`'s upload `id`, left by a lost connection or a restart.
    fn resume_upload(
        &self,
        owner: &str,
        id: u64,
        quota: Option<u64>,
    ) -> Result<Box<dyn ContentWriter>>;
    /// Drops the uploads left without a session for longer than `bound`; how many.
    fn expire_uploads(&self, bound: std::time::Duration) -> usize;
    /// Makes a received content the new version of its target, in the same transaction as
    /// the entry's row.
    fn commit_upload(
        &self,
        upload: Box<dyn ContentWriter>,
        size: u64,
        blake3: &str,
        mtime_ns: Option<i64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)>;
    /// Stores a content received whole.
    #[allow(clippy::too_many_arguments)]
    fn put(
        &self,
        owner: &str,
        target: UploadTarget,
        data: &[u8],
        blake3: &str,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        quota: Option<u64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)>;
    /// Opens the current version of a file for ranged reads, with its path.
    fn open_read(
        &self,
        owner: &str,
        id: u64,
        caller: Caller,
    ) -> Result<(Box<dyn ContentReader>, String)>;
    /// Opens the owner's own file without blocking, where that is possible; `None`
    /// otherwise (then [`BlobStore::open_read`]).
    fn try_open_own(&self, _owner: &str, _id: u64) -> Option<Box<dyn ContentReader>> {
        None
    }
}

impl ContentWriter for StagedUpload {
    fn id(&self) -> u64 {
        StagedUpload::id(self)
    }
    fn write_chunk(&mut self, offset: u64, data: &[u8]) {
        StagedUpload::write_chunk(self, offset, data)
    }
    fn written(&self) -> u64 {
        StagedUpload::written(self)
    }
    fn sync_point(&mut self) -> Result<Box<dyn FnOnce() -> Result<u64> + Send>> {
        StagedUpload::sync_point(self)
    }
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        StagedUpload::read(self, offset, len)
    }
    fn abort(&mut self) {
        StagedUpload::abort(self)
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

impl ContentReader for OpenFile {
    fn info(&self) -> &FileInfo {
        &self.info
    }
    fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        OpenFile::read(self, offset, len)
    }
    fn read_cached(&self, offset: u64, len: usize) -> Option<Bytes> {
        OpenFile::read_cached(self, offset, len)
    }
}

impl MetaStore for Store {
    fn stat(&self, owner: &str, id: u64, caller: Caller) -> Result<FileInfo> {
        Store::stat(self, owner, id, caller)
    }
    fn lookup(&self, owner: &str, parent: u64, name: &str, caller: Caller) -> Result<FileInfo> {
        Store::lookup(self, owner, parent, name, caller)
    }
    fn resolve(&self, owner: &str, path: &str, caller: Caller) -> Result<FileInfo> {
        Store::resolve(self, owner, path, caller)
    }
    fn list_page(
        &self,
        owner: &str,
        dir: u64,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
        caller: Caller,
    ) -> Result<(Vec<FileInfo>, bool)> {
        Store::list_page(self, owner, dir, after, limit, max_bytes, caller)
    }
    fn path_of(&self, owner: &str, id: u64) -> Result<String> {
        Store::path_of(self, owner, id)
    }
    fn content_hash(&self, owner: &str, id: u64) -> Result<(u64, u64, String)> {
        Store::content_hash(self, owner, id)
    }
    fn mkdir(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        mode: u32,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        Store::mkdir(self, owner, parent, name, mode, cutoff)
    }
    fn symlink(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        target: &str,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        Store::symlink(self, owner, parent, name, target, cutoff)
    }
    fn remove(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        dir: bool,
        cutoff: &Cutoff,
    ) -> Result<Vec<Published>> {
        Store::remove(self, owner, parent, name, dir, cutoff)
    }
    fn rename(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        noreplace: bool,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        Store::rename(
            self, owner, parent, name, new_parent, new_name, noreplace, cutoff,
        )
    }
    fn set_attr(
        &self,
        owner: &str,
        id: u64,
        mode: Option<u32>,
        atime_ns: Option<i64>,
        mtime_ns: Option<i64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        Store::set_attr(self, owner, id, mode, atime_ns, mtime_ns, cutoff)
    }
    fn usage(&self, owner: &str, quota: Option<u64>) -> Result<Space> {
        Store::space(self, owner, quota)
    }
    fn sync(&self, owner: &str) -> Result<()> {
        Store::sync(self, owner)
    }
    fn remove_tree(&self, owner: &str) -> Result<()> {
        Store::remove_folder(self, owner)
    }
}

impl BlobStore for Store {
    fn begin_upload(
        &self,
        owner: &str,
        target: UploadTarget,
        size: Option<u64>,
        mode: Option<u32>,
        quota: Option<u64>,
    ) -> Result<Box<dyn ContentWriter>> {
        Ok(Box::new(Store::begin_upload(
            self, owner, target, size, mode, quota,
        )?))
    }
    fn resume_upload(
        &self,
        owner: &str,
        id: u64,
        quota: Option<u64>,
    ) -> Result<Box<dyn ContentWriter>> {
        Ok(Box::new(Store::resume_upload(self, owner, id, quota)?))
    }
    fn expire_uploads(&self, bound: std::time::Duration) -> usize {
        Store::expire_uploads(self, bound)
    }
    fn commit_upload(
        &self,
        upload: Box<dyn ContentWriter>,
        size: u64,
        blake3: &str,
        mtime_ns: Option<i64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        let upload = upload
            .into_any()
            .downcast::<StagedUpload>()
            .map_err(|_| ServerError::Internal("an upload of another store".into()))?;
        Store::commit_upload(self, *upload, size, blake3, mtime_ns, cutoff)
    }
    fn put(
        &self,
        owner: &str,
        target: UploadTarget,
        data: &[u8],
        blake3: &str,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        quota: Option<u64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        Store::put(
            self, owner, target, data, blake3, mode, mtime_ns, quota, cutoff,
        )
    }
    fn open_read(
        &self,
        owner: &str,
        id: u64,
        caller: Caller,
    ) -> Result<(Box<dyn ContentReader>, String)> {
        let (open, path) = Store::open_read(self, owner, id, caller)?;
        Ok((Box::new(open), path))
    }
    fn try_open_own(&self, owner: &str, id: u64) -> Option<Box<dyn ContentReader>> {
        Store::try_open_packed(self, owner, id).map(|f| Box::new(f) as Box<dyn ContentReader>)
    }
}
