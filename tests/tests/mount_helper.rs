//! `mount -t fuse.sharefs` and /etc/fstab lines, through the real mount(8).
//!
//! util-linux mount(8) runs the helper `/sbin/mount.fuse.sharefs` for type
//! `fuse.sharefs` and has no option to look for helpers elsewhere, so these tests install
//! it there (a symbolic link to the `sharefs` binary under test, the way sshfs installs
//! `mount.fuse.sshfs`) and remove it in `Drop`. That needs root, as CI runs; an existing
//! helper that is not a link to this build is left alone and the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sharefs_tests::mount::fuse_available;
use sharefs_tests::*;

const HELPER: &str = "/sbin/mount.fuse.sharefs";

/// One test at a time owns the helper in /sbin.
static HELPER_LOCK: Mutex<()> = Mutex::new(());

/// `/sbin/mount.fuse.sharefs` -> the `sharefs` under test, removed in `Drop`.
struct InstalledHelper {
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl InstalledHelper {
    fn install() -> InstalledHelper {
        let lock = HELPER_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let sharefs = bin("sharefs");
        match std::fs::read_link(HELPER) {
            Ok(target) if target == sharefs => {}
            Ok(target) => panic!(
                "{HELPER} exists (-> {}); not replacing it",
                target.display()
            ),
            Err(_) if Path::new(HELPER).exists() => panic!("{HELPER} exists; not replacing it"),
            Err(_) => std::os::unix::fs::symlink(&sharefs, HELPER)
                .unwrap_or_else(|e| panic!("installing {HELPER} (needs root): {e}")),
        }
        InstalledHelper { _lock: lock }
    }
}

impl Drop for InstalledHelper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(HELPER);
    }
}

/// A mount made by mount(8) at `dir`; unmounted (lazily, so a failed test cannot leave
/// it behind busy) in `Drop` if the test did not.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    /// The /proc/mounts line of this mount point.
    fn entry(&self) -> Option<String> {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let dir = self.dir.to_string_lossy().to_string();
        mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(dir.as_str()))
            .map(str::to_string)
    }

    fn umount(&self) {
        let out = output_within(Command::new("umount").arg(&self.dir));
        assert!(
            out.status.success(),
            "umount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(self.entry(), None, "still mounted after umount");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.entry().is_some() {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.dir)
                .status();
        }
    }
}

/// The files a mount by mount(8) needs: a password file, a mount point, a cache.
struct Setup {
    tmp: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("Share")).unwrap();
        std::fs::write(tmp.path().join("pw"), format!("{PASSWORD}\n")).unwrap();
        Setup { tmp }
    }

    fn mountpoint(&self) -> PathBuf {
        self.tmp.path().join("Share")
    }

    fn cache(&self) -> PathBuf {
        self.tmp.path().join("cache")
    }

    /// sharefs's options plus those mount(8), systemd and fstab add for themselves.
    fn options(&self, server: &TestServer) -> String {
        format!(
            "_netdev,x-systemd.automount,x-systemd.idle-timeout=60,user,allow_other,nofail,rw,\
             password_file={},server_fingerprint={},cache_dir={}",
            self.tmp.path().join("pw").display(),
            server.fingerprint.as_deref().expect("a TLS server"),
            self.cache().display()
        )
    }

    /// `mount` with an environment of no SHAREFS_* settings nor stored logins.
    fn mount_command(&self, server: &TestServer) -> Command {
        let mut cmd = Command::new("mount");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SHAREFS_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("XDG_CONFIG_HOME", server.config_home());
        cmd
    }
}

/// What the mount shows and stores once mount(8) has returned.
fn check_mount(server: &TestServer, setup: &Setup, mounted: &Mounted) {
    let entry = mounted
        .entry()
        .expect("mount(8) returned without a mount in place");
    let fields: Vec<&str> = entry.split(' ').collect();
    assert_eq!(fields[2], "fuse.sharefs", "{entry}");
    assert!(fields[0].starts_with("sharefs:alice@"), "{entry}");
    assert!(entry.contains("allow_other"), "{entry}");
    std::fs::write(setup.mountpoint().join("alice/hello.txt"), b"hello").unwrap();
    assert_eq!(
        server_content(server, "alice", "hello.txt").as_deref(),
        Some(&b"hello"[..])
    );
    let log = std::fs::read_to_string(setup.cache().join("mount.log")).unwrap();
    assert!(log.contains("mounted"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "ANSI codes in the mount log: {log:?}"
    );
}

#[test]
fn mount_t_fuse_sharefs_mounts_in_the_background() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let _helper = InstalledHelper::install();
    let setup = Setup::new();
    let mounted = Mounted {
        dir: setup.mountpoint(),
    };
    let mut mount = setup.mount_command(&server);
    mount
        .args(["-t", "fuse.sharefs"])
        .arg(format!("alice@{}", server.addr))
        .arg(setup.mountpoint())
        .arg("-o")
        .arg(setup.options(&server));
    let out = output_within(&mut mount);
    assert!(
        out.status.success(),
        "mount -t fuse.sharefs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_mount(&server, &setup, &mounted);

    // A second mount there is refused, as is a misspelt option.
    let out = output_within(
        setup
            .mount_command(&server)
            .args(["-t", "fuse.sharefs"])
            .arg(format!("alice@{}", server.addr))
            .arg(setup.mountpoint())
            .arg("-o")
            .arg(setup.options(&server)),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already mounted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    mounted.umount();

    let out = output_within(
        setup
            .mount_command(&server)
            .args(["-t", "fuse.sharefs"])
            .arg(format!("alice@{}", server.addr))
            .arg(setup.mountpoint())
            .arg("-o")
            .arg(format!("{},allow_otter", setup.options(&server))),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown mount option allow_otter"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mounted.entry(), None);
}

#[test]
fn an_fstab_line_mounts_with_mount_a() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let _helper = InstalledHelper::install();
    let setup = Setup::new();
    let mounted = Mounted {
        dir: setup.mountpoint(),
    };
    let fstab = setup.tmp.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# a test fstab\nalice@{}  {}  fuse.sharefs  {}  0  0\n",
            server.addr,
            setup.mountpoint().display(),
            setup.options(&server)
        ),
    )
    .unwrap();
    let out = output_within(setup.mount_command(&server).arg("-a").arg("-T").arg(&fstab));
    assert!(
        out.status.success(),
        "mount -a -T: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_mount(&server, &setup, &mounted);
    mounted.umount();
}
