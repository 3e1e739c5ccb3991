//! [`SmallFs`]: a tmpfs of a few MiB, mounted for one test, so a full disk is a real one.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a fixed size on a temp directory, unmounted (lazily) on drop.
pub struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `mib` MiB. Needs root (CI runs as root): fails the test otherwise.
    pub fn new(mib: u64) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={mib}m,mode=0700"))
            .arg("sharefs-test")
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "cannot mount a {mib} MiB tmpfs (the full-disk tests need root)"
        );
        SmallFs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path on the small filesystem.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Bytes free for an unprivileged writer.
    pub fn free(&self) -> u64 {
        let (_, avail) = sharefs_server::fsutil::disk_space(self.path()).unwrap();
        avail
    }

    /// Writes a filler file so that about `leave` bytes stay free (none: as much as fits).
    pub fn fill_leaving(&self, leave: u64) {
        use std::io::Write;
        let mut left = self.free().saturating_sub(leave);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.join("filler"))
            .unwrap();
        let block = vec![0x5au8; 1 << 20];
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            match f.write(&block[..n]) {
                Ok(0) => break,
                Ok(w) => left -= w as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the small filesystem: {e}"),
            }
        }
    }

    /// Removes the filler file: the space it took is free again.
    pub fn unfill(&self) {
        std::fs::remove_file(self.join("filler")).unwrap();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
