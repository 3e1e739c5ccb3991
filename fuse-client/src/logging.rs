//! The client's log: `tracing` to stderr, coloured only when stderr is a terminal (and
//! `NO_COLOR` is unset), so a log file never holds ANSI codes.
//!
//! A background mount's stderr is its log file, which would grow for as long as the mount
//! lives. There the log rotates by size: once the file passes [`ROTATE_BYTES`], it becomes
//! `NAME.1` (replacing an older one) and a new file takes its place *as stderr* (`dup2`),
//! so panics and the last error line, which go to stderr directly, follow the rotation.

use std::io::{IsTerminal, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Environment variable naming the log file a background mount's stderr is; set by the
/// parent that starts it.
pub const LOG_FILE_ENV: &str = "SHAREFS_LOG_FILE";

/// Size at which the log file rotates: bounded disk use, one old file kept.
pub const ROTATE_BYTES: u64 = 8 << 20;

/// Installs the global subscriber: `RUST_LOG`, or `default_level`.
pub fn init(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match std::env::var_os(LOG_FILE_ENV) {
        Some(path) => {
            let log = RotatingLog::new(PathBuf::from(path), libc::STDERR_FILENO, ROTATE_BYTES);
            builder.with_writer(move || log.clone()).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
}

/// A log written through descriptor `fd`, which is the file at `path`; rotated to
/// `path.1` past `limit` bytes.
#[derive(Clone)]
pub struct RotatingLog {
    inner: Arc<Mutex<Rotation>>,
}

struct Rotation {
    path: PathBuf,
    fd: RawFd,
    limit: u64,
    /// Bytes in the current file (what it had when we started, plus what we wrote).
    written: u64,
    /// Set when a rotation failed: logging goes on into the same file, without retrying
    /// on every line.
    stuck: bool,
}

impl RotatingLog {
    pub fn new(path: PathBuf, fd: RawFd, limit: u64) -> RotatingLog {
        let written = std::fs::metadata(&path).map_or(0, |m| m.len());
        RotatingLog {
            inner: Arc::new(Mutex::new(Rotation {
                path,
                fd,
                limit,
                written,
                stuck: false,
            })),
        }
    }
}

/// `path.1`.
pub fn old_log(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

impl Rotation {
    fn rotate(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, old_log(&self.path))?;
        let fresh = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        // SAFETY: dup2 onto a descriptor we write through; both are open.
        if unsafe { libc::dup2(fresh.as_raw_fd(), self.fd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.written = 0;
        Ok(())
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: writing from a valid buffer to a descriptor we were given.
        let n = unsafe { libc::write(self.fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        self.written += n as u64;
        if self.written > self.limit && !self.stuck {
            if let Err(e) = self.rotate() {
                self.stuck = true;
                let line = format!("sharefs: log rotation failed, not retried: {e}\n");
                // SAFETY: as above.
                unsafe { libc::write(self.fd, line.as_ptr().cast(), line.len()) };
            }
        }
        Ok(n)
    }
}

impl Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        r.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_rotates_past_its_limit_keeping_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mount.log");
        let file = std::fs::File::create(&path).unwrap();
        // A descriptor of our own plays stderr's part.
        let fd = file.as_raw_fd();
        let mut log = RotatingLog::new(path.clone(), fd, 100);
        let line = [b'x'; 60];
        log.write_all(&line).unwrap();
        assert!(!old_log(&path).exists());
        log.write_all(&line).unwrap(); // 120 > 100: rotated after this line
        assert_eq!(std::fs::metadata(old_log(&path)).unwrap().len(), 120);
        log.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"after\n");
        for _ in 0..4 {
            log.write_all(&line).unwrap();
        }
        // Two rotations later: one old file, the current one small.
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 2);
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        drop(file);
    }
}
