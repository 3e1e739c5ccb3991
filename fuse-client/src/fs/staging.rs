//! Where staged writes live on disk, and what happens to those a mount leaves behind.
//!
//! Each mount process stages in a directory of its own, `staging/<mount>/`, and holds an
//! exclusive `flock` on that directory for as long as it runs: the kernel drops the lock
//! when the process ends, however it ends. Next to each staged file `F` a sidecar `F.name`
//! records the name it is to be uploaded as, written when the file is created and
//! rewritten on rename, so the data can still be told apart once its mount is gone.
//!
//! A mount that ends without unmounting (`kill -9`, a crash, a power cut) leaves its
//! directory with the lock free. The next mount of the same cache recovers it: each staged
//! file goes to `failed/` under its name, and the directory goes. The data is kept even if
//! the server may already have it: the protocol gives no content hash to compare with,
//! and downloading a file to compare could take as long as the upload that failed.
//! Directories whose lock is held belong to a live mount and are left alone, so two
//! mounts of one cache never take each other's files.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sharefs_protocol::name::check_file_name;

/// Suffix of the sidecar that names a staged file.
const NAME_SUFFIX: &str = ".name";
/// How often a newly created directory may be taken by a concurrent recovery (it looks
/// abandoned until locked) before giving up.
const CREATE_ATTEMPTS: u32 = 8;

/// This mount's staging directory, locked for the life of the process.
#[derive(Debug)]
pub struct StagingArea {
    dir: PathBuf,
    /// Holds the `flock` that tells other mounts this directory is in use.
    _lock: File,
}

/// A staged file of an ended mount, moved to `failed/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The name it was to be uploaded as (`unnamed` when its sidecar was lost).
    pub name: String,
    pub kept: PathBuf,
    pub size: u64,
}

impl StagingArea {
    /// Creates and locks a fresh directory under `root`.
    pub fn create(root: &Path) -> io::Result<StagingArea> {
        std::fs::create_dir_all(root)?;
        for _ in 0..CREATE_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("mount-")
                .tempdir_in(root)?
                .keep();
            let lock = File::open(&dir)?;
            lock.lock()?;
            // A recovery running between the mkdir and the lock saw an unlocked, empty
            // directory and removed it: start over with another.
            let ours = std::fs::metadata(&dir)
                .and_then(|m| Ok((m, lock.metadata()?)))
                .is_ok_and(|(path, held)| path.dev() == held.dev() && path.ino() == held.ino());
            if ours {
                return Ok(StagingArea { dir, _lock: lock });
            }
        }
        Err(io::Error::other(format!(
            "{}: cannot create a staging directory",
            root.display()
        )))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for StagingArea {
    /// Removes the directory when nothing was left in it; otherwise the next mount
    /// recovers what is there once this process (and its lock) is gone.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn sidecar(staged: &Path) -> PathBuf {
    let mut p = OsString::from(staged.as_os_str());
    p.push(NAME_SUFFIX);
    PathBuf::from(p)
}

/// Records `name` as the name of the staged file `staged` (replacing any earlier one
/// whole, so a crash leaves the old name or the new, never a mix).
pub fn record_name(staged: &Path, name: &str) -> io::Result<()> {
    let target = sidecar(staged);
    let mut tmp = OsString::from(target.as_os_str());
    tmp.push(".tmp");
    std::fs::write(&tmp, name)?;
    std::fs::rename(&tmp, &target)
}

/// Removes a staged file and its sidecar.
pub fn remove(staged: &Path) -> io::Result<()> {
    let _ = std::fs::remove_file(sidecar(staged));
    std::fs::remove_file(staged)
}

/// Moves a staged file to `failed_dir` under its name; returns where it went.
pub fn keep(staged: &Path, name: &str, failed_dir: &Path) -> io::Result<PathBuf> {
    std::fs::create_dir_all(failed_dir)?;
    let kept = failed_path(failed_dir, name);
    std::fs::rename(staged, &kept)?;
    let _ = std::fs::remove_file(sidecar(staged));
    Ok(kept)
}

/// Recovers the staging directories under `root` whose mount has ended (their lock is
/// free), moving their files to `failed_dir`. Directories of live mounts, this one's
/// included, are skipped.
pub fn recover(root: &Path, failed_dir: &Path) -> Vec<Recovered> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return out;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(lock) = File::open(&dir) else {
            continue;
        };
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => continue,
            Err(std::fs::TryLockError::Error(e)) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot lock a staging directory");
                continue;
            }
        }
        recover_dir(&dir, failed_dir, &mut out);
        // Removed while locked, so its owner-to-be (if it was just created) sees it gone.
        if let Err(e) = std::fs::remove_dir(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a staging directory");
        }
    }
    out
}

fn recover_dir(dir: &Path, failed_dir: &Path, out: &mut Vec<Recovered>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut sidecars = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let is_sidecar = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(NAME_SUFFIX) || n.ends_with(".tmp"));
        if is_sidecar {
            sidecars.push(path);
            continue;
        }
        let name = std::fs::read_to_string(sidecar(&path))
            .ok()
            .filter(|n| check_file_name(n).is_ok())
            .unwrap_or_else(|| "unnamed".to_string());
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        match keep(&path, &name, failed_dir) {
            Ok(kept) => {
                tracing::warn!(
                    file = %name,
                    size,
                    kept = %kept.display(),
                    "a mount that ended without unmounting left this file's data unsaved; kept locally"
                );
                out.push(Recovered { name, kept, size });
            }
            Err(e) => tracing::error!(
                file = %name,
                path = %path.display(),
                error = %e,
                "cannot keep the data a mount that ended left behind"
            ),
        }
    }
    for path in sidecars {
        let _ = std::fs::remove_file(path);
    }
}

/// `dir/<time>-<n>-<name>` that does not exist yet, within the 255-byte name limit.
pub fn failed_path(dir: &Path, name: &str) -> PathBuf {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_of_an_ended_mount_are_kept_under_their_names() {
        let cache = tempfile::tempdir().unwrap();
        let root = cache.path().join("staging");
        let failed = cache.path().join("failed");
        let live = StagingArea::create(&root).unwrap();
        // What a mount killed mid-write leaves: a directory nobody holds a lock on.
        let ended_dir = root.join("mount-ended");
        std::fs::create_dir(&ended_dir).unwrap();
        let staged = ended_dir.join("staged-1");
        std::fs::write(&staged, b"unsaved").unwrap();
        record_name(&staged, "first").unwrap();
        record_name(&staged, "report.txt").unwrap();
        std::fs::write(ended_dir.join("staged-2"), b"no name").unwrap();
        let in_use = live.dir().join("staged-3");
        std::fs::write(&in_use, b"being written").unwrap();
        record_name(&in_use, "live.txt").unwrap();

        let mut got = recover(&root, &failed);
        got.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].name, "report.txt");
        assert_eq!(std::fs::read(&got[0].kept).unwrap(), b"unsaved");
        assert!(got[0].kept.to_string_lossy().ends_with("-report.txt"));
        assert_eq!(got[1].name, "unnamed");
        assert_eq!(std::fs::read(&got[1].kept).unwrap(), b"no name");
        assert!(!ended_dir.exists());
        // The live mount's file stays where it is, with its name.
        assert_eq!(std::fs::read(&in_use).unwrap(), b"being written");
        assert_eq!(
            std::fs::read_to_string(sidecar(&in_use)).unwrap(),
            "live.txt"
        );
        let live_dir = live.dir().to_path_buf();
        remove(&in_use).unwrap();
        drop(live);
        assert!(!live_dir.exists());
    }
}
