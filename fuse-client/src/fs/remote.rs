//! What the filesystem core needs of a server: [`Remote`]. The mount implements it with
//! the reconnecting [`Connection`]; unit tests with an in-memory fake.

use std::future::Future;
use std::path::Path;

use bytes::Bytes;
use sharefs_protocol::{FileInfo, Space};

use crate::connection::{Connection, RemoteHandle};
use crate::error::ClientError;

type R<T> = Result<T, ClientError>;

pub trait Remote: Send + Sync + 'static {
    /// The logged-in user: the only folder that may be written.
    fn user(&self) -> &str;
    /// Runs one filesystem operation: every call it makes shares one deadline.
    fn operation<F: Future + Send>(&self, fut: F) -> impl Future<Output = F::Output> + Send {
        fut
    }
    fn list_users(&self) -> impl Future<Output = R<Vec<String>>> + Send;
    fn list_files(&self, owner: &str) -> impl Future<Output = R<Vec<FileInfo>>> + Send;
    fn stat(&self, owner: &str, name: &str) -> impl Future<Output = R<FileInfo>> + Send;
    /// Opens for reading; for another user's file this is the download event. Up to
    /// `head` bytes of the file's start come back with the handle.
    fn open(
        &self,
        owner: &str,
        name: &str,
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
    /// Uploads a local file's content as `name` in the user's folder; returns once durable.
    fn upload_file(&self, name: &str, path: &Path) -> impl Future<Output = R<FileInfo>> + Send;
    /// Uploads `data` as `name` in the user's folder; returns once durable.
    fn upload_bytes(&self, name: &str, data: Bytes) -> impl Future<Output = R<FileInfo>> + Send;
    /// Starts an upload whose bytes are streamed as they are written.
    fn upload_begin(&self, name: &str) -> impl Future<Output = R<RemoteHandle>> + Send;
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
    ) -> impl Future<Output = R<FileInfo>> + Send;
    fn upload_abort(&self, h: RemoteHandle) -> impl Future<Output = ()> + Send;
    fn delete(&self, name: &str) -> impl Future<Output = R<()>> + Send;
    fn rename(&self, from: &str, to: &str) -> impl Future<Output = R<FileInfo>> + Send;
    fn statfs(&self) -> impl Future<Output = R<Space>> + Send;
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
    async fn list_files(&self, owner: &str) -> R<Vec<FileInfo>> {
        Connection::list_files(self, owner).await
    }
    async fn stat(&self, owner: &str, name: &str) -> R<FileInfo> {
        Connection::stat(self, owner, name).await
    }
    async fn open(&self, owner: &str, name: &str, head: u32) -> R<(RemoteHandle, FileInfo, Bytes)> {
        Connection::open(self, owner, name, head).await
    }
    async fn read(&self, handle: RemoteHandle, offset: u64, len: u32) -> R<Bytes> {
        Connection::read(self, handle, offset, len).await
    }
    async fn close(&self, handle: RemoteHandle) {
        Connection::close(self, handle).await
    }
    async fn upload_file(&self, name: &str, path: &Path) -> R<FileInfo> {
        Connection::upload_file(self, name, path).await
    }
    async fn upload_bytes(&self, name: &str, data: Bytes) -> R<FileInfo> {
        Connection::upload_bytes(self, name, data).await
    }
    async fn upload_begin(&self, name: &str) -> R<RemoteHandle> {
        Connection::upload_begin(self, name).await
    }
    async fn upload_chunk(&self, h: RemoteHandle, offset: u64, data: Bytes) -> R<()> {
        Connection::upload_chunk(self, h, offset, data).await
    }
    async fn upload_commit(&self, h: RemoteHandle, size: u64, blake3: &str) -> R<FileInfo> {
        Connection::upload_commit(self, h, size, blake3).await
    }
    async fn upload_abort(&self, h: RemoteHandle) {
        Connection::upload_abort(self, h).await
    }
    async fn delete(&self, name: &str) -> R<()> {
        Connection::delete(self, name).await
    }
    async fn rename(&self, from: &str, to: &str) -> R<FileInfo> {
        Connection::rename(self, from, to).await
    }
    async fn statfs(&self) -> R<Space> {
        Connection::statfs(self).await
    }
}
