//! What the filesystem core needs of a server: [`Remote`]. The mount implements it with
//! the reconnecting [`Connection`]; unit tests with an in-memory fake. Entries are
//! addressed by (owner, id); every change is made in the logged-in user's own tree.

use std::future::Future;
use std::path::Path;

use bytes::Bytes;
use sharefs_protocol::{FileInfo, Space};

use crate::connection::{Connection, RemoteHandle};
use crate::error::ClientError;
pub use crate::remote::{AttrChange, Move, UploadTarget};

type R<T> = Result<T, ClientError>;

pub trait Remote: Send + Sync + 'static {
    /// The logged-in user: the only tree that may be written.
    fn user(&self) -> &str;
    /// Runs one filesystem operation: every call it makes shares one deadline.
    fn operation<F: Future + Send>(&self, fut: F) -> impl Future<Output = F::Output> + Send {
        fut
    }
    fn list_users(&self) -> impl Future<Output = R<Vec<String>>> + Send;
    /// Every entry of directory `dir` of `owner`'s tree.
    fn list(&self, owner: &str, dir: u64) -> impl Future<Output = R<Vec<FileInfo>>> + Send;
    fn lookup(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
    ) -> impl Future<Output = R<FileInfo>> + Send;
    fn stat(&self, owner: &str, id: u64) -> impl Future<Output = R<FileInfo>> + Send;
    /// Opens for reading; for another user's file this is the download event. Up to
    /// `head` bytes of the file's start come back with the handle.
    fn open(
        &self,
        owner: &str,
        id: u64,
        head: u32,
    ) -> impl Future<Output = R<(RemoteHandle, FileInfo, Bytes)>> + Send;
    /// Reads through a handle; `Disconnected` means the handle is gone and may be reopened.
    fn read(
        &self,
        handle: RemoteHandle,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = R<Bytes>> + Send;
    fn close(&self, handle: RemoteHandle) -> impl Future<Output = ()> + Send;
    /// Uploads a local file's content to `target`; returns once durable.
    fn upload_file(
        &self,
        target: &UploadTarget,
        path: &Path,
    ) -> impl Future<Output = R<FileInfo>> + Send;
    /// Uploads `data` to `target`; returns once durable.
    fn upload_bytes(
        &self,
        target: &UploadTarget,
        data: Bytes,
    ) -> impl Future<Output = R<FileInfo>> + Send;
    /// Starts an upload whose bytes are streamed as they are written.
    fn upload_begin(&self, target: &UploadTarget) -> impl Future<Output = R<RemoteHandle>> + Send;
    /// Next bytes of a streamed upload, in order.
    fn upload_chunk(
        &self,
        h: RemoteHandle,
        offset: u64,
        data: Bytes,
    ) -> impl Future<Output = R<()>> + Send;
    /// Makes a streamed upload the file's new version; returns once durable.
    fn upload_commit(
        &self,
        h: RemoteHandle,
        size: u64,
        blake3: &str,
        mtime_ns: Option<i64>,
    ) -> impl Future<Output = R<FileInfo>> + Send;
    fn upload_abort(&self, h: RemoteHandle) -> impl Future<Output = ()> + Send;
    /// Makes what the server received of a streamed upload durable; how many bytes.
    fn upload_sync(&self, h: RemoteHandle) -> impl Future<Output = R<u64>> + Send;
    /// Takes up a streamed upload whose connection was lost: the upload on the live
    /// connection and where its chunks continue.
    fn upload_resume(&self, h: RemoteHandle)
        -> impl Future<Output = R<(RemoteHandle, u64)>> + Send;
    /// Reads back what the server received of a streamed upload.
    fn upload_read(
        &self,
        h: RemoteHandle,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = R<Bytes>> + Send;
    /// Version, size and hex BLAKE3 hash of one of the user's files.
    fn content_hash(&self, id: u64) -> impl Future<Output = R<(u64, u64, String)>> + Send;
    fn mkdir(&self, parent: u64, name: &str, mode: u32)
        -> impl Future<Output = R<FileInfo>> + Send;
    fn symlink(
        &self,
        parent: u64,
        name: &str,
        target: &str,
    ) -> impl Future<Output = R<FileInfo>> + Send;
    /// Removes a file or link, or an empty directory when `dir`.
    fn remove(&self, parent: u64, name: &str, dir: bool) -> impl Future<Output = R<()>> + Send;
    fn rename(&self, mv: &Move) -> impl Future<Output = R<FileInfo>> + Send;
    fn setattr(&self, id: u64, change: AttrChange) -> impl Future<Output = R<FileInfo>> + Send;
    fn statfs(&self) -> impl Future<Output = R<Space>> + Send;
    /// Makes every change answered so far durable, the lazy ones included (see
    /// `crate::remote::lazily`).
    fn sync(&self) -> impl Future<Output = R<()>> + Send;
}

impl Remote for Connection {
    fn user(&self) -> &str {
        Connection::user(self)
    }
    fn operation<F: Future + Send>(&self, fut: F) -> impl Future<Output = F::Output> + Send {
        Connection::operation(self, fut)
    }
    async fn list_users(&self) -> R<Vec<String>> {
        Connection::list_users(self).await
    }
    async fn list(&self, owner: &str, dir: u64) -> R<Vec<FileInfo>> {
        Connection::list(self, owner, dir).await
    }
    async fn lookup(&self, owner: &str, parent: u64, name: &str) -> R<FileInfo> {
        Connection::lookup(self, owner, parent, name).await
    }
    async fn stat(&self, owner: &str, id: u64) -> R<FileInfo> {
        Connection::stat(self, owner, id).await
    }
    async fn open(&self, owner: &str, id: u64, head: u32) -> R<(RemoteHandle, FileInfo, Bytes)> {
        Connection::open(self, owner, id, head).await
    }
    async fn read(&self, handle: RemoteHandle, offset: u64, len: u32) -> R<Bytes> {
        Connection::read(self, handle, offset, len).await
    }
    async fn close(&self, handle: RemoteHandle) {
        Connection::close(self, handle).await
    }
    async fn upload_file(&self, target: &UploadTarget, path: &Path) -> R<FileInfo> {
        Connection::upload_file(self, target, path).await
    }
    async fn upload_bytes(&self, target: &UploadTarget, data: Bytes) -> R<FileInfo> {
        Connection::upload_bytes(self, target, data).await
    }
    async fn upload_begin(&self, target: &UploadTarget) -> R<RemoteHandle> {
        Connection::upload_begin(self, target).await
    }
    async fn upload_chunk(&self, h: RemoteHandle, offset: u64, data: Bytes) -> R<()> {
        Connection::upload_chunk(self, h, offset, data).await
    }
    async fn upload_commit(
        &self,
        h: RemoteHandle,
        size: u64,
        blake3: &str,
        mtime_ns: Option<i64>,
    ) -> R<FileInfo> {
        Connection::upload_commit(self, h, size, blake3, mtime_ns).await
    }
    async fn upload_abort(&self, h: RemoteHandle) {
        Connection::upload_abort(self, h).await
    }
    async fn upload_sync(&self, h: RemoteHandle) -> R<u64> {
        Connection::upload_sync(self, h).await
    }
    async fn upload_resume(&self, h: RemoteHandle) -> R<(RemoteHandle, u64)> {
        Connection::upload_resume(self, h).await
    }
    async fn upload_read(&self, h: RemoteHandle, offset: u64, len: u32) -> R<Bytes> {
        Connection::upload_read(self, h, offset, len).await
    }
    async fn content_hash(&self, id: u64) -> R<(u64, u64, String)> {
        Connection::content_hash(self, id).await
    }
    async fn mkdir(&self, parent: u64, name: &str, mode: u32) -> R<FileInfo> {
        Connection::mkdir(self, parent, name, mode).await
    }
    async fn symlink(&self, parent: u64, name: &str, target: &str) -> R<FileInfo> {
        Connection::symlink(self, parent, name, target).await
    }
    async fn remove(&self, parent: u64, name: &str, dir: bool) -> R<()> {
        Connection::remove(self, parent, name, dir).await
    }
    async fn rename(&self, mv: &Move) -> R<FileInfo> {
        Connection::rename(self, mv).await
    }
    async fn setattr(&self, id: u64, change: AttrChange) -> R<FileInfo> {
        Connection::setattr(self, id, change).await
    }
    async fn statfs(&self) -> R<Space> {
        Connection::statfs(self).await
    }
    async fn sync(&self) -> R<()> {
        Connection::sync(self).await
    }
}
