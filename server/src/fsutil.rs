//! Durable file operations: every metadata write is temp file + fsync + rename + fsync of
//! the directory, so a `kill -9` or power cut leaves the old or the new version, never a mix.
//!
//! Everything is created private, whatever the umask: files [`FILE_MODE`], directories
//! [`DIR_MODE`]. The data directory holds password hashes and every user's files; the
//! server enforces who reads what, so nothing in it is for other local accounts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Mode of every file the server creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory the server creates, the data directory included.
pub const DIR_MODE: u32 = 0o700;

/// Creates a file that did not exist, without following a symlink at `path`.
pub fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens a file for reading and writing, creating it (private) if needed, refusing
/// symlinks.
pub fn open_rw(path: &Path, truncate: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens an existing file for reading, refusing symlinks.
pub fn open_read(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// fsyncs a directory so renames and unlinks in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A unique name for a temp file of this process.
pub fn temp_name(prefix: &str) -> String {
    format!(
        "{prefix}.{}.{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes `bytes` to `target` atomically and durably, staging in `tmp_dir` (same filesystem);
/// the caller fsyncs the target's directory.
fn write_atomic_nosync_dir(tmp_dir: &Path, target: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_dir.join(temp_name("meta"));
    let result = (|| {
        let mut f = create_new(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, target)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic_nosync_dir`] followed by an fsync of the target's directory.
pub fn write_atomic(tmp_dir: &Path, target: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_nosync_dir(tmp_dir, target, bytes)?;
    match target.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Creates a directory and its parents (mode [`DIR_MODE`]), making the new entries durable.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    create_dir_private(dir)?;
    match dir.parent() {
        // A relative path of one component ("data") has the empty path as its parent.
        Some(parent) if parent.as_os_str().is_empty() => sync_dir(Path::new(".")),
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Creates a directory and its missing parents with mode [`DIR_MODE`] (not durable).
pub fn create_dir_private(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Creates the data directory if needed and makes it private: one written by an earlier
/// version, or by hand under a permissive umask, may be readable by other accounts; with
/// the directory 0700 nothing beneath it is reachable by them, whatever the files' modes.
pub fn make_data_dir_private(dir: &Path) -> io::Result<()> {
    create_dir_private(dir)?;
    let mode = fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode != DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub fn now_ms() -> i64 {
    now_ns() / 1_000_000
}

/// Total and available bytes of the filesystem holding `path`.
pub fn disk_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

/// The JSON value stored in `path`; `None` if there is no such file. A file that does not
/// parse is `Corrupt`, naming it. Parsed as it is read, never whole in memory (a
/// snapshot of a 100,000-entry tree is 16 MiB; parsing from a slice is 10-20% faster).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> crate::error::Result<Option<T>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_reader(io::BufReader::with_capacity(256 << 10, file))
        .map(Some)
        .map_err(|source| match source.io_error_kind() {
            Some(kind) => io::Error::new(kind, source).into(),
            None => crate::error::ServerError::Corrupt {
                path: path.display().to_string(),
                source,
            },
        })
}
