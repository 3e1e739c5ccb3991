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

    /// Writes a filler file so that about `leave` bytes stay free.
    pub fn fill_leaving(&self, leave: u64) {
        let free = self.free();
        let filler = self.join("filler");
        let f = std::fs::File::create(&filler).unwrap();
        f.set_len(0).unwrap();
        let mut left = free.saturating_sub(leave);
        let block = vec![0x5au8; 1 << 20];
        use std::io::Write;
        let mut w = std::io::BufWriter::new(f);
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            w.write_all(&block[..n]).unwrap();
            left -= n as u64;
        }
        w.flush().unwrap();
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
