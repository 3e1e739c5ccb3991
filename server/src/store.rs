//! File storage: one directory per user holding content blobs and one small JSON metadata
//! file per user file.
//!
//! Layout under the data directory:
//! ```text
//! tmp/                               uploads being received (emptied at start)
//! files/<user>/<version>.blob        content of one version of one file
//! files/<user>/<hash(name)>.meta     {"name", "size", "mtime_ns", "version", "blake3"}
//! ```
//! A blob is named by its version, so a new version never overwrites the old one: commit
//! writes the blob, fsyncs it, renames it into place and fsyncs the directory, then replaces
//! the metadata file the same way, then unlinks the old blob. Readers that opened the old
//! blob keep reading it (POSIX keeps unlinked files readable). A crash at any point leaves
//! the old or the new metadata, each pointing at a complete blob; blobs no metadata names
//! are removed when the user's folder is next loaded. One mutation writes one metadata file,
//! whatever the number of files.
//!
//! Metadata file names are a hash of the file name because a file name may be 255 bytes,
//! the limit of a directory entry, leaving no room for a suffix.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sharefs_protocol::name::{check_file_name, check_user_name};
use sharefs_protocol::{FileInfo, Space};

use crate::error::{Result, ServerError};
use crate::fsutil;

/// Metadata of one stored file, as kept in its `.meta` file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileMeta {
    name: String,
    size: u64,
    mtime_ns: i64,
    version: u64,
    blake3: String,
}

impl FileMeta {
    fn info(&self, owner: &str) -> FileInfo {
        FileInfo {
            owner: owner.to_string(),
            name: self.name.clone(),
            size: self.size,
            mtime_ns: self.mtime_ns,
            version: self.version,
        }
    }
}

/// The loaded index of one user's folder.
#[derive(Debug)]
struct Folder {
    dir: PathBuf,
    files: BTreeMap<String, FileMeta>,
    used: u64,
}

/// Cheap-to-clone handle on the storage of one data directory.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    root: PathBuf,
    tmp: PathBuf,
    /// Folders are loaded on first use; each has its own lock so one user's fsyncs do not
    /// stall another's listing. std `Mutex` because every holder is a blocking task that
    /// never awaits while holding it.
    folders: Mutex<HashMap<String, Arc<Mutex<Folder>>>>,
    /// Source of versions: starts at the clock in nanoseconds so versions stay unique
    /// across restarts, and is raised past every version found on disk.
    next_version: AtomicU64,
    /// Bytes of free disk space uploads must leave untouched.
    reserve: u64,
}

/// An upload being received into a temp file. Dropping it (abort, disconnect, shutdown)
/// removes the temp file.
#[derive(Debug)]
pub struct StagedUpload {
    owner: String,
    name: String,
    file: Option<File>,
    path: PathBuf,
    hasher: blake3::Hasher,
    written: u64,
    /// Bytes the owner may still add (quota and disk reserve), checked per chunk.
    allowance: u64,
    allowance_error: Option<ServerError>,
    /// The first failure; later chunks are ignored and commit reports it.
    failed: Option<ServerError>,
}

impl StagedUpload {
    pub fn name(&self) -> &str {
        &self.name
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
        if self.written + data.len() as u64 > self.allowance {
            self.failed = self.allowance_error.take();
            return;
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        if let Err(e) = file.write_all(data) {
            self.failed = Some(e.into());
            return;
        }
        self.hasher.update(data);
        self.written += data.len() as u64;
    }
}

impl Drop for StagedUpload {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// An open read handle: the blob of the version current at open.
#[derive(Debug)]
pub struct OpenFile {
    pub file: File,
    pub info: FileInfo,
}

impl Store {
    /// Opens (creating if needed) the storage under `root` and clears leftover temp files.
    pub fn open(root: &Path, reserve: u64) -> Result<Store> {
        let tmp = root.join("tmp");
        fsutil::create_dir_durable(&root.join("files"))?;
        if tmp.is_dir() {
            fs::remove_dir_all(&tmp)?;
        }
        fsutil::create_dir_durable(&tmp)?;
        Ok(Store {
            inner: Arc::new(StoreInner {
                root: root.to_path_buf(),
                tmp,
                folders: Mutex::new(HashMap::new()),
                next_version: AtomicU64::new(fsutil::now_ns().max(1) as u64),
                reserve,
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn next_version(&self) -> u64 {
        self.inner.next_version.fetch_add(1, Ordering::Relaxed)
    }

    fn folder(&self, owner: &str) -> Result<Arc<Mutex<Folder>>> {
        check_user_name(owner).map_err(ServerError::InvalidName)?;
        let mut folders = lock(&self.inner.folders)?;
        if let Some(f) = folders.get(owner) {
            return Ok(f.clone());
        }
        let folder = Arc::new(Mutex::new(self.load_folder(owner)?));
        folders.insert(owner.to_string(), folder.clone());
        Ok(folder)
    }

    /// Reads a user's folder from disk, finishing or undoing what a crash left behind.
    fn load_folder(&self, owner: &str) -> Result<Folder> {
        let dir = self.inner.root.join("files").join(owner);
        fsutil::create_dir_durable(&dir)?;
        let mut files = BTreeMap::new();
        let mut blobs = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let fname = entry.file_name();
            let Some(fname) = fname.to_str() else {
                continue;
            };
            if let Some(v) = fname.strip_suffix(".blob") {
                if let Ok(v) = u64::from_str_radix(v, 16) {
                    blobs.push(v);
                }
            } else if fname.ends_with(".meta") {
                let path = entry.path();
                let bytes = fs::read(&path)?;
                let meta: FileMeta =
                    serde_json::from_slice(&bytes).map_err(|source| ServerError::Corrupt {
                        path: path.display().to_string(),
                        source,
                    })?;
                files.insert(meta.name.clone(), meta);
            }
        }
        let referenced: std::collections::HashSet<u64> =
            files.values().map(|m| m.version).collect();
        let mut removed = 0;
        for v in &blobs {
            if !referenced.contains(v) {
                fs::remove_file(dir.join(blob_name(*v)))?;
                removed += 1;
            }
        }
        let present: std::collections::HashSet<u64> = blobs.into_iter().collect();
        files.retain(|name, meta| {
            let ok = present.contains(&meta.version);
            if !ok {
                tracing::error!(owner, name, "metadata names a missing blob; dropping entry");
            }
            ok
        });
        if removed > 0 {
            tracing::info!(owner, removed, "removed blobs of unfinished uploads");
            fsutil::sync_dir(&dir)?;
        }
        let max_version = files.values().map(|m| m.version).max().unwrap_or(0);
        self.inner
            .next_version
            .fetch_max(max_version + 1, Ordering::Relaxed);
        let used = files.values().map(|m| m.size).sum();
        Ok(Folder { dir, files, used })
    }

    /// Lists a user's files, sorted by name.
    pub fn list(&self, owner: &str) -> Result<Vec<FileInfo>> {
        Ok(self.list_page(owner, None, usize::MAX)?.0)
    }

    /// Up to `limit` files after `after`, sorted by name, and whether more follow.
    pub fn list_page(
        &self,
        owner: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<FileInfo>, bool)> {
        use std::ops::Bound;
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut iter = folder
            .files
            .range::<str, _>((start, Bound::Unbounded))
            .map(|(_, m)| m.info(owner));
        let page: Vec<FileInfo> = iter.by_ref().take(limit).collect();
        let more = iter.next().is_some();
        Ok((page, more))
    }

    pub fn stat(&self, owner: &str, name: &str) -> Result<FileInfo> {
        check_file_name(name).map_err(ServerError::InvalidName)?;
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        folder
            .files
            .get(name)
            .map(|m| m.info(owner))
            .ok_or_else(|| ServerError::NotFound(format!("{owner}/{name}")))
    }

    /// Opens the current version of a file for reading.
    pub fn open_read(&self, owner: &str, name: &str) -> Result<OpenFile> {
        check_file_name(name).map_err(ServerError::InvalidName)?;
        let folder = self.folder(owner)?;
        let folder = lock(&folder)?;
        let meta = folder
            .files
            .get(name)
            .ok_or_else(|| ServerError::NotFound(format!("{owner}/{name}")))?;
        let file = fsutil::open_read(&folder.dir.join(blob_name(meta.version)))?;
        Ok(OpenFile {
            file,
            info: meta.info(owner),
        })
    }

    /// Bytes `owner` may still add: the smaller of quota headroom and disk space above the
    /// reserve, with the error to report when crossed.
    fn allowance(&self, used: u64, quota: Option<u64>) -> Result<(u64, ServerError)> {
        let (_, avail) = fsutil::disk_space(&self.inner.root)?;
        let disk = avail.saturating_sub(self.inner.reserve);
        match quota {
            Some(q) if q.saturating_sub(used) < disk => Ok((
                q.saturating_sub(used),
                ServerError::QuotaExceeded(format!("quota of {q} bytes reached")),
            )),
            _ => Ok((
                disk,
                ServerError::NoSpace("the server's disk is full".to_string()),
            )),
        }
    }

    /// Starts an upload of `name` into `owner`'s folder. `quota` is the owner's quota.
    pub fn begin_upload(
        &self,
        owner: &str,
        name: &str,
        size: Option<u64>,
        quota: Option<u64>,
    ) -> Result<StagedUpload> {
        check_file_name(name).map_err(ServerError::InvalidName)?;
        let folder = self.folder(owner)?;
        // The old version's bytes are freed by the commit, so they count as available.
        let (used, old) = {
            let f = lock(&folder)?;
            (f.used, f.files.get(name).map_or(0, |m| m.size))
        };
        let (allowance, allowance_error) = self.allowance(used.saturating_sub(old), quota)?;
        if let Some(size) = size {
            if size > allowance {
                return Err(allowance_error);
            }
        }
        let path = self.inner.tmp.join(fsutil::temp_name("upload"));
        let file = fsutil::create_new(&path)?;
        Ok(StagedUpload {
            owner: owner.to_string(),
            name: name.to_string(),
            file: Some(file),
            path,
            hasher: blake3::Hasher::new(),
            written: 0,
            allowance,
            allowance_error: Some(allowance_error),
            failed: None,
        })
    }

    /// Makes an upload the current version of its file. Blocking; fsyncs.
    pub fn commit_upload(
        &self,
        mut upload: StagedUpload,
        size: u64,
        blake3_hex: &str,
    ) -> Result<FileInfo> {
        if let Some(e) = upload.failed.take() {
            return Err(e);
        }
        if size != upload.written {
            return Err(ServerError::Protocol(format!(
                "commit of {size} bytes but {} were received",
                upload.written
            )));
        }
        let hash = upload.hasher.finalize().to_hex();
        if !hash.as_str().eq_ignore_ascii_case(blake3_hex) {
            return Err(ServerError::ChecksumMismatch);
        }
        let file = upload
            .file
            .take()
            .ok_or_else(|| ServerError::Internal("upload already finished".into()))?;
        let result = self.install(
            &upload.owner,
            &upload.name,
            &file,
            &upload.path,
            size,
            hash.as_str(),
        );
        if result.is_err() {
            let _ = fs::remove_file(&upload.path);
        }
        result
    }

    fn install(
        &self,
        owner: &str,
        name: &str,
        file: &File,
        tmp_path: &Path,
        size: u64,
        hash: &str,
    ) -> Result<FileInfo> {
        file.sync_all()?;
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        let version = self.next_version();
        let blob = folder.dir.join(blob_name(version));
        fs::rename(tmp_path, &blob)?;
        fsutil::sync_dir(&folder.dir)?;
        let meta = FileMeta {
            name: name.to_string(),
            size,
            mtime_ns: fsutil::now_ns(),
            version,
            blake3: hash.to_string(),
        };
        if let Err(e) = self.write_meta(&folder.dir, &meta) {
            let _ = fs::remove_file(&blob);
            return Err(e);
        }
        let old = folder.files.insert(name.to_string(), meta.clone());
        folder.used += size;
        if let Some(old) = old {
            folder.used = folder.used.saturating_sub(old.size);
            remove_quietly(&folder.dir.join(blob_name(old.version)));
        }
        Ok(meta.info(owner))
    }

    fn write_meta(&self, dir: &Path, meta: &FileMeta) -> Result<()> {
        let bytes = serde_json::to_vec(meta)
            .map_err(|e| ServerError::Internal(format!("cannot encode metadata: {e}")))?;
        fsutil::write_atomic(&self.inner.tmp, &dir.join(meta_name(&meta.name)), &bytes)?;
        Ok(())
    }

    /// Deletes a file of `owner`'s.
    pub fn delete(&self, owner: &str, name: &str) -> Result<()> {
        check_file_name(name).map_err(ServerError::InvalidName)?;
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        let Some(meta) = folder.files.get(name).cloned() else {
            return Err(ServerError::NotFound(format!("{owner}/{name}")));
        };
        fs::remove_file(folder.dir.join(meta_name(name)))?;
        fsutil::sync_dir(&folder.dir)?;
        folder.files.remove(name);
        folder.used = folder.used.saturating_sub(meta.size);
        remove_quietly(&folder.dir.join(blob_name(meta.version)));
        Ok(())
    }

    /// Renames within `owner`'s folder, replacing `to`. The content gets a new version (a
    /// hard link of the blob) so the old and new names never share a blob: a crash between
    /// the steps leaves both names readable rather than one dangling.
    pub fn rename(&self, owner: &str, from: &str, to: &str) -> Result<FileInfo> {
        check_file_name(from).map_err(ServerError::InvalidName)?;
        check_file_name(to).map_err(ServerError::InvalidName)?;
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        let Some(src) = folder.files.get(from).cloned() else {
            return Err(ServerError::NotFound(format!("{owner}/{from}")));
        };
        if from == to {
            return Ok(src.info(owner));
        }
        let version = self.next_version();
        fs::hard_link(
            folder.dir.join(blob_name(src.version)),
            folder.dir.join(blob_name(version)),
        )?;
        fsutil::sync_dir(&folder.dir)?;
        let meta = FileMeta {
            name: to.to_string(),
            version,
            ..src.clone()
        };
        if let Err(e) = self.write_meta(&folder.dir, &meta) {
            remove_quietly(&folder.dir.join(blob_name(version)));
            return Err(e);
        }
        fs::remove_file(folder.dir.join(meta_name(from)))?;
        fsutil::sync_dir(&folder.dir)?;
        folder.files.remove(from);
        remove_quietly(&folder.dir.join(blob_name(src.version)));
        if let Some(old) = folder.files.insert(to.to_string(), meta.clone()) {
            folder.used = folder.used.saturating_sub(old.size);
            remove_quietly(&folder.dir.join(blob_name(old.version)));
        }
        Ok(meta.info(owner))
    }

    /// Space as the owner should see it.
    pub fn space(&self, owner: &str, quota: Option<u64>) -> Result<Space> {
        let folder = self.folder(owner)?;
        let (used, files) = {
            let f = lock(&folder)?;
            (f.used, f.files.len() as u64)
        };
        let (total, avail) = fsutil::disk_space(&self.inner.root)?;
        let disk_avail = avail.saturating_sub(self.inner.reserve);
        Ok(match quota {
            Some(q) => Space {
                total: q,
                available: q.saturating_sub(used).min(disk_avail),
                used,
                files,
            },
            None => Space {
                total,
                available: disk_avail,
                used,
                files,
            },
        })
    }

    /// Removes a user's folder entirely (account removal).
    pub fn remove_folder(&self, owner: &str) -> Result<()> {
        check_user_name(owner).map_err(ServerError::InvalidName)?;
        lock(&self.inner.folders)?.remove(owner);
        let dir = self.inner.root.join("files").join(owner);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn blob_name(version: u64) -> String {
    format!("{version:016x}.blob")
}

fn meta_name(name: &str) -> String {
    let hash = blake3::hash(name.as_bytes()).to_hex();
    format!("{}.meta", &hash.as_str()[..32])
}

fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove old blob");
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| ServerError::Internal("a storage lock was poisoned by a panic".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &Store, owner: &str, name: &str, data: &[u8]) -> Result<FileInfo> {
        let mut up = store.begin_upload(owner, name, Some(data.len() as u64), None)?;
        up.write_chunk(0, data);
        let hash = blake3::hash(data).to_hex();
        store.commit_upload(up, data.len() as u64, hash.as_str())
    }

    fn read_all(store: &Store, owner: &str, name: &str) -> Vec<u8> {
        use std::io::Read;
        let mut f = store.open_read(owner, name).unwrap().file;
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn upload_replace_rename_delete_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        put(&store, "alice", "a.txt", b"one").unwrap();
        let reader = store.open_read("alice", "a.txt").unwrap();
        put(&store, "alice", "a.txt", b"two!").unwrap();
        // The old handle still reads the old version.
        let mut old = Vec::new();
        std::io::Read::read_to_end(&mut &reader.file, &mut old).unwrap();
        assert_eq!(old, b"one");
        assert_eq!(read_all(&store, "alice", "a.txt"), b"two!");
        store.rename("alice", "a.txt", "b.txt").unwrap();
        assert!(matches!(
            store.stat("alice", "a.txt"),
            Err(ServerError::NotFound(_))
        ));
        put(&store, "alice", "c.txt", b"c").unwrap();
        store.delete("alice", "c.txt").unwrap();

        let store = Store::open(dir.path(), 0).unwrap();
        let list = store.list("alice").unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name, "b.txt");
        assert_eq!(read_all(&store, "alice", "b.txt"), b"two!");
        assert_eq!(store.space("alice", None).unwrap().used, 4);
        let blobs = fs::read_dir(dir.path().join("files/alice"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".blob")
            })
            .count();
        assert_eq!(blobs, 1);
    }

    #[test]
    fn bad_checksum_and_size_keep_old_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        put(&store, "alice", "f", b"old").unwrap();
        let mut up = store.begin_upload("alice", "f", None, None).unwrap();
        up.write_chunk(0, b"new");
        assert!(matches!(
            store.commit_upload(up, 3, "00"),
            Err(ServerError::ChecksumMismatch)
        ));
        let up = store.begin_upload("alice", "f", None, None).unwrap();
        assert!(store.commit_upload(up, 3, "00").is_err());
        assert_eq!(read_all(&store, "alice", "f"), b"old");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn quota_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        assert!(matches!(
            store.begin_upload("alice", "f", Some(11), Some(10)),
            Err(ServerError::QuotaExceeded(_))
        ));
        let mut up = store.begin_upload("alice", "f", None, Some(10)).unwrap();
        up.write_chunk(0, &[0; 8]);
        up.write_chunk(8, &[0; 8]);
        assert!(matches!(
            store.commit_upload(up, 16, "x"),
            Err(ServerError::QuotaExceeded(_))
        ));
    }

    #[test]
    fn listing_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        for i in 0..7 {
            put(&store, "alice", &format!("f{i}"), b"x").unwrap();
        }
        let (p1, more) = store.list_page("alice", None, 3).unwrap();
        assert!(more);
        let (p2, _) = store.list_page("alice", Some(&p1[2].name), 3).unwrap();
        let (p3, more) = store.list_page("alice", Some(&p2[2].name), 3).unwrap();
        assert!(!more);
        let names: Vec<_> = p1
            .iter()
            .chain(&p2)
            .chain(&p3)
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(names, ["f0", "f1", "f2", "f3", "f4", "f5", "f6"]);
    }

    #[test]
    fn names_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        for bad in ["../x", "a/b", ".", "..", "a\0b"] {
            assert!(matches!(
                put(&store, "alice", bad, b"x"),
                Err(ServerError::InvalidName(_))
            ));
        }
        assert!(matches!(
            put(&store, "../etc", "x", b"x"),
            Err(ServerError::InvalidName(_))
        ));
    }
}
