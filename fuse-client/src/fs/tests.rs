//! The core against an in-memory fake server: error mapping, permissions, caching
//! decisions, and a property test of random operation sequences against a model.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use proptest::prelude::*;
use sharefs_protocol::{
    EntryKind, ErrorBody, ErrorCode, Event, FileInfo, Place, Space, CHUNK_SIZE, ROOT_ID,
};

use super::listing::LISTING_AFTER_MISSES;
use super::remote::{AttrChange, Move, UploadTarget};
use super::*;
use crate::connection::RemoteHandle;
use crate::error::ClientError;

/// One entry of the fake server's trees.
#[derive(Debug, Clone)]
struct Entry {
    info: FileInfo,
    data: Vec<u8>,
}

#[derive(Default)]
struct Fake {
    user: String,
    users: Vec<String>,
    /// (owner, id) -> entry.
    entries: Mutex<BTreeMap<(String, u64), Entry>>,
    handles: Mutex<HashMap<u64, (Vec<u8>, FileInfo)>>,
    next: AtomicU64,
    /// (owner, file name) of every open.
    opens: Mutex<Vec<(String, String)>>,
    fail_uploads: Mutex<Option<ErrorCode>>,
    /// Streamed uploads in progress: id -> (target, data so far).
    uploads: Mutex<HashMap<u64, (UploadTarget, Vec<u8>)>>,
    /// Streamed uploads committed.
    streamed: Mutex<usize>,
    /// Bytes of each streamed upload made durable by a sync.
    synced: Mutex<HashMap<u64, u64>>,
    /// Chunks still to be taken before the "server" restarts: the chunk that hits zero
    /// fails as a lost connection, and every upload loses what was not synced.
    restart_after_chunks: Mutex<Option<u64>>,
    /// The next commit of a streamed upload is made but its answer lost.
    lose_commit_answer: Mutex<bool>,
    /// The next commit of a streamed upload finds the "server" dead before it made any
    /// of the upload durable: the connection is lost, and the upload with it.
    lose_upload_at_commit: Mutex<bool>,
    /// The next sync finds its upload let go (as after the server's idle bound): it is
    /// still there for a resume.
    let_go_next_sync: Mutex<bool>,
    /// Bytes served by `read` (not counting the head that comes with an open).
    read_bytes: AtomicU64,
    /// `lookup` and `list` calls (started).
    stats: AtomicU64,
    lists: AtomicU64,
    /// `setattr` calls.
    setattrs: AtomicU64,
    /// Whole-file uploads (`upload_bytes`, `upload_file`), creates included.
    puts: AtomicU64,
    /// Changes asked for lazily, and `sync` calls.
    lazy_changes: AtomicU64,
    syncs: AtomicU64,
    /// While held, `list` waits (a listing in flight).
    list_gate: tokio::sync::RwLock<()>,
}

fn remote_err(code: ErrorCode) -> ClientError {
    ClientError::Remote(ErrorBody::new(code, format!("{code:?}")))
}

impl Fake {
    fn new(user: &str) -> Fake {
        let fake = Fake {
            user: user.into(),
            users: vec!["alice".into(), "bob".into()],
            next: AtomicU64::new(100),
            ..Fake::default()
        };
        for u in ["alice", "bob"] {
            let info = fake.new_info(u, ROOT_ID, 0, "", EntryKind::Dir, 0o755);
            fake.entries
                .lock()
                .unwrap()
                .insert((u.into(), ROOT_ID), Entry { info, data: vec![] });
        }
        fake
    }

    /// Counts a change asked for inside `remote::lazily`.
    fn count_lazy(&self) {
        if crate::remote::is_lazy() {
            self.lazy_changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn tick(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn new_info(
        &self,
        owner: &str,
        id: u64,
        parent: u64,
        name: &str,
        kind: EntryKind,
        mode: u32,
    ) -> FileInfo {
        let now = self.tick() as i64 * 1000;
        FileInfo {
            owner: owner.into(),
            id,
            parent,
            name: name.into(),
            kind,
            mode,
            size: 0,
            mtime_ns: now,
            atime_ns: now,
            ctime_ns: now,
            version: self.tick(),
            target: None,
        }
    }

    fn find(&self, owner: &str, parent: u64, name: &str) -> Option<Entry> {
        self.entries
            .lock()
            .unwrap()
            .values()
            .find(|e| {
                e.info.owner == owner
                    && e.info.parent == parent
                    && e.info.name == name
                    && e.info.id != ROOT_ID
            })
            .cloned()
    }

    /// The entry at `path` ("a/b"), if any.
    fn at(&self, owner: &str, path: &str) -> Option<Entry> {
        let mut id = ROOT_ID;
        let mut found = self
            .entries
            .lock()
            .unwrap()
            .get(&(owner.to_string(), ROOT_ID))
            .cloned();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let e = self.find(owner, id, part)?;
            id = e.info.id;
            found = Some(e);
        }
        found
    }

    /// Writes `data` at `path` as another mount would, creating directories on the way.
    fn put(&self, owner: &str, path: &str, data: &[u8]) -> FileInfo {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let mut parent = ROOT_ID;
        for part in dir.split('/').filter(|p| !p.is_empty()) {
            parent = match self.find(owner, parent, part) {
                Some(e) => e.info.id,
                None => {
                    self.make(owner, parent, part, EntryKind::Dir, 0o755, None)
                        .id
                }
            };
        }
        let target = UploadTarget::at(parent, name);
        self.commit(owner, &target, data).unwrap()
    }

    fn make(
        &self,
        owner: &str,
        parent: u64,
        name: &str,
        kind: EntryKind,
        mode: u32,
        target: Option<&str>,
    ) -> FileInfo {
        let id = self.tick();
        let mut info = self.new_info(owner, id, parent, name, kind, mode);
        info.target = target.map(str::to_string);
        info.size = target.map_or(0, |t| t.len() as u64);
        self.entries.lock().unwrap().insert(
            (owner.to_string(), id),
            Entry {
                info: info.clone(),
                data: vec![],
            },
        );
        info
    }

    fn commit(&self, owner: &str, t: &UploadTarget, data: &[u8]) -> Result<FileInfo, ClientError> {
        let existing = match t.replace {
            Some(id) => Some(
                self.entries
                    .lock()
                    .unwrap()
                    .get(&(owner.to_string(), id))
                    .cloned()
                    .ok_or_else(|| remote_err(ErrorCode::NotFound))?,
            ),
            None => self.find(owner, t.parent, &t.name),
        };
        let mut info = match existing {
            Some(e) if e.info.kind != EntryKind::File => {
                return Err(remote_err(ErrorCode::IsADirectory))
            }
            Some(e) => e.info,
            None => self.make(
                owner,
                t.parent,
                &t.name,
                EntryKind::File,
                t.mode.unwrap_or(0o644),
                None,
            ),
        };
        let now = self.tick() as i64 * 1000;
        info.version = self.tick();
        info.size = data.len() as u64;
        info.mtime_ns = t.mtime_ns.unwrap_or(now);
        info.ctime_ns = now;
        if let Some(m) = t.mode {
            info.mode = m;
        }
        self.entries.lock().unwrap().insert(
            (owner.to_string(), info.id),
            Entry {
                info: info.clone(),
                data: data.to_vec(),
            },
        );
        Ok(info)
    }

    fn content(&self, owner: &str, path: &str) -> Option<Vec<u8>> {
        self.at(owner, path).map(|e| e.data)
    }

    fn info(&self, owner: &str, path: &str) -> FileInfo {
        self.at(owner, path).unwrap().info
    }

    /// Bytes received of streamed upload `id`.
    fn received(&self, id: u64) -> Result<u64, ClientError> {
        self.uploads
            .lock()
            .unwrap()
            .get(&id)
            .map(|(_, buf)| buf.len() as u64)
            .ok_or_else(|| remote_err(ErrorCode::NotFound))
    }

    fn check_upload(&self) -> Result<(), ClientError> {
        match *self.fail_uploads.lock().unwrap() {
            Some(code) => Err(remote_err(code)),
            None => Ok(()),
        }
    }
}

impl Remote for Fake {
    fn user(&self) -> &str {
        &self.user
    }
    async fn list_users(&self) -> Result<Vec<String>, ClientError> {
        Ok(self.users.clone())
    }
    async fn list(&self, owner: &str, dir: u64) -> Result<Vec<FileInfo>, ClientError> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        let _gate = self.list_gate.read().await;
        let mut out: Vec<FileInfo> = self
            .entries
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.info.owner == owner && e.info.parent == dir && e.info.id != ROOT_ID)
            .map(|e| e.info.clone())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
    async fn lookup(&self, owner: &str, parent: u64, name: &str) -> Result<FileInfo, ClientError> {
        self.stats.fetch_add(1, Ordering::Relaxed);
        self.find(owner, parent, name)
            .map(|e| e.info)
            .ok_or_else(|| remote_err(ErrorCode::NotFound))
    }
    async fn stat(&self, owner: &str, id: u64) -> Result<FileInfo, ClientError> {
        self.stats.fetch_add(1, Ordering::Relaxed);
        self.entries
            .lock()
            .unwrap()
            .get(&(owner.to_string(), id))
            .map(|e| e.info.clone())
            .ok_or_else(|| remote_err(ErrorCode::NotFound))
    }
    async fn open(
        &self,
        owner: &str,
        id: u64,
        head: u32,
    ) -> Result<(RemoteHandle, FileInfo, Bytes), ClientError> {
        let e = self
            .entries
            .lock()
            .unwrap()
            .get(&(owner.to_string(), id))
            .cloned()
            .ok_or_else(|| remote_err(ErrorCode::NotFound))?;
        if e.info.kind != EntryKind::File {
            return Err(remote_err(ErrorCode::IsADirectory));
        }
        self.opens
            .lock()
            .unwrap()
            .push((owner.into(), e.info.name.clone()));
        let h = self.tick();
        let d = e.data;
        let head = Bytes::copy_from_slice(&d[..d.len().min(head as usize)]);
        self.handles.lock().unwrap().insert(h, (d, e.info.clone()));
        Ok((
            RemoteHandle {
                id: h,
                generation: 1,
            },
            e.info,
            head,
        ))
    }
    async fn read(&self, h: RemoteHandle, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        let handles = self.handles.lock().unwrap();
        let (d, _) = handles
            .get(&h.id)
            .ok_or_else(|| remote_err(ErrorCode::ProtocolError))?;
        let start = (offset as usize).min(d.len());
        let end = (start + len as usize).min(d.len());
        self.read_bytes
            .fetch_add((end - start) as u64, Ordering::Relaxed);
        Ok(Bytes::copy_from_slice(&d[start..end]))
    }
    async fn close(&self, h: RemoteHandle) {
        self.handles.lock().unwrap().remove(&h.id);
    }
    async fn upload_file(
        &self,
        target: &UploadTarget,
        path: &Path,
    ) -> Result<FileInfo, ClientError> {
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.check_upload()?;
        let data = std::fs::read(path).map_err(ClientError::from)?;
        self.commit(&self.user.clone(), target, &data)
    }
    async fn upload_bytes(
        &self,
        target: &UploadTarget,
        data: Bytes,
    ) -> Result<FileInfo, ClientError> {
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.check_upload()?;
        self.count_lazy();
        self.commit(&self.user.clone(), target, &data)
    }
    async fn upload_begin(&self, target: &UploadTarget) -> Result<RemoteHandle, ClientError> {
        self.check_upload()?;
        let id = self.tick();
        self.uploads
            .lock()
            .unwrap()
            .insert(id, (target.clone(), Vec::new()));
        Ok(RemoteHandle { id, generation: 1 })
    }
    async fn upload_chunk(
        &self,
        h: RemoteHandle,
        offset: u64,
        data: Bytes,
    ) -> Result<(), ClientError> {
        {
            let mut left = self.restart_after_chunks.lock().unwrap();
            if let Some(n) = left.as_mut() {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    *left = None;
                    let synced = self.synced.lock().unwrap().clone();
                    for (id, (_, buf)) in self.uploads.lock().unwrap().iter_mut() {
                        buf.truncate(synced.get(id).copied().unwrap_or(0) as usize);
                    }
                    return Err(ClientError::Disconnected("server restarted".into()));
                }
            }
        }
        let mut ups = self.uploads.lock().unwrap();
        let (_, buf) = ups
            .get_mut(&h.id)
            .ok_or_else(|| remote_err(ErrorCode::ProtocolError))?;
        assert_eq!(buf.len() as u64, offset, "chunks out of order");
        buf.extend_from_slice(&data);
        Ok(())
    }
    async fn upload_sync(&self, h: RemoteHandle) -> Result<u64, ClientError> {
        if std::mem::take(&mut *self.let_go_next_sync.lock().unwrap()) {
            return Err(remote_err(ErrorCode::NotFound));
        }
        let len = self.received(h.id)?;
        self.synced.lock().unwrap().insert(h.id, len);
        Ok(len)
    }
    async fn upload_resume(&self, h: RemoteHandle) -> Result<(RemoteHandle, u64), ClientError> {
        let len = self.received(h.id)?;
        Ok((
            RemoteHandle {
                id: h.id,
                generation: h.generation + 1,
            },
            len,
        ))
    }
    async fn upload_read(
        &self,
        h: RemoteHandle,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, ClientError> {
        let ups = self.uploads.lock().unwrap();
        let (_, buf) = ups
            .get(&h.id)
            .ok_or_else(|| remote_err(ErrorCode::NotFound))?;
        let start = (offset as usize).min(buf.len());
        let end = (start + len as usize).min(buf.len());
        Ok(Bytes::copy_from_slice(&buf[start..end]))
    }
    async fn content_hash(&self, id: u64) -> Result<(u64, u64, String), ClientError> {
        let entries = self.entries.lock().unwrap();
        let e = entries
            .get(&(self.user.clone(), id))
            .ok_or_else(|| remote_err(ErrorCode::NotFound))?;
        Ok((
            e.info.version,
            e.data.len() as u64,
            blake3::hash(&e.data).to_hex().to_string(),
        ))
    }
    async fn upload_commit(
        &self,
        h: RemoteHandle,
        size: u64,
        blake3_hex: &str,
        mtime_ns: Option<i64>,
    ) -> Result<FileInfo, ClientError> {
        if std::mem::take(&mut *self.lose_upload_at_commit.lock().unwrap()) {
            self.uploads.lock().unwrap().remove(&h.id);
            return Err(ClientError::Disconnected("server restarted".into()));
        }
        let (mut target, data) = self
            .uploads
            .lock()
            .unwrap()
            .remove(&h.id)
            .ok_or_else(|| remote_err(ErrorCode::ProtocolError))?;
        assert_eq!(data.len() as u64, size);
        assert_eq!(blake3::hash(&data).to_hex().as_str(), blake3_hex);
        *self.streamed.lock().unwrap() += 1;
        target.mtime_ns = mtime_ns;
        let info = self.commit(&self.user.clone(), &target, &data)?;
        if std::mem::take(&mut *self.lose_commit_answer.lock().unwrap()) {
            return Err(ClientError::Disconnected("answer lost".into()));
        }
        Ok(info)
    }
    async fn upload_abort(&self, h: RemoteHandle) {
        self.uploads.lock().unwrap().remove(&h.id);
    }
    async fn mkdir(&self, parent: u64, name: &str, mode: u32) -> Result<FileInfo, ClientError> {
        self.count_lazy();
        if self.find(&self.user, parent, name).is_some() {
            return Err(remote_err(ErrorCode::Exists));
        }
        Ok(self.make(&self.user.clone(), parent, name, EntryKind::Dir, mode, None))
    }
    async fn symlink(
        &self,
        parent: u64,
        name: &str,
        target: &str,
    ) -> Result<FileInfo, ClientError> {
        self.count_lazy();
        if self.find(&self.user, parent, name).is_some() {
            return Err(remote_err(ErrorCode::Exists));
        }
        Ok(self.make(
            &self.user.clone(),
            parent,
            name,
            EntryKind::Symlink,
            0o777,
            Some(target),
        ))
    }
    async fn remove(&self, parent: u64, name: &str, dir: bool) -> Result<(), ClientError> {
        let e = self
            .find(&self.user, parent, name)
            .ok_or_else(|| remote_err(ErrorCode::NotFound))?;
        match (e.info.kind == EntryKind::Dir, dir) {
            (true, false) => return Err(remote_err(ErrorCode::IsADirectory)),
            (false, true) => return Err(remote_err(ErrorCode::NotADirectory)),
            _ => {}
        }
        let mut entries = self.entries.lock().unwrap();
        if dir
            && entries
                .values()
                .any(|c| c.info.owner == self.user && c.info.parent == e.info.id)
        {
            return Err(remote_err(ErrorCode::NotEmpty));
        }
        entries.remove(&(self.user.clone(), e.info.id));
        Ok(())
    }
    async fn rename(&self, mv: &Move) -> Result<FileInfo, ClientError> {
        let src = self
            .find(&self.user, mv.parent, &mv.name)
            .ok_or_else(|| remote_err(ErrorCode::NotFound))?;
        // Not into its own subtree.
        let mut up = mv.new_parent;
        while up != 0 {
            if up == src.info.id {
                return Err(remote_err(ErrorCode::InvalidArgument));
            }
            up = self
                .entries
                .lock()
                .unwrap()
                .get(&(self.user.clone(), up))
                .map_or(0, |e| e.info.parent);
        }
        if let Some(dst) = self.find(&self.user, mv.new_parent, &mv.new_name) {
            if dst.info.id == src.info.id {
                return Ok(src.info);
            }
            if mv.noreplace {
                return Err(remote_err(ErrorCode::Exists));
            }
            let dst_dir = dst.info.kind == EntryKind::Dir;
            let src_dir = src.info.kind == EntryKind::Dir;
            if dst_dir && !src_dir {
                return Err(remote_err(ErrorCode::IsADirectory));
            }
            if !dst_dir && src_dir {
                return Err(remote_err(ErrorCode::NotADirectory));
            }
            let mut entries = self.entries.lock().unwrap();
            if dst_dir
                && entries
                    .values()
                    .any(|c| c.info.owner == self.user && c.info.parent == dst.info.id)
            {
                return Err(remote_err(ErrorCode::NotEmpty));
            }
            entries.remove(&(self.user.clone(), dst.info.id));
        }
        let mut entries = self.entries.lock().unwrap();
        let e = entries.get_mut(&(self.user.clone(), src.info.id)).unwrap();
        e.info.parent = mv.new_parent;
        e.info.name = mv.new_name.clone();
        Ok(e.info.clone())
    }
    async fn setattr(&self, id: u64, change: AttrChange) -> Result<FileInfo, ClientError> {
        self.setattrs.fetch_add(1, Ordering::Relaxed);
        self.count_lazy();
        let mut entries = self.entries.lock().unwrap();
        let e = entries
            .get_mut(&(self.user.clone(), id))
            .ok_or_else(|| remote_err(ErrorCode::NotFound))?;
        if let Some(m) = change.mode {
            e.info.mode = m;
        }
        if let Some(t) = change.atime_ns {
            e.info.atime_ns = t;
        }
        if let Some(t) = change.mtime_ns {
            e.info.mtime_ns = t;
        }
        Ok(e.info.clone())
    }
    async fn statfs(&self) -> Result<Space, ClientError> {
        Ok(Space {
            total: 1 << 40,
            available: 1 << 39,
            used: 1 << 39,
            files: 1,
            quota_available: None,
        })
    }
    async fn sync(&self) -> Result<(), ClientError> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

struct Env {
    core: FsCore<Fake>,
    _cache: tempfile::TempDir,
}

fn env(user: &str) -> Env {
    let cache = tempfile::tempdir().unwrap();
    let core = FsCore::new(Fake::new(user), cache.path().to_path_buf()).unwrap();
    Env {
        core,
        _cache: cache,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn folder(core: &FsCore<Fake>, owner: &str) -> u64 {
    core.lookup(ROOT, owner).await.unwrap().ino
}

/// Creates `name` in `dir` with `data`, closes it (uploading it) and returns its attributes.
async fn written(core: &FsCore<Fake>, dir: u64, name: &str, data: &[u8]) -> Attr {
    let (attr, fh) = core.create(dir, name, 0o644).await.unwrap();
    core.write(fh, 0, data).await.unwrap();
    core.flush(fh).await.unwrap();
    core.release(fh).await.unwrap();
    attr
}

async fn read_all(core: &FsCore<Fake>, ino: u64) -> Vec<u8> {
    let o = core.open(ino, OpenMode::default()).await.unwrap();
    let mut out = Vec::new();
    loop {
        let d = core.read(o.fh, out.len() as u64, 128 * 1024).await.unwrap();
        if d.is_empty() {
            break;
        }
        out.extend_from_slice(&d);
    }
    core.release(o.fh).await.unwrap();
    out
}

#[test]
fn others_folders_and_root_refuse_writes() {
    rt().block_on(async {
        let e = env("bob");
        e.core.remote.put("alice", "f", b"data");
        let alice = folder(&e.core, "alice").await;
        let f = e.core.lookup(alice, "f").await.unwrap();
        assert_eq!(f.perm, 0o444);
        let w = OpenMode {
            write: true,
            truncate: false,
        };
        assert!(matches!(
            e.core.open(f.ino, w).await,
            Err(FsError::PermissionDenied)
        ));
        assert!(matches!(
            e.core.create(alice, "g", 0o644).await,
            Err(FsError::PermissionDenied)
        ));
        assert!(matches!(
            e.core.create(ROOT, "g", 0o644).await,
            Err(FsError::PermissionDenied)
        ));
        assert!(matches!(
            e.core.unlink(alice, "f").await,
            Err(FsError::PermissionDenied)
        ));
        let bob = folder(&e.core, "bob").await;
        assert!(matches!(
            e.core.rename(alice, "f", bob, "f", false).await,
            Err(FsError::PermissionDenied)
        ));
        assert!(matches!(
            e.core.setattr(f.ino, size(0), None).await,
            Err(FsError::PermissionDenied)
        ));
        assert!(matches!(
            e.core.mkdir(alice, "d", 0o755).await,
            Err(FsError::PermissionDenied)
        ));
        assert!(matches!(
            e.core.symlink(alice, "l", "f").await,
            Err(FsError::PermissionDenied)
        ));
        assert!(matches!(
            e.core.mkdir(ROOT, "d", 0o755).await,
            Err(FsError::PermissionDenied)
        ));
        let chmod = SetAttr {
            mode: Some(0o777),
            ..SetAttr::default()
        };
        assert!(matches!(
            e.core.setattr(f.ino, chmod, None).await,
            Err(FsError::PermissionDenied)
        ));
        assert!(e.core.access(f.ino, false, true, false).await.is_err());
        assert!(e.core.access(f.ino, true, false, false).await.is_ok());
        assert_eq!(e.core.remote.content("alice", "f").unwrap(), b"data");
    });
}

/// Directories, links, modes and times go lazily (answered before the server's
/// fdatasync); `close()`, `fsync()` and a directory's `fsync()` make them durable, with a
/// `sync` only when no upload did since. A new file is made by its first upload, which is
/// durable: it costs one request, and nothing lazy.
#[test]
fn lazy_changes_are_made_durable_at_close_and_fsync() {
    rt().block_on(async {
        let e = env("alice");
        let dir = folder(&e.core, "alice").await;
        let lazy = || e.core.remote.lazy_changes.load(Ordering::Relaxed);
        let syncs = || e.core.remote.syncs.load(Ordering::Relaxed);
        let puts = || e.core.remote.puts.load(Ordering::Relaxed);
        // A file written and closed: its upload is its create.
        written(&e.core, dir, "written", b"data").await;
        assert_eq!((lazy(), syncs(), puts()), (0, 0, 1));
        // An empty file closed (`touch`): made by its close, durably, in one request.
        let (_, fh) = e.core.create(dir, "empty", 0o644).await.unwrap();
        e.core.flush(fh).await.unwrap();
        assert_eq!((lazy(), syncs(), puts()), (0, 0, 2));
        assert_eq!(e.core.remote.content("alice", "empty").unwrap(), b"");
        // Its second close has nothing new to make durable.
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!((syncs(), puts()), (0, 2));
        // mkdir, symlink and chmod are lazy; a directory's fsync syncs them, once.
        let sub = e.core.mkdir(dir, "sub", 0o755).await.unwrap();
        e.core.symlink(sub.ino, "link", "../written").await.unwrap();
        let chmod = SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        };
        let f = e.core.lookup(dir, "written").await.unwrap();
        e.core.setattr(f.ino, chmod, None).await.unwrap();
        assert_eq!(lazy(), 3);
        e.core.fsync_dir().await.unwrap();
        e.core.fsync_dir().await.unwrap();
        assert_eq!(syncs(), 1);
        // A lazy change and then an upload: the upload covers it, no sync at close.
        e.core.mkdir(dir, "other", 0o755).await.unwrap();
        let (_, fh) = e.core.create(dir, "after", 0o644).await.unwrap();
        e.core.write(fh, 0, b"x").await.unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.fsync(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!((lazy(), syncs(), puts()), (4, 1, 3));
        // A mode and times set on a new file before its close go up with it.
        let (_, fh) = e.core.create(dir, "copied", 0o600).await.unwrap();
        e.core.write(fh, 0, b"y").await.unwrap();
        let times = SetAttr {
            mode: Some(0o640),
            mtime: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000)),
            ..SetAttr::default()
        };
        let f = e.core.lookup(dir, "copied").await.unwrap();
        e.core.setattr(f.ino, times, Some(fh)).await.unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        let info = e.core.remote.info("alice", "copied");
        assert_eq!((info.mode, info.mtime_ns), (0o640, 1_000_000_000_000_000));
        assert_eq!((lazy(), syncs(), puts()), (4, 1, 4));
    });
}

#[test]
fn upload_errors_reach_flush_with_their_kind() {
    rt().block_on(async {
        let e = env("alice");
        let dir = folder(&e.core, "alice").await;
        for (code, check) in [
            (
                ErrorCode::QuotaExceeded,
                (|e: &FsError| matches!(e, FsError::QuotaExceeded)) as fn(&FsError) -> bool,
            ),
            (ErrorCode::NoSpace, |e| matches!(e, FsError::NoSpace)),
            (ErrorCode::Internal, |e| matches!(e, FsError::Io(_))),
        ] {
            let (_, fh) = e.core.create(dir, "f", 0o644).await.unwrap();
            // Made on the server (fsync of a new file waits for it); its upload fails.
            e.core.fsync(fh).await.unwrap();
            *e.core.remote.fail_uploads.lock().unwrap() = Some(code);
            e.core.write(fh, 0, b"hello").await.unwrap();
            let err = e.core.flush(fh).await.unwrap_err();
            assert!(check(&err), "{code:?} became {err:?}");
            // The last release does not try again: nobody would hear of its outcome.
            *e.core.remote.fail_uploads.lock().unwrap() = None;
            e.core.release(fh).await.unwrap();
            assert_eq!(e.core.remote.content("alice", "f").unwrap(), b"");
        }
        // Every failed upload kept its data.
        let kept = std::fs::read_dir(e._cache.path().join("failed"))
            .unwrap()
            .count();
        assert_eq!(kept, 3);
        // Two closes of one open file (a forked child's, then its parent's): the first
        // fails, and the second tries again instead of reporting success for data that
        // never went up.
        let (_, fh) = e.core.create(dir, "f", 0o644).await.unwrap();
        *e.core.remote.fail_uploads.lock().unwrap() = Some(ErrorCode::Internal);
        e.core.write(fh, 0, b"hello").await.unwrap();
        assert!(e.core.flush(fh).await.is_err());
        assert!(e.core.flush(fh).await.is_err());
        *e.core.remote.fail_uploads.lock().unwrap() = None;
        e.core.flush(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "f").unwrap(), b"hello");
        e.core.release(fh).await.unwrap();
        let (_, fh) = e.core.create(dir, "f", 0o644).await.unwrap();
        e.core.write(fh, 0, b"hello").await.unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "f").unwrap(), b"hello");
        // A failed fsync is the caller's answer too: the release does not try again, and
        // the new content is kept locally.
        *e.core.remote.fail_uploads.lock().unwrap() = Some(ErrorCode::Internal);
        let fh = e
            .core
            .open(
                e.core.lookup(dir, "f").await.unwrap().ino,
                OpenMode {
                    write: true,
                    truncate: true,
                },
            )
            .await
            .unwrap()
            .fh;
        e.core.write(fh, 0, b"synced?").await.unwrap();
        assert!(e.core.fsync(fh).await.is_err());
        *e.core.remote.fail_uploads.lock().unwrap() = None;
        e.core.release(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "f").unwrap(), b"hello");
        let kept = std::fs::read_dir(e._cache.path().join("failed"))
            .unwrap()
            .filter(|k| std::fs::read(k.as_ref().unwrap().path()).unwrap() == b"synced?")
            .count();
        assert_eq!(kept, 1);
    });
}

/// The server's push that an entry is now `file`.
fn changed(core: &FsCore<Fake>, file: FileInfo) -> Vec<Invalidation> {
    core.handle_event(&Event::Changed {
        owner: file.owner.clone(),
        file,
        from: None,
    })
}

/// The server's push that the entry `file` was removed.
fn removed(core: &FsCore<Fake>, file: &FileInfo) -> Vec<Invalidation> {
    core.handle_event(&Event::Removed {
        owner: file.owner.clone(),
        id: file.id,
        parent: file.parent,
        name: file.name.clone(),
    })
}

/// A truncation to `n` bytes.
fn size(n: u64) -> SetAttr {
    SetAttr {
        size: Some(n),
        ..SetAttr::default()
    }
}

/// Lets spawned tasks (a listing prefetch) run until `done` holds.
async fn settle(done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("background work did not settle");
}

#[test]
fn repeated_lookups_fetch_the_listing_with_changes_in_flight_replayed_onto_it() {
    rt().block_on(async {
        let e = env("bob");
        for i in 0..20 {
            e.core.remote.put("alice", &format!("f{i}"), b"x");
        }
        let alice = folder(&e.core, "alice").await;
        let base = e.core.remote.stats.load(Ordering::Relaxed);
        let stats = || e.core.remote.stats.load(Ordering::Relaxed) - base;
        let lists = || e.core.remote.lists.load(Ordering::Relaxed);
        // A few lookups (one of a name that does not exist) each ask the server.
        for i in 0..LISTING_AFTER_MISSES - 1 {
            e.core.lookup(alice, &format!("f{i}")).await.unwrap();
        }
        assert!(matches!(
            e.core.lookup(alice, "missing").await,
            Err(FsError::NotFound)
        ));
        assert_eq!(stats(), LISTING_AFTER_MISSES as u64);
        // That last one started a listing; the folder changes while it is in flight (the
        // server may have listed it before): the change is replayed onto what it brings.
        let gate = e.core.remote.list_gate.write().await;
        settle(|| lists() == 1).await;
        let late = e.core.remote.put("alice", "late", b"y");
        let f0 = e.core.remote.info("alice", "f0");
        changed(&e.core, late.clone());
        // The fake server's listing is to be the one from before both.
        e.core
            .remote
            .entries
            .lock()
            .unwrap()
            .remove(&("alice".to_string(), late.id));
        removed(&e.core, &f0);
        drop(gate);
        settle(|| e.core.listings().in_flight() == 0).await;
        assert_eq!(lists(), 1);
        let asked = stats();
        // From here lookups, of names that exist or not, are answered from the listing.
        assert!(matches!(
            e.core.lookup(alice, "f0").await,
            Err(FsError::NotFound)
        ));
        for i in 1..20 {
            e.core.lookup(alice, &format!("f{i}")).await.unwrap();
        }
        assert!(matches!(
            e.core.lookup(alice, "nope").await,
            Err(FsError::NotFound)
        ));
        assert_eq!(e.core.lookup(alice, "late").await.unwrap().size, 1);
        assert_eq!(stats(), asked);
        // Changes pushed by the server keep it current.
        let later = e.core.remote.put("alice", "later", b"zz");
        changed(&e.core, later);
        assert_eq!(e.core.lookup(alice, "later").await.unwrap().size, 2);
        assert_eq!(stats(), asked);
    });
}

/// After one's own file is uploaded, the kernel's pages of it are that version's: the next
/// open keeps them, until the file changes elsewhere.
#[test]
fn pages_written_here_are_kept_for_the_version_they_became() {
    rt().block_on(async {
        let e = env("alice");
        let dir = folder(&e.core, "alice").await;
        let attr = written(&e.core, dir, "f", b"mine").await;
        let o = e.core.open(attr.ino, OpenMode::default()).await.unwrap();
        assert!(o.keep_cache, "the pages are the uploaded version's");
        e.core.release(o.fh).await.unwrap();
        let info = e.core.remote.put("alice", "f", b"theirs");
        let inv = changed(&e.core, info);
        assert!(
            inv.contains(&Invalidation::Inode { ino: attr.ino }),
            "{inv:?}"
        );
        let o = e.core.open(attr.ino, OpenMode::default()).await.unwrap();
        assert!(!o.keep_cache, "changed elsewhere: pages must go");
        e.core.release(o.fh).await.unwrap();
    });
}

/// `utimes` or `chmod` through a descriptor reading the file (`File::open` then
/// `set_modified`): the attributes shown are the new ones at once, not those of the
/// version as it was opened.
#[test]
fn own_times_set_through_a_reading_descriptor_show_at_once() {
    rt().block_on(async {
        let e = env("alice");
        let dir = folder(&e.core, "alice").await;
        let attr = written(&e.core, dir, "f", b"mine").await;
        let o = e.core.open(attr.ino, OpenMode::default()).await.unwrap();
        let then = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let set = SetAttr {
            mtime: Some(then),
            mode: Some(0o600),
            ..SetAttr::default()
        };
        let shown = e.core.setattr(attr.ino, set, Some(o.fh)).await.unwrap();
        assert_eq!((shown.mtime, shown.perm), (then, 0o600));
        let now = e.core.getattr(attr.ino).await.unwrap();
        assert_eq!((now.mtime, now.perm), (then, 0o600));
        e.core.release(o.fh).await.unwrap();
    });
}

/// Writing one's own file while a descriptor here still reads an earlier version of it:
/// the kernel's pages are then a mix of both, and go after the reader's last close.
#[test]
fn pages_written_while_an_earlier_version_is_read_here_go_after_it_closes() {
    rt().block_on(async {
        let e = env("alice");
        let later = Arc::new(Mutex::new(Vec::new()));
        let sink = later.clone();
        e.core
            .on_invalidation(move |inv| sink.lock().unwrap().push(inv));
        let dir = folder(&e.core, "alice").await;
        let (attr, fh) = e.core.create(dir, "f", 0o644).await.unwrap();
        e.core.telling(&attr, true);
        e.core.write(fh, 0, b"one").await.unwrap();
        e.core.release(fh).await.unwrap();
        let reader = e.core.open(attr.ino, OpenMode::default()).await.unwrap();
        assert!(reader.keep_cache && reader.refresh_attrs, "{reader:?}");
        // The kernel asks for the attributes it dropped: the version open.
        e.core
            .telling(&e.core.getattr(attr.ino).await.unwrap(), false);
        let write = OpenMode {
            write: true,
            truncate: true,
        };
        let w = e.core.open(attr.ino, write).await.unwrap();
        e.core.write(w.fh, 0, b"second").await.unwrap();
        e.core.flush(w.fh).await.unwrap();
        e.core.release(w.fh).await.unwrap();
        assert_eq!(e.core.read(reader.fh, 0, 10).await.unwrap(), &b"one"[..]);
        assert!(later.lock().unwrap().is_empty());
        e.core.release(reader.fh).await.unwrap();
        assert_eq!(
            *later.lock().unwrap(),
            [Invalidation::Inode { ino: attr.ino }]
        );
        let o = e.core.open(attr.ino, OpenMode::default()).await.unwrap();
        assert!(!o.keep_cache && o.refresh_attrs, "{o:?}");
        assert_eq!(e.core.read(o.fh, 0, 10).await.unwrap(), &b"second"[..]);
        e.core.release(o.fh).await.unwrap();
    });
}

#[test]
fn every_open_reaches_the_server_and_cache_is_kept_per_version() {
    rt().block_on(async {
        let e = env("bob");
        e.core.remote.put("alice", "f", b"one");
        let alice = folder(&e.core, "alice").await;
        let f = e.core.lookup(alice, "f").await.unwrap();
        let o1 = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(!o1.keep_cache);
        e.core.release(o1.fh).await.unwrap();
        let o2 = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(o2.keep_cache, "same version: pages may stay");
        e.core.release(o2.fh).await.unwrap();
        let info = e.core.remote.put("alice", "f", b"two");
        let inv = changed(&e.core, info);
        assert!(inv.contains(&Invalidation::Inode { ino: f.ino }), "{inv:?}");
        // The name still leads to the same entry: the kernel's dentry stays.
        assert!(!inv.contains(&Invalidation::Entry {
            parent: alice,
            name: "f".into()
        }));
        let o3 = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(!o3.keep_cache, "new version: pages must go");
        assert_eq!(e.core.read(o3.fh, 0, 10).await.unwrap(), &b"two"[..]);
        e.core.release(o3.fh).await.unwrap();
        assert_eq!(e.core.remote.opens.lock().unwrap().len(), 3);
    });
}

/// An open makes the kernel drop a file's attributes only when it may hold another
/// version's size; once the kernel has given back every lookup of the inode it holds none.
/// An open of a version already open waits for the refresh of the open before it.
#[test]
fn an_open_drops_the_kernels_size_only_when_it_may_be_another_versions() {
    rt().block_on(async {
        let e = env("bob");
        e.core.remote.put("alice", "f", b"one");
        let alice = folder(&e.core, "alice").await;
        let f = e.core.lookup(alice, "f").await.unwrap();
        e.core.telling(&f, true);
        let refreshes = |o: &Opened| o.refresh_attrs;
        let o = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(!refreshes(&o), "told this version's size: {o:?}");
        e.core.release(o.fh).await.unwrap();

        // Replaced while nothing is open: the kernel may still hold the old size.
        let info = e.core.remote.put("alice", "f", b"three");
        changed(&e.core, info);
        let o = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(refreshes(&o), "{o:?}");
        // Opened again before that refresh landed: it waits for it, behind it.
        let o2 = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(refreshes(&o2) && o2.keep_cache, "{o2:?}");
        e.core.refresh_landed(f.ino);
        let o3 = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(!refreshes(&o3) && o3.keep_cache, "{o3:?}");
        assert_eq!(e.core.read(o.fh, 0, 100).await.unwrap(), &b"three"[..]);
        for fh in [o.fh, o2.fh, o3.fh] {
            e.core.release(fh).await.unwrap();
        }
        // Dropped, then told the new size only.
        let again = e.core.lookup(alice, "f").await.unwrap();
        e.core.telling(&again, true);
        let o = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(!refreshes(&o), "{o:?}");
        e.core.release(o.fh).await.unwrap();

        // The kernel gave back both lookups: it holds nothing of the file.
        let info = e.core.remote.put("alice", "f", b"four!!");
        changed(&e.core, info);
        e.core.forget(f.ino, 1);
        let o = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(refreshes(&o), "one lookup still held: {o:?}");
        e.core.release(o.fh).await.unwrap();
        let info = e.core.remote.put("alice", "f", b"five!!!");
        changed(&e.core, info);
        e.core.forget(f.ino, 1);
        // A reply carrying attributes is under way: its size is not recorded yet.
        let replying = e.core.attr_reply();
        let o = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(refreshes(&o), "{o:?}");
        e.core.release(o.fh).await.unwrap();
        drop(replying);
        let o = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(!refreshes(&o), "{o:?}");
        assert_eq!(e.core.read(o.fh, 0, 100).await.unwrap(), &b"five!!!"[..]);
        e.core.release(o.fh).await.unwrap();
        // A refresh the kernel did not apply in time: the next open asks again.
        e.core.refresh_failed(f.ino);
        let o = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(refreshes(&o), "{o:?}");
        e.core.release(o.fh).await.unwrap();
    });
}

/// While a version is open for reading through the kernel's cache, the kernel keeps
/// seeing that version: attributes report it, a change elsewhere drops its attributes and
/// pages only after the last close, and an open of the new version meanwhile reads past
/// the cache.
#[test]
fn a_version_open_through_the_cache_stays_the_kernels_until_its_last_close() {
    rt().block_on(async {
        let e = env("bob");
        let later = Arc::new(Mutex::new(Vec::new()));
        let sink = later.clone();
        e.core
            .on_invalidation(move |inv| sink.lock().unwrap().push(inv));
        e.core.remote.put("alice", "f", b"long version");
        let alice = folder(&e.core, "alice").await;
        let f = e.core.lookup(alice, "f").await.unwrap();
        // The kernel holds the size of the version it opens: nothing to drop.
        e.core.telling(&f, true);
        let o1 = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(!o1.refresh_attrs && !o1.direct && !o1.keep_cache, "{o1:?}");

        let info = e.core.remote.put("alice", "f", b"short");
        let inv = changed(&e.core, info);
        assert!(
            !inv.contains(&Invalidation::Inode { ino: f.ino }),
            "{inv:?}"
        );
        let pinned = e.core.getattr(f.ino).await.unwrap();
        assert_eq!(pinned.size, 12);
        e.core.telling(&pinned, false);
        assert_eq!(e.core.lookup(alice, "f").await.unwrap().size, 12);
        let o2 = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(
            o2.direct && !o2.refresh_attrs && o2.content.is_none(),
            "{o2:?}"
        );
        assert_eq!(e.core.read(o2.fh, 0, 100).await.unwrap(), &b"short"[..]);
        assert_eq!(
            e.core.read(o1.fh, 0, 100).await.unwrap(),
            &b"long version"[..]
        );
        e.core.release(o2.fh).await.unwrap();
        assert!(later.lock().unwrap().is_empty());

        e.core.release(o1.fh).await.unwrap();
        assert_eq!(*later.lock().unwrap(), [Invalidation::Inode { ino: f.ino }]);
        // Told after the queued invalidation, before the kernel applied it: it may hold
        // either size, so the open makes it drop whichever.
        let now = e.core.getattr(f.ino).await.unwrap();
        assert_eq!(now.size, 5);
        e.core.telling(&now, false);
        let o3 = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(o3.refresh_attrs && !o3.direct && !o3.keep_cache, "{o3:?}");
        assert_eq!(e.core.read(o3.fh, 0, 100).await.unwrap(), &b"short"[..]);
        // A second descriptor of the same version shares the cache as it is, once the
        // first's refresh landed.
        e.core.refresh_landed(f.ino);
        let o4 = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(o4.keep_cache && !o4.refresh_attrs && !o4.direct, "{o4:?}");
        e.core.release(o3.fh).await.unwrap();
        e.core.release(o4.fh).await.unwrap();
        assert_eq!(later.lock().unwrap().len(), 1, "unchanged: nothing to drop");
    });
}

/// The kernel's size of a file may still be an earlier version's when an open pins a
/// shorter one: the first short read of the new version is what brings it down, and the
/// kernel skips that if the inode's attributes change while the read is under way (the
/// read then returns the short content padded with zeros up to the old size). So the
/// server's late word about the very version pinned (its event arriving after the open
/// that got it), or about new attributes of it, drops nothing from the kernel until the
/// last close.
#[test]
fn events_about_a_pinned_version_leave_the_kernels_attributes_until_its_last_close() {
    rt().block_on(async {
        let e = env("bob");
        let later = Arc::new(Mutex::new(Vec::new()));
        let sink = later.clone();
        e.core
            .on_invalidation(move |inv| sink.lock().unwrap().push(inv));
        e.core.remote.put("alice", "f", &[b'a'; 300]);
        let alice = folder(&e.core, "alice").await;
        let f = e.core.lookup(alice, "f").await.unwrap();
        e.core.telling(&f, true);
        assert_eq!(read_all(&e.core, f.ino).await.len(), 300);

        // Replaced on the server; the open gets the new version before its event.
        let short = e.core.remote.put("alice", "f", &[b'b'; 100]);
        let o = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(o.refresh_attrs && !o.direct && !o.keep_cache, "{o:?}");
        let touches = |inv: &[Invalidation]| {
            inv.iter().any(|i| {
                matches!(i, Invalidation::Inode { ino } | Invalidation::Attr { ino } if *ino == f.ino)
            })
        };
        let inv = changed(&e.core, short.clone());
        assert!(!touches(&inv), "the pinned version's own event: {inv:?}");
        assert_eq!(e.core.getattr(f.ino).await.unwrap().size, 100);

        // New attributes of the same version: reported, but dropped from the kernel only
        // after the last close.
        let mut chmod = short.clone();
        chmod.mode = 0o600;
        let inv = changed(&e.core, chmod.clone());
        assert!(!touches(&inv), "a mode of the pinned version: {inv:?}");
        let attr = e.core.getattr(f.ino).await.unwrap();
        assert_eq!((attr.size, attr.perm), (100, 0o400));
        assert_eq!(e.core.read(o.fh, 0, 4096).await.unwrap(), &[b'b'; 100][..]);
        assert!(later.lock().unwrap().is_empty());
        e.core.release(o.fh).await.unwrap();
        assert_eq!(*later.lock().unwrap(), [Invalidation::Attr { ino: f.ino }]);

        // Nothing open: the same news drops the attributes at once, and keeps the pages.
        let inv = changed(&e.core, chmod);
        assert!(inv.contains(&Invalidation::Attr { ino: f.ino }), "{inv:?}");
        assert!(!inv.contains(&Invalidation::Inode { ino: f.ino }), "{inv:?}");
        let o = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        assert!(o.keep_cache, "{o:?}");
        e.core.release(o.fh).await.unwrap();
    });
}

#[test]
fn reads_prefetch_sequentially_and_fetch_only_what_random_reads_ask() {
    rt().block_on(async {
        let e = env("bob");
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        e.core.remote.put("alice", "big", &data);
        let alice = folder(&e.core, "alice").await;
        let f = e.core.lookup(alice, "big").await.unwrap();
        assert_eq!(read_all(&e.core, f.ino).await, data);
        let o = e.core.open(f.ino, OpenMode::default()).await.unwrap();
        for off in [4_999_990u64, 17, 3_000_000, 1 << 20] {
            let d = e.core.read(o.fh, off, 4096).await.unwrap();
            let end = (off as usize + 4096).min(data.len());
            assert_eq!(&d[..], &data[off as usize..end]);
        }
        e.core.release(o.fh).await.unwrap();
    });
}

#[derive(Debug, Clone)]
enum Op {
    Create(usize, Vec<u8>),
    Append(usize, Vec<u8>),
    WriteAt(usize, u16, Vec<u8>),
    Truncate(usize, u16),
    Rename(usize, usize),
    Unlink(usize),
}

const NAMES: [&str; 3] = ["a", "b", "c"];

fn op() -> impl Strategy<Value = Op> {
    let data = || prop::collection::vec(any::<u8>(), 0..300);
    let n = || 0..NAMES.len();
    prop_oneof![
        (n(), data()).prop_map(|(i, d)| Op::Create(i, d)),
        (n(), data()).prop_map(|(i, d)| Op::Append(i, d)),
        (n(), 0u16..600, data()).prop_map(|(i, o, d)| Op::WriteAt(i, o, d)),
        (n(), 0u16..600).prop_map(|(i, l)| Op::Truncate(i, l)),
        (n(), n()).prop_map(|(a, b)| Op::Rename(a, b)),
        n().prop_map(Op::Unlink),
    ]
}

/// Applies `op` to the core the way the kernel would for the matching syscalls, and to
/// the model; errors must match too (ENOENT for missing files).
async fn apply(core: &FsCore<Fake>, dir: u64, model: &mut BTreeMap<String, Vec<u8>>, op: &Op) {
    let write_mode = OpenMode {
        write: true,
        truncate: false,
    };
    match op {
        Op::Create(i, d) => {
            let (_, fh) = core.create(dir, NAMES[*i], 0o644).await.unwrap();
            core.write(fh, 0, d).await.unwrap();
            core.flush(fh).await.unwrap();
            core.release(fh).await.unwrap();
            model.insert(NAMES[*i].into(), d.clone());
        }
        Op::Append(i, d) | Op::WriteAt(i, _, d) => {
            let found = core.lookup(dir, NAMES[*i]).await;
            let Some(m) = model.get_mut(NAMES[*i]) else {
                assert!(matches!(found, Err(FsError::NotFound)), "{found:?}");
                return;
            };
            let attr = found.unwrap();
            let off = match op {
                Op::WriteAt(_, o, _) => *o as usize,
                _ => m.len(),
            };
            let o = core.open(attr.ino, write_mode).await.unwrap();
            core.write(o.fh, off as u64, d).await.unwrap();
            core.flush(o.fh).await.unwrap();
            core.release(o.fh).await.unwrap();
            // As pwrite(2): an empty write changes nothing, not even the size.
            if d.is_empty() {
                return;
            }
            if m.len() < off + d.len() {
                m.resize(off + d.len(), 0);
            }
            m[off..off + d.len()].copy_from_slice(d);
        }
        Op::Truncate(i, len) => {
            let found = core.lookup(dir, NAMES[*i]).await;
            let Some(m) = model.get_mut(NAMES[*i]) else {
                assert!(matches!(found, Err(FsError::NotFound)));
                return;
            };
            core.setattr(found.unwrap().ino, size(*len as u64), None)
                .await
                .unwrap();
            m.resize(*len as usize, 0);
        }
        Op::Rename(a, b) => {
            let r = core.rename(dir, NAMES[*a], dir, NAMES[*b], false).await;
            match model.remove(NAMES[*a]) {
                Some(d) => {
                    r.unwrap();
                    model.insert(NAMES[*b].into(), d);
                }
                None => assert!(matches!(r, Err(FsError::NotFound)), "{r:?}"),
            }
        }
        Op::Unlink(i) => {
            let r = core.unlink(dir, NAMES[*i]).await;
            match model.remove(NAMES[*i]) {
                Some(_) => r.unwrap(),
                None => assert!(matches!(r, Err(FsError::NotFound)), "{r:?}"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// After every operation the mount's listing and content, and the server's content,
    /// equal a plain in-memory model of the folder.
    #[test]
    fn random_operation_sequences_match_a_model(ops in prop::collection::vec(op(), 1..25)) {
        rt().block_on(async {
            let e = env("alice");
            let dir = folder(&e.core, "alice").await;
            let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for op in &ops {
                apply(&e.core, dir, &mut model, op).await;
                let listed: BTreeMap<String, u64> = e.core.list(dir).await.unwrap()
                    .into_iter().map(|d| (d.name, d.attr.size)).collect();
                let want: BTreeMap<String, u64> = model.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect();
                assert_eq!(listed, want, "after {op:?}");
                for (name, data) in &model {
                    assert_eq!(&e.core.remote.content("alice", name).unwrap(), data, "server, {name} after {op:?}");
                    let ino = e.core.lookup(dir, name).await.unwrap().ino;
                    assert_eq!(&read_all(&e.core, ino).await, data, "mount, {name} after {op:?}");
                }
            }
            // Nothing staged is left behind.
            assert_eq!(std::fs::read_dir(e.core.staging.dir()).unwrap().count(), 0);
        });
    }
}

#[test]
fn sequential_writes_stream_and_anything_else_falls_back_to_the_staged_file() {
    rt().block_on(async {
        let e = env("alice");
        let dir = folder(&e.core, "alice").await;
        let data: Vec<u8> = (0..3_500_000u32).map(|i| (i % 253) as u8).collect();
        let (_, fh) = e.core.create(dir, "seq", 0o644).await.unwrap();
        for (i, chunk) in data.chunks(128 * 1024).enumerate() {
            e.core
                .write(fh, (i * 128 * 1024) as u64, chunk)
                .await
                .unwrap();
        }
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(
            *e.core.remote.streamed.lock().unwrap(),
            1,
            "sequential file not streamed"
        );
        assert_eq!(e.core.remote.content("alice", "seq").unwrap(), data);

        // A write out of order ends the stream; the content is still right.
        let (_, fh) = e.core.create(dir, "jumpy", 0o644).await.unwrap();
        e.core.write(fh, 0, &data[..2_000_000]).await.unwrap();
        e.core.write(fh, 100, b"patched").await.unwrap();
        e.core
            .write(fh, 2_000_000, &data[2_000_000..])
            .await
            .unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        let mut want = data.clone();
        want[100..107].copy_from_slice(b"patched");
        assert_eq!(e.core.remote.content("alice", "jumpy").unwrap(), want);
        assert_eq!(*e.core.remote.streamed.lock().unwrap(), 1);
        assert!(
            e.core.remote.uploads.lock().unwrap().is_empty(),
            "aborted stream left an upload"
        );

        // Setting the final size first (fio, some copiers) keeps the stream, and so does
        // opening an existing empty file without O_TRUNC.
        let (attr, fh) = e.core.create(dir, "sized", 0o644).await.unwrap();
        e.core
            .setattr(attr.ino, size(data.len() as u64), Some(fh))
            .await
            .unwrap();
        for (i, chunk) in data.chunks(1 << 20).enumerate() {
            e.core.write(fh, (i << 20) as u64, chunk).await.unwrap();
        }
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "sized").unwrap(), data);
        assert_eq!(
            *e.core.remote.streamed.lock().unwrap(),
            2,
            "sized file not streamed"
        );
        e.core.remote.put("alice", "empty", b"");
        let ino = e.core.lookup(dir, "empty").await.unwrap().ino;
        let o = e
            .core
            .open(
                ino,
                OpenMode {
                    write: true,
                    truncate: false,
                },
            )
            .await
            .unwrap();
        for (i, chunk) in data.chunks(1 << 20).enumerate() {
            e.core.write(o.fh, (i << 20) as u64, chunk).await.unwrap();
        }
        e.core.flush(o.fh).await.unwrap();
        e.core.release(o.fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "empty").unwrap(), data);
        assert_eq!(
            *e.core.remote.streamed.lock().unwrap(),
            3,
            "empty file not streamed"
        );

        // A failing stream falls back and reports the server's error if that fails too.
        let (_, fh) = e.core.create(dir, "over", 0o644).await.unwrap();
        *e.core.remote.fail_uploads.lock().unwrap() = Some(ErrorCode::QuotaExceeded);
        e.core.write(fh, 0, &data).await.unwrap();
        assert!(matches!(
            e.core.flush(fh).await,
            Err(FsError::QuotaExceeded)
        ));
        let _ = e.core.release(fh).await;
    });
}

/// A streamed file is not staged: its bytes live in the stream's window until the server
/// syncs them; a "server restart" mid-stream is resumed from what it synced, a commit
/// whose answer is lost is found made by its hash, and reads, writes out of sequence and
/// truncations bring the streamed bytes back first.
#[test]
fn streams_keep_only_what_is_not_durable_and_resume() {
    use std::os::unix::fs::MetadataExt;
    rt().block_on(async {
        let e = env("alice");
        let dir = folder(&e.core, "alice").await;
        let data: Vec<u8> = (0..20_000_000u32).map(|i| (i % 251) as u8).collect();
        let write_all = |fh: u64, data: Vec<u8>| {
            let core = &e.core;
            async move {
                for (i, chunk) in data.chunks(1 << 20).enumerate() {
                    core.write(fh, (i << 20) as u64, chunk).await.unwrap();
                }
            }
        };
        let staged_bytes = || -> u64 {
            std::fs::read_dir(e.core.staging.dir())
                .unwrap()
                .map(|f| f.unwrap().metadata().unwrap().blocks() * 512)
                .sum()
        };

        // The server restarts after 13 chunks (it synced 8 MiB of them): resumed.
        *e.core.remote.restart_after_chunks.lock().unwrap() = Some(13);
        let (_, fh) = e.core.create(dir, "big", 0o644).await.unwrap();
        write_all(fh, data.clone()).await;
        assert!(staged_bytes() < 2 << 20, "a stream staged its bytes");
        e.core.flush(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "big").unwrap(), data);
        // Read back through the same descriptor: from the version just committed.
        let back = e.core.read(fh, 5 << 20, 1000).await.unwrap();
        assert_eq!(&back[..], &data[5 << 20..(5 << 20) + 1000]);
        e.core.release(fh).await.unwrap();
        assert!(e.core.remote.restart_after_chunks.lock().unwrap().is_none());

        // A sync finds the upload let go (the writer paused too long): resumed.
        *e.core.remote.let_go_next_sync.lock().unwrap() = true;
        let (_, fh) = e.core.create(dir, "paused", 0o644).await.unwrap();
        write_all(fh, data.clone()).await;
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "paused").unwrap(), data);
        assert!(!*e.core.remote.let_go_next_sync.lock().unwrap());

        // The commit is made but its answer lost: found by its hash.
        *e.core.remote.lose_commit_answer.lock().unwrap() = true;
        let (_, fh) = e.core.create(dir, "lost", 0o644).await.unwrap();
        write_all(fh, data[..3_000_000].to_vec()).await;
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(
            e.core.remote.content("alice", "lost").unwrap(),
            &data[..3_000_000]
        );

        // The server dies before it made any of an upload durable: begun again.
        *e.core.remote.lose_upload_at_commit.lock().unwrap() = true;
        let (_, fh) = e.core.create(dir, "again", 0o644).await.unwrap();
        write_all(fh, data[..3_000_000].to_vec()).await;
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(
            e.core.remote.content("alice", "again").unwrap(),
            &data[..3_000_000]
        );
        assert!(!*e.core.remote.lose_upload_at_commit.lock().unwrap());

        // A read, a patch before the end and a cut into the stream each bring the
        // streamed bytes back; the result is right.
        let (attr, fh) = e.core.create(dir, "mixed", 0o644).await.unwrap();
        write_all(fh, data[..4_000_000].to_vec()).await;
        let back = e.core.read(fh, 1_000_000, 10).await.unwrap();
        assert_eq!(&back[..], &data[1_000_000..1_000_010]);
        e.core
            .write(fh, 4_000_000, &data[4_000_000..6_000_000])
            .await
            .unwrap();
        e.core.write(fh, 10, b"patch").await.unwrap();
        e.core
            .setattr(attr.ino, size(5_000_000), Some(fh))
            .await
            .unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        let mut want = data[..5_000_000].to_vec();
        want[10..15].copy_from_slice(b"patch");
        assert_eq!(e.core.remote.content("alice", "mixed").unwrap(), want);
        let (_, fh) = e.core.create(dir, "cut", 0o644).await.unwrap();
        write_all(fh, data[..3_000_000].to_vec()).await;
        let ino = e.core.lookup(dir, "cut").await.unwrap().ino;
        e.core
            .setattr(ino, size(1_500_000), Some(fh))
            .await
            .unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(
            e.core.remote.content("alice", "cut").unwrap(),
            &data[..1_500_000]
        );
        assert!(
            e.core.remote.uploads.lock().unwrap().is_empty(),
            "a recalled stream left its upload"
        );
        assert_eq!(std::fs::read_dir(e.core.staging.dir()).unwrap().count(), 0);
    });
}

#[test]
fn opening_without_truncate_fetches_only_what_is_not_overwritten() {
    rt().block_on(async {
        let e = env("alice");
        let dir = folder(&e.core, "alice").await;
        let old: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let new: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
        let remote = &e.core.remote;
        let reads = || remote.read_bytes.load(Ordering::Relaxed);
        remote.put("alice", "big", &old);
        let write = OpenMode {
            write: true,
            truncate: false,
        };

        // Rewritten whole from byte 0: nothing of the old version is downloaded.
        let ino = e.core.lookup(dir, "big").await.unwrap().ino;
        let o = e.core.open(ino, write).await.unwrap();
        for (i, chunk) in new.chunks(1 << 20).enumerate() {
            e.core.write(o.fh, (i << 20) as u64, chunk).await.unwrap();
        }
        e.core.flush(o.fh).await.unwrap();
        e.core.release(o.fh).await.unwrap();
        assert_eq!(reads(), 0, "a full rewrite downloaded the old version");
        assert_eq!(remote.content("alice", "big").unwrap(), new);
        assert!(
            remote.handles.lock().unwrap().is_empty(),
            "base handle left open"
        );

        // A rewritten prefix keeps the old tail, fetched at close.
        let o = e.core.open(ino, write).await.unwrap();
        e.core.write(o.fh, 0, &old[..1_000_000]).await.unwrap();
        e.core.flush(o.fh).await.unwrap();
        e.core.release(o.fh).await.unwrap();
        let mut want = old[..1_000_000].to_vec();
        want.extend_from_slice(&new[1_000_000..]);
        assert_eq!(remote.content("alice", "big").unwrap(), want);
        assert!(
            reads() <= 2_000_000 + (1 << 20),
            "fetched {} bytes",
            reads()
        );

        // A write past the prefix, a read of unwritten bytes and a truncate all see the
        // old content where nothing was written.
        let before = reads();
        let o = e.core.open(ino, write).await.unwrap();
        e.core.write(o.fh, 10, b"head").await.unwrap();
        e.core.write(o.fh, 2_500_000, b"tail").await.unwrap();
        assert!(
            reads() > before,
            "write past the prefix did not fetch the base"
        );
        let got = e.core.read(o.fh, 0, 20).await.unwrap();
        let mut expect = want[..20].to_vec();
        expect[10..14].copy_from_slice(b"head");
        assert_eq!(&got[..], &expect[..]);
        e.core
            .setattr(ino, size(2_500_002), Some(o.fh))
            .await
            .unwrap();
        e.core.flush(o.fh).await.unwrap();
        e.core.release(o.fh).await.unwrap();
        let mut expect = want.clone();
        expect[10..14].copy_from_slice(b"head");
        expect[2_500_000..2_500_004].copy_from_slice(b"tail");
        expect.truncate(2_500_002);
        assert_eq!(remote.content("alice", "big").unwrap(), expect);

        // Truncated shorter than the prefix: the rest of the base is never needed.
        let before = reads();
        let o = e.core.open(ino, write).await.unwrap();
        e.core.write(o.fh, 0, b"short").await.unwrap();
        e.core.setattr(ino, size(5), Some(o.fh)).await.unwrap();
        e.core.flush(o.fh).await.unwrap();
        e.core.release(o.fh).await.unwrap();
        assert_eq!(reads(), before);
        assert_eq!(remote.content("alice", "big").unwrap(), b"short");
        assert!(
            remote.handles.lock().unwrap().is_empty(),
            "base handle left open"
        );
    });
}

#[test]
fn small_files_are_staged_in_memory_and_large_ones_spill() {
    rt().block_on(async {
        let e = env("alice");
        let dir = folder(&e.core, "alice").await;
        let (attr, fh) = e.core.create(dir, "small", 0o644).await.unwrap();
        e.core.write(fh, 0, &[7u8; 4096]).await.unwrap();
        let staged = e.core.state().staged.get(&attr.ino).cloned().unwrap();
        assert!(staged.in_memory());
        // Written in sequence, it streams: the staged content does not take it.
        e.core.write(fh, 4096, &vec![8u8; 2 << 20]).await.unwrap();
        assert!(staged.in_memory(), "a stream's bytes were staged");
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        let mut want = vec![7u8; 4096];
        want.extend(vec![8u8; 2 << 20]);
        assert_eq!(e.core.remote.content("alice", "small").unwrap(), want);
        assert_eq!(e.core.staged_memory.used(), 0, "memory budget not returned");

        // Written out of sequence, it is staged, and spills past the memory limit.
        let (attr, fh) = e.core.create(dir, "spilled", 0o644).await.unwrap();
        e.core.write(fh, 4096, &vec![8u8; 2 << 20]).await.unwrap();
        let staged = e.core.state().staged.get(&attr.ino).cloned().unwrap();
        assert!(!staged.in_memory(), "2 MiB still in memory");
        e.core.write(fh, 0, &[7u8; 4096]).await.unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "spilled").unwrap(), want);
        assert_eq!(e.core.staged_memory.used(), 0, "memory budget not returned");

        // Growing by truncate past the memory limit spills without writing the zeros.
        let (attr, fh) = e.core.create(dir, "sparse", 0o644).await.unwrap();
        e.core
            .setattr(attr.ino, size(8 << 20), Some(fh))
            .await
            .unwrap();
        let staged = e.core.state().staged.get(&attr.ino).cloned().unwrap();
        assert!(!staged.in_memory(), "8 MiB of zeros kept in memory");
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(
            e.core.remote.content("alice", "sparse").unwrap(),
            vec![0u8; 8 << 20]
        );
        assert_eq!(e.core.staged_memory.used(), 0, "memory budget not returned");
        let staging = e.core.staging.dir().to_path_buf();
        assert_eq!(
            std::fs::read_dir(staging).unwrap().count(),
            0,
            "staged file left behind"
        );
    });
}

#[test]
fn large_staged_writes_overwrites_and_truncates_read_back_and_upload_in_order() {
    rt().block_on(async {
        let e = env("alice");
        let dir = folder(&e.core, "alice").await;
        let (attr, fh) = e.core.create(dir, "big", 0o644).await.unwrap();
        let mut model = Vec::new();
        let write = |model: &mut Vec<u8>, off: usize, len: usize, fill: u8| {
            let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
            if model.len() < off + len {
                model.resize(off + len, 0);
            }
            model[off..off + len].copy_from_slice(&data);
            data
        };
        // Sequential large writes past the memory limit (spilling to the temp file), an
        // overwrite behind them, a small write inside that, reads in between, a truncate,
        // and a large write past a gap after it.
        for i in 0..12 {
            let d = write(&mut model, i * 300_000, 300_000, i as u8);
            e.core.write(fh, (i * 300_000) as u64, &d).await.unwrap();
        }
        let d = write(&mut model, 100_000, 500_000, 200);
        e.core.write(fh, 100_000, &d).await.unwrap();
        let d = write(&mut model, 150_000, 10, 99);
        e.core.write(fh, 150_000, &d).await.unwrap();
        assert_eq!(read_all(&e.core, attr.ino).await, model);
        e.core
            .setattr(attr.ino, size(2_000_000), Some(fh))
            .await
            .unwrap();
        model.truncate(2_000_000);
        let d = write(&mut model, 2_500_000, 700_000, 50);
        e.core.write(fh, 2_500_000, &d).await.unwrap();
        assert_eq!(read_all(&e.core, attr.ino).await, model);
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "big").unwrap(), model);
    });
}

const RW: OpenMode = OpenMode {
    write: true,
    truncate: false,
};

/// open(O_RDWR) of an existing large file, fsync, close, open(O_RDWR) again and a read in
/// the middle: the data, not EIO.
#[test]
fn reopened_for_writing_after_an_fsync_reads_the_old_content() {
    rt().block_on(async {
        let e = env("alice");
        let dir = folder(&e.core, "alice").await;
        let data: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
        e.core.remote.put("alice", "big", &data);
        let ino = e.core.lookup(dir, "big").await.unwrap().ino;
        let o = e.core.open(ino, RW).await.unwrap();
        e.core.fsync(o.fh).await.unwrap();
        e.core.flush(o.fh).await.unwrap();
        e.core.release(o.fh).await.unwrap();
        let o = e.core.open(ino, RW).await.unwrap();
        let got = e.core.read(o.fh, 2023424, 10240).await.unwrap();
        assert_eq!(&got[..], &data[2023424..2023424 + 10240]);
        // Only what was asked for came from the server, not the whole file.
        assert!(e.core.remote.read_bytes.load(Ordering::Relaxed) < 4 << 20);
        e.core.flush(o.fh).await.unwrap();
        e.core.release(o.fh).await.unwrap();
        assert!(e.core.remote.handles.lock().unwrap().is_empty());
    });
}

/// The attributes an entry is reported with.
async fn attr_of(core: &FsCore<Fake>, ino: u64) -> Attr {
    core.getattr(ino).await.unwrap()
}

#[test]
fn nested_directories_are_made_listed_and_their_dotdot_is_the_parent() {
    rt().block_on(async {
        let e = env("alice");
        let home = folder(&e.core, "alice").await;
        e.core.getattr(home).await.unwrap();
        let a = e.core.mkdir(home, "a", 0o750).await.unwrap();
        assert_eq!((a.kind, a.perm), (Kind::Dir, 0o750));
        // The folder's times changed with it: its attributes come from the server again.
        let stats = e.core.remote.stats.load(Ordering::Relaxed);
        e.core.getattr(home).await.unwrap();
        assert_eq!(e.core.remote.stats.load(Ordering::Relaxed), stats + 1);
        e.core.getattr(home).await.unwrap();
        assert_eq!(e.core.remote.stats.load(Ordering::Relaxed), stats + 1);
        let b = e.core.mkdir(a.ino, "b", 0o755).await.unwrap();
        let (f, fh) = e.core.create(b.ino, "f", 0o600).await.unwrap();
        assert_eq!((f.kind, f.perm), (Kind::File, 0o600));
        e.core.write(fh, 0, b"deep").await.unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "a/b/f").unwrap(), b"deep");
        assert_eq!(e.core.remote.info("alice", "a/b/f").mode, 0o600);
        // `..` is the real parent, all the way up to the mount's root.
        assert_eq!(
            e.core.lookup(f.ino, "..").await.unwrap_err().to_string(),
            FsError::NotDir.to_string()
        );
        assert_eq!(e.core.lookup(b.ino, "..").await.unwrap().ino, a.ino);
        assert_eq!(e.core.lookup(a.ino, "..").await.unwrap().ino, home);
        assert_eq!(e.core.lookup(home, "..").await.unwrap().ino, ROOT);
        assert_eq!(e.core.lookup(ROOT, "..").await.unwrap().ino, ROOT);
        assert_eq!(e.core.parent_of(b.ino), a.ino);
        let names: Vec<String> = e
            .core
            .list(a.ino)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names, ["b"]);
        // Taken names, removal of a directory with entries, of a file as a directory.
        assert!(matches!(
            e.core.mkdir(a.ino, "b", 0o755).await,
            Err(FsError::Exists)
        ));
        assert!(matches!(
            e.core.rmdir(a.ino, "b").await,
            Err(FsError::NotEmpty)
        ));
        assert!(matches!(
            e.core.rmdir(b.ino, "f").await,
            Err(FsError::NotDir)
        ));
        assert!(matches!(
            e.core.unlink(a.ino, "b").await,
            Err(FsError::IsDir)
        ));
        assert!(matches!(
            e.core.mkdir(f.ino, "x", 0o755).await,
            Err(FsError::NotDir)
        ));
        e.core.unlink(b.ino, "f").await.unwrap();
        e.core.rmdir(a.ino, "b").await.unwrap();
        assert!(matches!(
            e.core.lookup(a.ino, "b").await,
            Err(FsError::NotFound)
        ));
        assert!(e.core.remote.at("alice", "a/b").is_none());
        // A user's folder is not the mount's to remove.
        assert!(matches!(
            e.core.rmdir(ROOT, "alice").await,
            Err(FsError::PermissionDenied)
        ));
        // Inode numbers are never reused: a new entry of the same name is a new inode.
        let b2 = e.core.mkdir(a.ino, "b", 0o755).await.unwrap();
        assert_ne!(b2.ino, b.ino);
    });
}

#[test]
fn an_open_file_follows_renames_of_itself_and_its_directories() {
    rt().block_on(async {
        let e = env("alice");
        let home = folder(&e.core, "alice").await;
        let d = e.core.mkdir(home, "d", 0o755).await.unwrap();
        let sub = e.core.mkdir(d.ino, "sub", 0o755).await.unwrap();
        let other = e.core.mkdir(home, "other", 0o755).await.unwrap();
        let (f, fh) = e.core.create(sub.ino, "f", 0o644).await.unwrap();
        e.core.write(fh, 0, b"first").await.unwrap();
        // The directory holding it moves, then the file moves to another directory.
        e.core
            .rename(home, "d", other.ino, "moved", false)
            .await
            .unwrap();
        assert!(e.core.remote.at("alice", "d").is_none());
        e.core.write(fh, 5, b" second").await.unwrap();
        e.core
            .rename(sub.ino, "f", other.ino, "g", false)
            .await
            .unwrap();
        e.core.write(fh, 12, b" third").await.unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(
            e.core.remote.content("alice", "other/g").unwrap(),
            b"first second third"
        );
        assert!(e.core.remote.at("alice", "other/moved/sub/f").is_none());
        // The inode moved with it; its old name is gone.
        assert_eq!(e.core.lookup(other.ino, "g").await.unwrap().ino, f.ino);
        assert!(matches!(
            e.core.lookup(sub.ino, "f").await,
            Err(FsError::NotFound)
        ));
        assert_eq!(e.core.lookup(other.ino, "moved").await.unwrap().ino, d.ino);
        assert_eq!(e.core.lookup(d.ino, "sub").await.unwrap().ino, sub.ino);
        // Not into its own subtree; not over an existing name with RENAME_NOREPLACE.
        assert!(matches!(
            e.core
                .rename(other.ino, "moved", sub.ino, "loop", false)
                .await,
            Err(FsError::InvalidArgument(_))
        ));
        let (_, fh) = e.core.create(other.ino, "h", 0o644).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert!(matches!(
            e.core.rename(other.ino, "h", other.ino, "g", true).await,
            Err(FsError::Exists)
        ));
        // Replacing a file by rename: the replaced one is gone, the moved one takes its name.
        e.core
            .rename(other.ino, "h", other.ino, "g", false)
            .await
            .unwrap();
        assert_eq!(e.core.remote.content("alice", "other/g").unwrap(), b"");
        assert_ne!(e.core.lookup(other.ino, "g").await.unwrap().ino, f.ino);
        // Across users' trees: refused.
        let bob = folder(&e.core, "bob").await;
        assert!(matches!(
            e.core.rename(other.ino, "g", bob, "g", false).await,
            Err(FsError::PermissionDenied)
        ));
    });
}

#[test]
fn events_anywhere_in_a_tree_update_it_and_tell_the_kernel_what_to_forget() {
    rt().block_on(async {
        let e = env("bob");
        e.core.remote.put("alice", "d/e/f", b"one");
        e.core.remote.put("alice", "d/keep", b"same");
        let alice = folder(&e.core, "alice").await;
        let d = e.core.lookup(alice, "d").await.unwrap();
        let dir_e = e.core.lookup(d.ino, "e").await.unwrap();
        let f = e.core.lookup(dir_e.ino, "f").await.unwrap();
        assert_eq!(f.perm, 0o444, "others' files without write bits");
        assert_eq!(dir_e.perm, 0o555, "others' directories without write bits");
        let keep = e.core.lookup(d.ino, "keep").await.unwrap();
        let o = e.core.open(keep.ino, OpenMode::default()).await.unwrap();
        e.core.release(o.fh).await.unwrap();
        assert_eq!(e.core.list(d.ino).await.unwrap().len(), 2);

        // New content of f: its pages and attributes go, its name still leads to it.
        let info = e.core.remote.put("alice", "d/e/f", b"two!");
        let inv = changed(&e.core, info);
        assert_eq!(inv, [Invalidation::Inode { ino: f.ino }]);
        assert_eq!(e.core.getattr(f.ino).await.unwrap().size, 4);

        // A chmod of an unchanged file keeps its pages.
        let mut info = e.core.remote.info("alice", "d/keep");
        info.mode = 0o600;
        let inv = changed(&e.core, info);
        assert_eq!(inv, [Invalidation::Attr { ino: keep.ino }]);
        assert_eq!(attr_of(&e.core, keep.ino).await.perm, 0o400);

        // A new file: the (negative) dentry goes, and the listing has it.
        let new = e.core.remote.put("alice", "d/e/new", b"n");
        let inv = changed(&e.core, new);
        assert!(
            inv.contains(&Invalidation::Entry {
                parent: dir_e.ino,
                name: "new".into()
            }),
            "{inv:?}"
        );
        assert!(e
            .core
            .list(dir_e.ino)
            .await
            .unwrap()
            .iter()
            .any(|x| x.name == "new"));

        // A move from d/e/f to d/g: both names go; the inode is the same.
        let mut moved = e.core.remote.info("alice", "d/e/f");
        moved.parent = d.ino_id(&e.core);
        moved.name = "g".into();
        let inv = e.core.handle_event(&Event::Changed {
            owner: "alice".into(),
            file: moved.clone(),
            from: Some(Place {
                parent: moved_parent(&e.core, dir_e.ino),
                name: "f".into(),
            }),
        });
        assert!(
            inv.contains(&Invalidation::Entry {
                parent: dir_e.ino,
                name: "f".into()
            }),
            "{inv:?}"
        );
        assert!(
            inv.contains(&Invalidation::Entry {
                parent: d.ino,
                name: "g".into()
            }),
            "{inv:?}"
        );
        assert!(
            !inv.iter().any(|i| matches!(i, Invalidation::Inode { .. })),
            "{inv:?}"
        );
        assert!(!e
            .core
            .list(dir_e.ino)
            .await
            .unwrap()
            .iter()
            .any(|x| x.name == "f"));
        assert_eq!(e.core.lookup(d.ino, "g").await.unwrap().ino, f.ino);
        assert_eq!(e.core.parent_of(f.ino), d.ino);

        // Removed: the dentry and the file's pages go; the listing forgets it.
        let inv = removed(&e.core, &moved);
        assert!(
            inv.contains(&Invalidation::Entry {
                parent: d.ino,
                name: "g".into()
            }),
            "{inv:?}"
        );
        assert!(inv.contains(&Invalidation::Inode { ino: f.ino }), "{inv:?}");
        assert!(matches!(
            e.core.lookup(d.ino, "g").await,
            Err(FsError::NotFound)
        ));
    });
}

trait IdOf {
    fn ino_id(&self, core: &FsCore<Fake>) -> u64;
}

impl IdOf for Attr {
    /// The entry id behind an inode.
    fn ino_id(&self, core: &FsCore<Fake>) -> u64 {
        core.node(self.ino).unwrap().id
    }
}

fn moved_parent(core: &FsCore<Fake>, ino: u64) -> u64 {
    core.node(ino).unwrap().id
}

/// `cp -p` sets mode and times on the descriptor it wrote before closing it: both reach
/// the server with the upload, also when the upload was streamed.
#[test]
fn mode_and_times_set_before_close_are_carried_by_the_upload() {
    rt().block_on(async {
        let e = env("alice");
        let home = folder(&e.core, "alice").await;
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let preserve = SetAttr {
            mode: Some(0o751),
            atime: Some(t),
            mtime: Some(t),
            ..SetAttr::default()
        };
        for (name, len) in [("small", 1000usize), ("streamed", 3 << 20)] {
            let data = vec![5u8; len];
            let (f, fh) = e.core.create(home, name, 0o600).await.unwrap();
            for (i, chunk) in data.chunks(1 << 20).enumerate() {
                e.core.write(fh, (i << 20) as u64, chunk).await.unwrap();
            }
            let before = e.core.remote.setattrs.load(Ordering::Relaxed);
            let a = e.core.setattr(f.ino, preserve, Some(fh)).await.unwrap();
            assert_eq!((a.perm, a.mtime, a.size), (0o751, t, len as u64), "{name}");
            assert_eq!(
                e.core.remote.setattrs.load(Ordering::Relaxed),
                before,
                "{name}: set on the server before the content"
            );
            e.core.flush(fh).await.unwrap();
            e.core.release(fh).await.unwrap();
            let info = e.core.remote.info("alice", name);
            assert_eq!(e.core.remote.content("alice", name).unwrap(), data);
            assert_eq!(
                (info.mode, info.mtime_ns, info.atime_ns),
                (0o751, ns_of(t), ns_of(t)),
                "{name}"
            );
            let a = attr_of(&e.core, f.ino).await;
            assert_eq!((a.perm, a.mtime), (0o751, t), "{name}");
        }
        assert_eq!(*e.core.remote.streamed.lock().unwrap(), 1);
    });
}

#[test]
fn chmod_and_utimes_of_committed_entries_go_to_the_server() {
    rt().block_on(async {
        let e = env("alice");
        e.core.remote.put("alice", "run.sh", b"#!/bin/sh\n");
        let home = folder(&e.core, "alice").await;
        let f = e.core.lookup(home, "run.sh").await.unwrap();
        assert_eq!(f.perm, 0o644);
        assert!(
            e.core.access(f.ino, false, false, true).await.is_err(),
            "not executable yet"
        );
        let chmod = SetAttr {
            mode: Some(0o755),
            ..SetAttr::default()
        };
        let a = e.core.setattr(f.ino, chmod, None).await.unwrap();
        assert_eq!(a.perm, 0o755);
        assert_eq!(e.core.remote.info("alice", "run.sh").mode, 0o755);
        assert!(e.core.access(f.ino, false, false, true).await.is_ok());
        let t = UNIX_EPOCH + Duration::from_secs(12345);
        let touch = SetAttr {
            mtime: Some(t),
            ..SetAttr::default()
        };
        assert_eq!(e.core.setattr(f.ino, touch, None).await.unwrap().mtime, t);
        assert_eq!(e.core.remote.info("alice", "run.sh").mtime_ns, ns_of(t));
        // chmod 600 is kept, content untouched.
        let private = SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        };
        e.core.setattr(f.ino, private, None).await.unwrap();
        assert_eq!(attr_of(&e.core, f.ino).await.perm, 0o600);
        assert_eq!(
            e.core.remote.content("alice", "run.sh").unwrap(),
            b"#!/bin/sh\n"
        );
        // Directories too.
        let d = e.core.mkdir(home, "d", 0o755).await.unwrap();
        let a = e.core.setattr(d.ino, private, None).await.unwrap();
        assert_eq!((a.kind, a.perm), (Kind::Dir, 0o600));
        // A file open for writing without changes yet: straight to the server.
        let o = e.core.open(f.ino, RW).await.unwrap();
        e.core.setattr(f.ino, chmod, Some(o.fh)).await.unwrap();
        assert_eq!(e.core.remote.info("alice", "run.sh").mode, 0o755);
        e.core.release(o.fh).await.unwrap();
    });
}

#[test]
fn symbolic_links_are_made_read_and_reported() {
    rt().block_on(async {
        let e = env("alice");
        let home = folder(&e.core, "alice").await;
        let l = e.core.symlink(home, "link", "../some/where").await.unwrap();
        assert_eq!((l.kind, l.size), (Kind::Symlink, 13));
        assert_eq!(e.core.readlink(l.ino).await.unwrap(), "../some/where");
        let info = e.core.remote.info("alice", "link");
        assert_eq!(info.target.as_deref(), Some("../some/where"));
        let looked = e.core.lookup(home, "link").await.unwrap();
        assert_eq!(looked.ino, l.ino);
        assert!(matches!(
            e.core.symlink(home, "link", "x").await,
            Err(FsError::Exists)
        ));
        assert!(matches!(
            e.core.symlink(home, "empty", "").await,
            Err(FsError::NotFound)
        ));
        assert!(matches!(
            e.core.symlink(home, "long", &"x".repeat(5000)).await,
            Err(FsError::NameTooLong)
        ));
        assert!(matches!(
            e.core.readlink(home).await,
            Err(FsError::InvalidArgument(_))
        ));
        assert!(matches!(
            e.core.open(l.ino, OpenMode::default()).await,
            Err(FsError::InvalidArgument(_))
        ));
        e.core.unlink(home, "link").await.unwrap();
        assert!(e.core.remote.at("alice", "link").is_none());
    });
}

/// Operations on a small tree: files "a" and "b" in the folder or in the directories
/// "d" and "e", which may exist or not.
#[derive(Debug, Clone)]
enum TreeOp {
    Create(usize, Vec<u8>),
    WriteAt(usize, u16, Vec<u8>),
    Truncate(usize, u16),
    Rename(usize, usize),
    Unlink(usize),
    Mkdir(usize),
    Rmdir(usize),
    RenameDir(usize, usize),
    /// A file opened for writing, then its directory renamed, then written and closed.
    WriteAcrossDirRename(usize, usize, Vec<u8>),
}

const DIRS: [&str; 2] = ["d", "e"];
const FILES: [(Option<usize>, &str); 5] = [
    (None, "a"),
    (Some(0), "a"),
    (Some(0), "b"),
    (Some(1), "a"),
    (Some(1), "b"),
];

fn tree_op() -> impl Strategy<Value = TreeOp> {
    let data = || prop::collection::vec(any::<u8>(), 0..200);
    let f = || 0..FILES.len();
    let d = || 0..DIRS.len();
    prop_oneof![
        (f(), data()).prop_map(|(i, x)| TreeOp::Create(i, x)),
        (f(), 0u16..300, data()).prop_map(|(i, o, x)| TreeOp::WriteAt(i, o, x)),
        (f(), 0u16..300).prop_map(|(i, l)| TreeOp::Truncate(i, l)),
        (f(), f()).prop_map(|(a, b)| TreeOp::Rename(a, b)),
        f().prop_map(TreeOp::Unlink),
        d().prop_map(TreeOp::Mkdir),
        d().prop_map(TreeOp::Rmdir),
        (d(), d()).prop_map(|(a, b)| TreeOp::RenameDir(a, b)),
        (1..FILES.len(), d(), data()).prop_map(|(i, t, x)| TreeOp::WriteAcrossDirRename(i, t, x)),
    ]
}

/// The model: directories that exist, and files by path.
#[derive(Debug, Default, Clone)]
struct TreeModel {
    dirs: std::collections::BTreeSet<String>,
    files: BTreeMap<String, Vec<u8>>,
}

fn file_path(i: usize) -> String {
    match FILES[i] {
        (None, n) => n.to_string(),
        (Some(d), n) => format!("{}/{n}", DIRS[d]),
    }
}

/// The inode of the directory holding file `i`, if it exists.
async fn dir_of(core: &FsCore<Fake>, home: u64, i: usize) -> Option<u64> {
    match FILES[i].0 {
        None => Some(home),
        Some(d) => core.lookup(home, DIRS[d]).await.ok().map(|a| a.ino),
    }
}

async fn apply_tree(core: &FsCore<Fake>, home: u64, m: &mut TreeModel, op: &TreeOp) {
    let dir_exists = |m: &TreeModel, i: usize| FILES[i].0.is_none_or(|d| m.dirs.contains(DIRS[d]));
    match op {
        TreeOp::Create(i, x) => {
            let Some(dir) = dir_of(core, home, *i).await else {
                assert!(!dir_exists(m, *i));
                return;
            };
            let (_, fh) = core.create(dir, FILES[*i].1, 0o644).await.unwrap();
            core.write(fh, 0, x).await.unwrap();
            core.flush(fh).await.unwrap();
            core.release(fh).await.unwrap();
            m.files.insert(file_path(*i), x.clone());
        }
        TreeOp::WriteAt(i, off, _) | TreeOp::Truncate(i, off) if dir_exists(m, *i) => {
            let dir = dir_of(core, home, *i).await.unwrap();
            let found = core.lookup(dir, FILES[*i].1).await;
            let Some(content) = m.files.get_mut(&file_path(*i)) else {
                assert!(matches!(found, Err(FsError::NotFound)), "{found:?}");
                return;
            };
            let ino = found.unwrap().ino;
            let off = *off as usize;
            if let TreeOp::WriteAt(_, _, x) = op {
                let o = core.open(ino, RW).await.unwrap();
                core.write(o.fh, off as u64, x).await.unwrap();
                core.flush(o.fh).await.unwrap();
                core.release(o.fh).await.unwrap();
                if !x.is_empty() {
                    if content.len() < off + x.len() {
                        content.resize(off + x.len(), 0);
                    }
                    content[off..off + x.len()].copy_from_slice(x);
                }
            } else {
                core.setattr(ino, size(off as u64), None).await.unwrap();
                content.resize(off, 0);
            }
        }
        TreeOp::WriteAt(..) | TreeOp::Truncate(..) => {}
        TreeOp::Rename(a, b) => {
            let (Some(from), Some(to)) =
                (dir_of(core, home, *a).await, dir_of(core, home, *b).await)
            else {
                return;
            };
            let r = core.rename(from, FILES[*a].1, to, FILES[*b].1, false).await;
            match m.files.remove(&file_path(*a)) {
                Some(x) => {
                    r.unwrap();
                    m.files.insert(file_path(*b), x);
                }
                None => assert!(matches!(r, Err(FsError::NotFound)), "{r:?}"),
            }
        }
        TreeOp::Unlink(i) => {
            let Some(dir) = dir_of(core, home, *i).await else {
                return;
            };
            let r = core.unlink(dir, FILES[*i].1).await;
            match m.files.remove(&file_path(*i)) {
                Some(_) => r.unwrap(),
                None => assert!(matches!(r, Err(FsError::NotFound)), "{r:?}"),
            }
        }
        TreeOp::Mkdir(d) => {
            let r = core.mkdir(home, DIRS[*d], 0o755).await;
            if m.dirs.insert(DIRS[*d].to_string()) {
                r.unwrap();
            } else {
                assert!(matches!(r, Err(FsError::Exists)), "{r:?}");
            }
        }
        TreeOp::Rmdir(d) => {
            let r = core.rmdir(home, DIRS[*d]).await;
            let prefix = format!("{}/", DIRS[*d]);
            if !m.dirs.contains(DIRS[*d]) {
                assert!(matches!(r, Err(FsError::NotFound)), "{r:?}");
            } else if m.files.keys().any(|k| k.starts_with(&prefix)) {
                assert!(matches!(r, Err(FsError::NotEmpty)), "{r:?}");
            } else {
                r.unwrap();
                m.dirs.remove(DIRS[*d]);
            }
        }
        TreeOp::RenameDir(a, b) => {
            let r = core.rename(home, DIRS[*a], home, DIRS[*b], false).await;
            let (pa, pb) = (format!("{}/", DIRS[*a]), format!("{}/", DIRS[*b]));
            let b_empty = !m.files.keys().any(|k| k.starts_with(&pb));
            if !m.dirs.contains(DIRS[*a]) {
                assert!(matches!(r, Err(FsError::NotFound)), "{r:?}");
            } else if a == b {
                r.unwrap();
            } else if m.dirs.contains(DIRS[*b]) && !b_empty {
                assert!(matches!(r, Err(FsError::NotEmpty)), "{r:?}");
            } else {
                r.unwrap();
                m.dirs.remove(DIRS[*a]);
                m.dirs.insert(DIRS[*b].to_string());
                let moved: Vec<String> = m
                    .files
                    .keys()
                    .filter(|k| k.starts_with(&pa))
                    .cloned()
                    .collect();
                for k in moved {
                    let x = m.files.remove(&k).unwrap();
                    m.files.insert(format!("{pb}{}", &k[pa.len()..]), x);
                }
            }
        }
        TreeOp::WriteAcrossDirRename(i, t, x) => {
            let Some(d) = FILES[*i].0 else { return };
            let path = file_path(*i);
            if !m.files.contains_key(&path) || d == *t || m.dirs.contains(DIRS[*t]) {
                return;
            }
            let dir = dir_of(core, home, *i).await.unwrap();
            let ino = core.lookup(dir, FILES[*i].1).await.unwrap().ino;
            let o = core.open(ino, RW).await.unwrap();
            core.rename(home, DIRS[d], home, DIRS[*t], false)
                .await
                .unwrap();
            core.write(o.fh, 0, x).await.unwrap();
            core.flush(o.fh).await.unwrap();
            core.release(o.fh).await.unwrap();
            let (pa, pb) = (format!("{}/", DIRS[d]), format!("{}/", DIRS[*t]));
            m.dirs.remove(DIRS[d]);
            m.dirs.insert(DIRS[*t].to_string());
            let moved: Vec<String> = m
                .files
                .keys()
                .filter(|k| k.starts_with(&pa))
                .cloned()
                .collect();
            for k in moved {
                let v = m.files.remove(&k).unwrap();
                m.files.insert(format!("{pb}{}", &k[pa.len()..]), v);
            }
            let new_path = format!("{pb}{}", FILES[*i].1);
            let content = m.files.get_mut(&new_path).unwrap();
            if !x.is_empty() {
                if content.len() < x.len() {
                    content.resize(x.len(), 0);
                }
                content[..x.len()].copy_from_slice(x);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The mount's listings and contents, and the server's, equal a model of a small tree
    /// after every operation.
    #[test]
    fn random_tree_operations_match_a_model(ops in prop::collection::vec(tree_op(), 1..30)) {
        rt().block_on(async {
            let e = env("alice");
            let home = folder(&e.core, "alice").await;
            let mut m = TreeModel::default();
            for op in &ops {
                apply_tree(&e.core, home, &mut m, op).await;
                let mut listed = BTreeMap::new();
                for d in e.core.list(home).await.unwrap() {
                    if d.attr.kind == Kind::Dir {
                        assert!(m.dirs.contains(&d.name), "{} after {op:?}", d.name);
                        for f in e.core.list(d.attr.ino).await.unwrap() {
                            listed.insert(format!("{}/{}", d.name, f.name), f.attr.size);
                        }
                    } else {
                        listed.insert(d.name, d.attr.size);
                    }
                }
                let want: BTreeMap<String, u64> =
                    m.files.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect();
                prop_assert_eq!(&listed, &want, "after {:?}", op);
                for (path, data) in &m.files {
                    prop_assert_eq!(&e.core.remote.content("alice", path).unwrap(), data, "server, {} after {:?}", path, op);
                }
            }
            Ok(())
        })?;
    }
}

/// A directory of another user closed by a chmod: what was listed below it is asked for
/// again, and the server decides.
#[test]
fn a_mode_change_of_anothers_directory_drops_what_was_listed_below_it() {
    rt().block_on(async {
        let e = env("bob");
        e.core.remote.put("alice", "d/sub/f", b"x");
        let alice = folder(&e.core, "alice").await;
        let d = e.core.lookup(alice, "d").await.unwrap();
        let sub = e.core.lookup(d.ino, "sub").await.unwrap();
        e.core.list(d.ino).await.unwrap();
        e.core.list(sub.ino).await.unwrap();
        let lists = || e.core.remote.lists.load(Ordering::Relaxed);
        let before = lists();
        e.core.list(sub.ino).await.unwrap();
        assert_eq!(lists(), before, "cached");
        let mut closed = e.core.remote.info("alice", "d");
        closed.mode = 0o700;
        let inv = changed(&e.core, closed);
        assert!(inv.contains(&Invalidation::Inode { ino: d.ino }), "{inv:?}");
        // The kernel's cached names below it go: a path through it is looked up again.
        for (parent, name) in [(d.ino, "sub"), (sub.ino, "f")] {
            let entry = Invalidation::Entry {
                parent,
                name: name.into(),
            };
            assert!(inv.contains(&entry), "{inv:?}");
        }
        e.core.list(sub.ino).await.unwrap();
        e.core.list(d.ino).await.unwrap();
        assert_eq!(lists(), before + 2, "asked again");
    });
}

/// Opening a directory asks for its listing only when none is cached, so what opening
/// must report it reports; with a listing cached, the entries are taken at the handle's
/// first read (the kernel reads none while its own cache is valid), and every later page
/// comes from the same entries.
#[test]
fn a_directory_is_listed_at_open_only_when_not_cached_and_paged_from_one_snapshot() {
    rt().block_on(async {
        let e = env("bob");
        e.core.remote.put("alice", "d/f1", b"x");
        let alice = folder(&e.core, "alice").await;
        let d = e.core.lookup(alice, "d").await.unwrap();
        let lists = || e.core.remote.lists.load(Ordering::Relaxed);
        let names = |entries: &[DirEntry]| -> Vec<String> {
            entries.iter().map(|e| e.name.clone()).collect()
        };
        let before = lists();
        let first = e.core.opendir(d.ino).await.unwrap();
        assert_eq!(lists(), before + 1, "not cached: listed at open");
        let second = e.core.opendir(d.ino).await.unwrap();
        assert_eq!(lists(), before + 1, "cached: nothing asked");

        let read = e.core.dir_entries(first).await.unwrap();
        assert_eq!(names(&read), ["f1"]);
        changed(&e.core, e.core.remote.put("alice", "d/f2", b"y"));
        let again = e.core.dir_entries(first).await.unwrap();
        assert!(
            Arc::ptr_eq(&read, &again),
            "a later page reads the same entries"
        );
        // Opened before the change, first read after it: the change is in.
        let later = e.core.dir_entries(second).await.unwrap();
        assert_eq!(names(&later), ["f1", "f2"]);
        assert_eq!(lists(), before + 1);
        e.core.releasedir(first);
        e.core.releasedir(second);
        assert!(matches!(
            e.core.dir_entries(first).await,
            Err(FsError::BadHandle)
        ));

        let f1 = e.core.lookup(d.ino, "f1").await.unwrap();
        assert!(matches!(e.core.opendir(f1.ino).await, Err(FsError::NotDir)));
    });
}

/// A new file is this mount's until its first upload makes it on the server, with its
/// mode and content; whatever needs the server to know it earlier sends its create first;
/// removing it before then sends nothing.
#[test]
fn a_created_file_is_made_by_its_first_upload() {
    rt().block_on(async {
        let e = env("alice");
        let home = folder(&e.core, "alice").await;
        let d = e.core.mkdir(home, "d", 0o755).await.unwrap();
        let puts = || e.core.remote.puts.load(Ordering::Relaxed);
        let (f, fh) = e.core.create(d.ino, "new", 0o640).await.unwrap();
        // Seen here at once, and keeps its directory from being removed; not on the
        // server yet.
        assert_eq!(e.core.lookup(d.ino, "new").await.unwrap().ino, f.ino);
        let listed = e.core.list(d.ino).await.unwrap();
        assert!(listed.iter().any(|d| d.name == "new"), "{listed:?}");
        assert!(matches!(
            e.core.rmdir(home, "d").await,
            Err(FsError::NotEmpty)
        ));
        assert!(e.core.remote.at("alice", "d/new").is_none());
        e.core.write(fh, 0, b"content").await.unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        let info = e.core.remote.info("alice", "d/new");
        assert_eq!(
            (
                info.mode,
                &e.core.remote.content("alice", "d/new").unwrap()[..]
            ),
            (0o640, &b"content"[..])
        );
        assert_eq!(puts(), 1);
        // Known by its entry from then on: a rename moves it, on the server.
        e.core
            .rename(d.ino, "new", home, "moved", false)
            .await
            .unwrap();
        assert_eq!(e.core.remote.content("alice", "moved").unwrap(), b"content");

        // Renamed before its close: made at its old name first, then moved; the content
        // goes where the file went.
        let (_, fh) = e.core.create(home, "draft", 0o644).await.unwrap();
        e.core.write(fh, 0, b"v1").await.unwrap();
        e.core
            .rename(home, "draft", d.ino, "final", false)
            .await
            .unwrap();
        e.core.write(fh, 2, b"+v2").await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "d/final").unwrap(), b"v1+v2");
        assert!(e.core.remote.at("alice", "draft").is_none());

        // Removed while open, before anything went out: nothing is sent, and what is
        // written after goes nowhere.
        let before = puts();
        let (_, fh) = e.core.create(home, "tmp", 0o644).await.unwrap();
        e.core.unlink(home, "tmp").await.unwrap();
        e.core.write(fh, 0, b"nowhere").await.unwrap();
        e.core.release(fh).await.unwrap();
        assert!(e.core.remote.at("alice", "tmp").is_none());
        assert_eq!(puts(), before);

        // A chmod before any write: the server is to know the file, so it is made first.
        let (g, fh) = e.core.create(home, "early", 0o644).await.unwrap();
        let chmod = SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        };
        e.core.setattr(g.ino, chmod, Some(fh)).await.unwrap();
        assert_eq!(e.core.remote.info("alice", "early").mode, 0o600);
        e.core.release(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "early").unwrap(), b"");

        // touch: an empty file with its mode.
        let a = e.core.mknod_file(home, "touched", 0o600).await.unwrap();
        assert_eq!(a.perm, 0o600);
        assert_eq!(e.core.remote.content("alice", "touched").unwrap(), b"");
        assert_eq!(e.core.remote.info("alice", "touched").mode, 0o600);
    });
}

/// What must not happen around a create not sent yet: an unlink after its upload failed
/// sends nothing (not a create and a remove); a file given up at its last release leaves
/// the kernel's caches; an `fsync` carrying the create together with a write that crosses
/// the first MiB (which wants the file on the server) ends, with the whole content; a
/// close together with an unlink does not make the file again.
#[test]
fn a_create_not_sent_yet_leaves_nothing_behind_when_given_up() {
    rt().block_on(async {
        let e = env("alice");
        let home = folder(&e.core, "alice").await;
        let later = Arc::new(Mutex::new(Vec::new()));
        let sink = later.clone();
        e.core
            .on_invalidation(move |inv| sink.lock().unwrap().push(inv));
        let puts = || e.core.remote.puts.load(Ordering::Relaxed);

        // The close's upload fails; the file is unlinked: nothing more goes out.
        let (_, fh) = e.core.create(home, "x", 0o644).await.unwrap();
        e.core.write(fh, 0, b"data").await.unwrap();
        *e.core.remote.fail_uploads.lock().unwrap() = Some(ErrorCode::QuotaExceeded);
        assert!(e.core.flush(fh).await.is_err());
        *e.core.remote.fail_uploads.lock().unwrap() = None;
        let before = puts();
        e.core.unlink(home, "x").await.unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(
            puts(),
            before,
            "a create or an upload went out after the unlink"
        );
        assert!(e.core.remote.at("alice", "x").is_none());

        // Given up at its last release: the kernel forgets the name.
        let (_, fh) = e.core.create(home, "y", 0o644).await.unwrap();
        e.core.write(fh, 0, b"data").await.unwrap();
        *e.core.remote.fail_uploads.lock().unwrap() = Some(ErrorCode::NoSpace);
        assert!(e.core.flush(fh).await.is_err());
        *e.core.remote.fail_uploads.lock().unwrap() = None;
        later.lock().unwrap().clear();
        e.core.release(fh).await.unwrap();
        let entry = Invalidation::Entry {
            parent: home,
            name: "y".into(),
        };
        assert!(later.lock().unwrap().contains(&entry), "{later:?}");
        assert!(e.core.remote.at("alice", "y").is_none());
        assert!(matches!(
            e.core.lookup(home, "y").await,
            Err(FsError::NotFound)
        ));

        // An fsync (which carries the create) and a write past the first MiB at once.
        let (_, fh) = e.core.create(home, "z", 0o644).await.unwrap();
        e.core.write(fh, 0, &[1u8; 4096]).await.unwrap();
        let big = vec![2u8; CHUNK_SIZE as usize];
        let both = async { tokio::join!(e.core.fsync(fh), e.core.write(fh, 4096, &big)) };
        let (synced, wrote) = tokio::time::timeout(std::time::Duration::from_secs(10), both)
            .await
            .expect("an fsync and a write of a new file never ended");
        synced.unwrap();
        wrote.unwrap();
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        let content = e.core.remote.content("alice", "z").unwrap();
        assert_eq!(content.len(), 4096 + CHUNK_SIZE as usize);

        // An unlink and the close of the file at once: whichever comes first, the file
        // is not on the server after both.
        for _ in 0..2 {
            let (_, fh) = e.core.create(home, "w", 0o644).await.unwrap();
            e.core.write(fh, 0, b"data").await.unwrap();
            let (unlinked, closed) = tokio::join!(e.core.unlink(home, "w"), e.core.flush(fh));
            unlinked.unwrap();
            closed.unwrap();
            e.core.release(fh).await.unwrap();
            assert!(e.core.remote.at("alice", "w").is_none());
        }
    });
}

#[test]
fn a_create_the_server_refuses_fails_the_close_and_leaves_nothing() {
    rt().block_on(async {
        let e = env("alice");
        let home = folder(&e.core, "alice").await;
        // The upload that makes the file is refused.
        let (f, fh) = e.core.create(home, "refused", 0o644).await.unwrap();
        *e.core.remote.fail_uploads.lock().unwrap() = Some(ErrorCode::QuotaExceeded);
        e.core.write(fh, 0, b"data").await.unwrap();
        assert!(matches!(
            e.core.flush(fh).await,
            Err(FsError::QuotaExceeded)
        ));
        *e.core.remote.fail_uploads.lock().unwrap() = None;
        e.core.release(fh).await.unwrap();
        assert!(e.core.remote.at("alice", "refused").is_none());
        assert!(matches!(
            e.core.lookup(home, "refused").await,
            Err(FsError::NotFound)
        ));
        let listed = e.core.list(home).await.unwrap();
        assert!(listed.iter().all(|d| d.name != "refused"), "{listed:?}");
        assert!(
            e.core.getattr(f.ino).await.is_ok_and(|a| a.unlinked)
                || e.core.getattr(f.ino).await.is_err()
        );
        // A file created and closed without a write is made by its close.
        let (_, fh) = e.core.create(home, "empty", 0o600).await.unwrap();
        e.core.flush(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "empty").unwrap(), b"");
        e.core.release(fh).await.unwrap();
        // A refused close, and a second close of the same open file that succeeds: that
        // one makes the file.
        let (_, fh) = e.core.create(home, "again", 0o600).await.unwrap();
        e.core.write(fh, 0, b"data").await.unwrap();
        *e.core.remote.fail_uploads.lock().unwrap() = Some(ErrorCode::NoSpace);
        assert!(matches!(e.core.flush(fh).await, Err(FsError::NoSpace)));
        assert!(e.core.remote.at("alice", "again").is_none());
        *e.core.remote.fail_uploads.lock().unwrap() = None;
        e.core.flush(fh).await.unwrap();
        e.core.release(fh).await.unwrap();
        assert_eq!(e.core.remote.content("alice", "again").unwrap(), b"data");
        assert_eq!(e.core.remote.info("alice", "again").mode, 0o600);
        // A create sent on its own (a chmod before any write needs the file on the
        // server) and refused: the chmod fails, and the file is gone.
        let (g, fh) = e.core.create(home, "sent", 0o644).await.unwrap();
        *e.core.remote.fail_uploads.lock().unwrap() = Some(ErrorCode::QuotaExceeded);
        let chmod = SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        };
        assert!(matches!(
            e.core.setattr(g.ino, chmod, Some(fh)).await,
            Err(FsError::QuotaExceeded)
        ));
        *e.core.remote.fail_uploads.lock().unwrap() = None;
        e.core.release(fh).await.unwrap();
        assert!(e.core.remote.at("alice", "sent").is_none());
        assert!(matches!(
            e.core.lookup(home, "sent").await,
            Err(FsError::NotFound)
        ));
    });
}
