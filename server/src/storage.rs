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
//! of small contents and one blob file per large one.

use sharefs_protocol::{FileInfo, Space};

use crate::cutoff::Cutoff;
use crate::error::Result;
pub use crate::store::{Caller, Published, UploadTarget};
use crate::store::{OpenFile, StagedUpload, Store};

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
    /// Removes a user's whole tree and contents (account removal).
    fn remove_tree(&self, owner: &str) -> Result<()>;
}

/// File contents.
pub trait BlobStore: Send + Sync {
    /// A content being received.
    type Upload;
    /// A read handle on one version.
    type Reader;
    fn begin_upload(
        &self,
        owner: &str,
        target: UploadTarget,
        size: Option<u64>,
        mode: Option<u32>,
        quota: Option<u64>,
    ) -> Result<Self::Upload>;
    /// Makes a received content the new version of its target.
    fn commit_upload(
        &self,
        upload: Self::Upload,
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
    fn open_read(&self, owner: &str, id: u64, caller: Caller) -> Result<(Self::Reader, String)>;
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
    fn remove_tree(&self, owner: &str) -> Result<()> {
        Store::remove_folder(self, owner)
    }
}

impl BlobStore for Store {
    type Upload = StagedUpload;
    type Reader = OpenFile;
    fn begin_upload(
        &self,
        owner: &str,
        target: UploadTarget,
        size: Option<u64>,
        mode: Option<u32>,
        quota: Option<u64>,
    ) -> Result<StagedUpload> {
        Store::begin_upload(self, owner, target, size, mode, quota)
    }
    fn commit_upload(
        &self,
        upload: StagedUpload,
        size: u64,
        blake3: &str,
        mtime_ns: Option<i64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        Store::commit_upload(self, upload, size, blake3, mtime_ns, cutoff)
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
    fn open_read(&self, owner: &str, id: u64, caller: Caller) -> Result<(OpenFile, String)> {
        Store::open_read(self, owner, id, caller)
    }
}
