//! A real kernel FUSE mount of `sharefs mount --foreground`, unmounted and killed in
//! `Drop` (also on panic).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{bin, TestServer, PASSWORD, TIMEOUT};

/// Whether this machine can mount FUSE filesystems. Without it, mount tests skip loudly,
/// unless `SHAREFS_REQUIRE_FUSE` is set (CI), where they fail.
pub fn fuse_available() -> bool {
    crate::present_or_skip(
        Path::new("/dev/fuse").exists() && crate::runs("fusermount3"),
        "SHAREFS_REQUIRE_FUSE",
        "FUSE (/dev/fuse and fusermount3)",
    )
}

pub struct TestMount {
    child: Option<Child>,
    /// The mount point; `root()/alice` is alice's folder.
    dir: tempfile::TempDir,
    /// Holds the log (and, unless another cache was given, the cache directory).
    pub cache: tempfile::TempDir,
    /// The `--cache-dir` of the mount.
    cache_dir: PathBuf,
    log: PathBuf,
}

impl TestMount {
    /// Mounts `server` as `user`.
    pub fn new(server: &TestServer, user: &str) -> TestMount {
        Self::with(server, user, &[], &[])
    }

    pub fn with(server: &TestServer, user: &str, args: &[&str], env: &[(&str, &str)]) -> TestMount {
        let cache = tempfile::tempdir().unwrap();
        let cache_dir = cache.path().join("cache");
        Self::start(server, user, args, env, cache, cache_dir)
    }

    /// Mounts `server` as `user` with `cache_dir` as its cache (shared with another mount).
    pub fn with_cache_dir(
        server: &TestServer,
        user: &str,
        args: &[&str],
        cache_dir: &Path,
    ) -> TestMount {
        let cache = tempfile::tempdir().unwrap();
        Self::start(server, user, args, &[], cache, cache_dir.to_path_buf())
    }

    fn start(
        server: &TestServer,
        user: &str,
        args: &[&str],
        env: &[(&str, &str)],
        cache: tempfile::TempDir,
        cache_dir: PathBuf,
    ) -> TestMount {
        let dir = tempfile::tempdir().unwrap();
        let log = cache.path().join("mount.log");
        let mut mount = TestMount {
            child: None,
            dir,
            cache,
            cache_dir,
            log,
        };
        if let Err(e) = mount.spawn(server, user, args, env) {
            mount.stop();
            panic!("{e}");
        }
        mount
    }

    /// The `sharefs mount --foreground` command for this mount point and cache.
    pub fn command(&self, server: &TestServer, user: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("sharefs"));
        cmd.env("SHAREFS_SERVER", &server.addr)
            .env("SHAREFS_USER", user)
            .env("SHAREFS_PASSWORD", PASSWORD)
            .env("XDG_CONFIG_HOME", server.config_home())
            .env(
                "SHAREFS_KNOWN_SERVERS",
                self.cache.path().join("known_servers"),
            )
            .env("RUST_LOG", "info,sharefs_client=debug")
            .env("NO_COLOR", "1")
            .arg("mount")
            .arg(self.dir.path())
            .arg("--foreground")
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .args(args)
            .stdin(Stdio::null());
        server.transport_env(&mut cmd);
        cmd
    }

    /// Starts the mount process and waits until it reports the mount is up; on failure,
    /// returns the log. Its log is appended to this mount's.
    fn spawn(
        &mut self,
        server: &TestServer,
        user: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(), String> {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = self.command(server, user, args);
        cmd.env("SHAREFS_MOUNT_READY", "1")
            .stdout(Stdio::piped())
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let rx = crate::first_line(stdout);
        self.child = Some(child);
        match rx.recv_timeout(TIMEOUT) {
            Ok(line) if line.trim() == "ready" => Ok(()),
            _ => Err(format!("mount did not come up; log:\n{}", self.log_text())),
        }
    }

    /// `kill -9` of the mount process: the mount point stays behind, dead.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Mounts again on the same mount point and cache (after [`TestMount::kill9`]), the
    /// way a user would: `sharefs mount` on the same directory.
    pub fn remount(
        &mut self,
        server: &TestServer,
        user: &str,
        args: &[&str],
    ) -> Result<(), String> {
        assert!(self.child.is_none(), "the mount process still runs");
        self.spawn(server, user, args, &[])
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Files kept because their upload failed.
    pub fn failed_dir(&self) -> PathBuf {
        self.cache_dir.join("failed")
    }

    /// The cache directory (`--cache-dir`).
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Unmounts the way a user does and waits for the process to exit.
    pub fn unmount(&mut self) -> std::process::ExitStatus {
        let status = Command::new("fusermount3")
            .arg("-u")
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "fusermount3 -u failed");
        let mut child = self.child.take().unwrap();
        wait_bounded(&mut child)
    }

    /// Sends SIGINT (Ctrl-C) to the foreground mount and waits for it to exit.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        wait_bounded(&mut child)
    }

    pub fn is_mounted(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let target = self.dir.path().to_string_lossy().to_string();
        mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(target.as_str()))
    }

    fn stop(&mut self) {
        if self.is_mounted() {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(self.dir.path())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_bounded(child: &mut Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mount process did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- mount log ---\n{}", self.log_text());
        }
        self.stop();
    }
}
