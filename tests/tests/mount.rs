//! Real kernel FUSE mounts of a real server: what a user does with `~/Share`.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sharefs_tests::mount::{fuse_available, TestMount};
use sharefs_tests::*;

fn assert_errno<T: std::fmt::Debug>(r: std::io::Result<T>, errno: i32, what: &str) {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected errno {errno}"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(errno), "{what}: {e}"),
    }
}

#[test]
fn own_folder_supports_the_usual_write_patterns() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    let mut users: Vec<_> = fs::read_dir(alice.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    users.sort();
    assert_eq!(users, ["alice", "bob", "carol"]);

    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("report.txt");
    let data = content(1, 300_000);
    fs::write(&src, &data).unwrap();

    // Upload with cp: after close, durable on the server.
    run_ok(Command::new("cp").arg(&src).arg(alice.path("alice/")));
    assert_eq!(
        server_content(&server, "alice", "report.txt").unwrap(),
        data
    );
    let meta = fs::metadata(alice.path("alice/report.txt")).unwrap();
    assert_eq!(meta.len(), data.len() as u64);
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    let listing = run_ok(Command::new("ls").arg("-l").arg(alice.path("alice")));
    assert!(
        listing.contains("report.txt") && listing.contains(&data.len().to_string()),
        "{listing}"
    );

    // Overwrite.
    fs::write(alice.path("alice/report.txt"), b"short now").unwrap();
    assert_eq!(
        server_content(&server, "alice", "report.txt").unwrap(),
        b"short now"
    );
    assert_eq!(
        fs::read(alice.path("alice/report.txt")).unwrap(),
        b"short now"
    );

    // Append.
    let mut f = OpenOptions::new()
        .append(true)
        .open(alice.path("alice/report.txt"))
        .unwrap();
    f.write_all(b", and more").unwrap();
    drop(f);
    assert_eq!(
        server_content(&server, "alice", "report.txt").unwrap(),
        b"short now, and more"
    );

    // Truncate, through a descriptor and through the path.
    let f = OpenOptions::new()
        .write(true)
        .open(alice.path("alice/report.txt"))
        .unwrap();
    f.set_len(5).unwrap();
    drop(f);
    assert_eq!(
        server_content(&server, "alice", "report.txt").unwrap(),
        b"short"
    );
    run_ok(
        Command::new("truncate")
            .args(["-s", "2"])
            .arg(alice.path("alice/report.txt")),
    );
    assert_eq!(
        server_content(&server, "alice", "report.txt").unwrap(),
        b"sh"
    );

    // Random writes, compared with the same writes on a local file.
    let reference = local.path().join("ref.bin");
    let base = content(2, 3 << 20);
    fs::write(&reference, &base).unwrap();
    fs::write(alice.path("alice/random.bin"), &base).unwrap();
    let mut remote = OpenOptions::new()
        .read(true)
        .write(true)
        .open(alice.path("alice/random.bin"))
        .unwrap();
    let local_f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&reference)
        .unwrap();
    for (i, off) in [5u64, 1 << 20, 3_000_000, (3 << 20) - 3, (3 << 20) + 100]
        .iter()
        .enumerate()
    {
        let chunk = content(10 + i as u64, 7000);
        remote.write_all_at(&chunk, *off).unwrap();
        local_f.write_all_at(&chunk, *off).unwrap();
    }
    // Read back through the same descriptor before close.
    let mut head = vec![0u8; 100];
    remote.seek(SeekFrom::Start(0)).unwrap();
    remote.read_exact(&mut head).unwrap();
    assert_eq!(&head[..], &fs::read(&reference).unwrap()[..100]);
    remote.sync_all().unwrap();
    drop(remote);
    let want = fs::read(&reference).unwrap();
    assert_eq!(
        sha256(&server_content(&server, "alice", "random.bin").unwrap()),
        sha256(&want)
    );
    assert_eq!(
        sha256(&fs::read(alice.path("alice/random.bin")).unwrap()),
        sha256(&want)
    );

    // Rename within the folder, replacing a target.
    fs::write(alice.path("alice/target.txt"), b"old target").unwrap();
    run_ok(
        Command::new("mv")
            .arg(alice.path("alice/report.txt"))
            .arg(alice.path("alice/target.txt")),
    );
    assert_eq!(fs::read(alice.path("alice/target.txt")).unwrap(), b"sh");
    assert_errno(
        fs::metadata(alice.path("alice/report.txt")),
        libc::ENOENT,
        "renamed-away name",
    );
    assert!(server_content(&server, "alice", "report.txt").is_none());
    assert_eq!(
        server_content(&server, "alice", "target.txt").unwrap(),
        b"sh"
    );

    // Empty file (touch) and unlink.
    run_ok(Command::new("touch").arg(alice.path("alice/empty")));
    // Nothing was written: committed at the last release, just after close returns.
    eventually(TIMEOUT, "empty file on the server", || {
        server_content(&server, "alice", "empty").as_deref() == Some(b"")
    });
    // A shell redirection closes a dup of the descriptor before writing: the file must
    // not pass through an empty version on the server.
    fs::write(alice.path("alice/target.txt"), b"before").unwrap();
    let log_before = server.log_text().len();
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "echo after > '{}'",
        alice.path("alice/target.txt").display()
    )));
    assert_eq!(
        server_content(&server, "alice", "target.txt").unwrap(),
        b"after\n"
    );
    let log = server.log_text();
    let commits: Vec<&str> = log[log_before..]
        .lines()
        .filter(|l| l.contains("upload committed") && l.contains("target.txt"))
        .collect();
    assert!(
        commits.iter().all(|l| !l.contains("size=0")),
        "empty intermediate version: {commits:?}"
    );
    run_ok(Command::new("rm").arg(alice.path("alice/empty")));
    assert!(server_content(&server, "alice", "empty").is_none());
    assert_errno(
        fs::metadata(alice.path("alice/empty")),
        libc::ENOENT,
        "deleted file",
    );
    assert_errno(
        fs::read(alice.path("alice/never-existed")),
        libc::ENOENT,
        "missing file",
    );
    assert_errno(
        fs::read_dir(alice.path("nobody")),
        libc::ENOENT,
        "missing user",
    );

    // Things sharefs does not offer in one's own folder.
    // Hard links and special files do not exist (directories and symbolic links do:
    // tests/tree.rs).
    assert_errno(
        fs::hard_link(alice.path("alice/target.txt"), alice.path("alice/hard")),
        libc::EPERM,
        "hard link in own folder",
    );
    // A name the server refuses is refused locally too.
    assert_errno(
        fs::write(alice.path(&format!("alice/{}", "x".repeat(256))), b"x"),
        libc::ENAMETOOLONG,
        "long name",
    );
}

use std::os::unix::fs::PermissionsExt;

#[test]
fn other_users_folders_are_read_only() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    fs::write(alice.path("alice/mine.txt"), b"alice's").unwrap();
    let bob = TestMount::new(&server, "bob");

    let p = bob.path("alice/mine.txt");
    assert_eq!(fs::read(&p).unwrap(), b"alice's");
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o444
    );
    assert_eq!(
        fs::metadata(bob.path("alice"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o555
    );
    let eacces = libc::EACCES;
    assert_errno(
        fs::write(bob.path("alice/new.txt"), b"x"),
        eacces,
        "create in alice/",
    );
    assert_errno(
        OpenOptions::new().write(true).open(&p),
        eacces,
        "open for write",
    );
    assert_errno(
        OpenOptions::new().append(true).open(&p),
        eacces,
        "open for append",
    );
    assert_errno(fs::remove_file(&p), eacces, "unlink");
    assert_errno(
        fs::rename(&p, bob.path("alice/other.txt")),
        eacces,
        "rename in alice/",
    );
    assert_errno(
        fs::rename(&p, bob.path("bob/stolen.txt")),
        eacces,
        "rename out of alice/",
    );
    assert_errno(
        fs::create_dir(bob.path("alice/dir")),
        eacces,
        "mkdir in alice/",
    );
    assert_errno(fs::create_dir(bob.path("newuser")), eacces, "mkdir at root");
    assert_errno(
        fs::write(bob.path("file-at-root"), b"x"),
        eacces,
        "create at root",
    );
    assert_errno(fs::remove_dir(bob.path("alice")), eacces, "rmdir a user");
    let out = Command::new("truncate")
        .args(["-s", "0"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new("touch").arg(&p).output().unwrap();
    assert!(
        !out.status.success(),
        "touch on another user's file succeeded"
    );
    let out = Command::new("rm").arg("-f").arg(&p).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    // Bob's own writes are not affected, nor is alice's file.
    fs::write(bob.path("bob/ok.txt"), b"bob's").unwrap();
    assert_eq!(
        server_content(&server, "alice", "mine.txt").unwrap(),
        b"alice's"
    );
    let names: Vec<_> = fs::read_dir(alice.path("alice"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["mine.txt"]);
}

#[test]
fn changes_appear_in_other_mounts_without_remount() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    let bob = TestMount::new(&server, "bob");
    let in_bob = bob.path("alice/live.txt");
    // Bob looks first, so his kernel has cached the listing and the negative lookup.
    assert!(fs::read_dir(bob.path("alice")).unwrap().next().is_none());
    assert!(!in_bob.exists());

    fs::write(alice.path("alice/live.txt"), b"version one").unwrap();
    eventually(Duration::from_secs(1), "new file visible to bob", || {
        in_bob.exists()
    });
    assert_eq!(fs::read(&in_bob).unwrap(), b"version one");
    let listed: Vec<_> = fs::read_dir(bob.path("alice"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listed, ["live.txt"]);

    // Overwrite with the same length: only a version change can tell.
    fs::write(alice.path("alice/live.txt"), b"version two").unwrap();
    eventually(Duration::from_secs(1), "new content visible to bob", || {
        fs::read(&in_bob).unwrap() == b"version two"
    });
    fs::write(alice.path("alice/live.txt"), b"v3, longer than before").unwrap();
    eventually(Duration::from_secs(1), "new size visible to bob", || {
        fs::metadata(&in_bob).unwrap().len() == 22
    });
    assert_eq!(fs::read(&in_bob).unwrap(), b"v3, longer than before");
    // Opens of an unchanged version keep the kernel's cache and hand it the content
    // again: still the same bytes.
    for _ in 0..2 {
        assert_eq!(fs::read(&in_bob).unwrap(), b"v3, longer than before");
    }

    fs::remove_file(alice.path("alice/live.txt")).unwrap();
    eventually(Duration::from_secs(1), "deleted file gone for bob", || {
        !in_bob.exists()
    });
}

#[test]
fn large_file_round_trip_through_two_mounts() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    let bob = TestMount::new(&server, "bob");
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("big.bin");
    run_ok(
        Command::new("dd")
            .arg("if=/dev/urandom")
            .arg(format!("of={}", src.display()))
            .args(["bs=1M", "count=1024", "status=none"]),
    );
    run_ok(
        Command::new("cp")
            .arg(&src)
            .arg(alice.path("alice/big.bin")),
    );
    let out = local.path().join("out.bin");
    run_ok(Command::new("cp").arg(bob.path("alice/big.bin")).arg(&out));
    let sum = |p: &Path| {
        run_ok(Command::new("sha256sum").arg(p))
            .split(' ')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        sum(&src),
        sum(&out),
        "1 GiB file differs after upload and download"
    );
    // A ranged read far into the file returns the right bytes.
    let f = fs::File::open(bob.path("alice/big.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 777 << 20).unwrap();
    let mut want = vec![0u8; 4096];
    fs::File::open(&src)
        .unwrap()
        .read_exact_at(&mut want, 777 << 20)
        .unwrap();
    assert_eq!(buf, want);
}

#[test]
fn quota_errors_come_on_the_crossing_write_and_at_close() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let quota = |size: &str| {
        run_ok(&mut server.user_command(&["quota", "alice", size]));
    };
    quota("1M");
    let alice = TestMount::new(&server, "alice");
    fs::write(alice.path("alice/keep.txt"), b"old content").unwrap();

    // The write that crosses the quota fails with EDQUOT (122), not the close after the
    // whole file was staged; what was written before it fits and is uploaded.
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(alice.path("alice/keep.txt"))
        .unwrap();
    let chunk = content(3, 64 << 10);
    let mut written = 0usize;
    let refused = loop {
        match f.write(&chunk) {
            Ok(n) => written += n,
            Err(e) => break e,
        }
        assert!(written <= 2 << 20, "no write refused past the 1 MiB quota");
    };
    assert_eq!(refused.raw_os_error(), Some(libc::EDQUOT), "{refused}");
    // Refused on the write that crosses: at most one chunk short of the quota.
    assert!(
        written > (1 << 20) - (128 << 10) && written <= 1 << 20,
        "refused after {written} bytes"
    );
    f.sync_all().unwrap();
    drop(f);
    let fitted = content(3, 64 << 10).repeat(written / (64 << 10));
    assert_eq!(
        server_content(&server, "alice", "keep.txt").unwrap(),
        fitted
    );
    // `dd` past the quota stops at the crossing block with the quota's message.
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", alice.path("alice/dd.bin").display()))
        .args(["bs=64k", "count=64"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Disk quota exceeded"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::remove_file(alice.path("alice/dd.bin")).unwrap();

    // Two files growing at once each fit by what the server has left, not together:
    // the second upload is refused, reported by fsync and by close; the data is kept.
    fs::remove_file(alice.path("alice/keep.txt")).unwrap();
    fs::write(alice.path("alice/keep.txt"), b"old content").unwrap();
    let mut first = fs::File::create(alice.path("alice/first.bin")).unwrap();
    let mut second = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(alice.path("alice/keep.txt"))
        .unwrap();
    first.write_all(&content(4, 600 << 10)).unwrap();
    second.write_all(&content(5, 600 << 10)).unwrap();
    first.sync_all().unwrap();
    assert_errno(second.sync_all(), libc::EDQUOT, "fsync over quota");
    // close reports it too.
    use std::os::fd::IntoRawFd;
    let fd = second.into_raw_fd();
    // SAFETY: closing the descriptor we own.
    let rc = unsafe { libc::close(fd) };
    assert_eq!(rc, -1, "close over quota succeeded");
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EDQUOT)
    );
    drop(first);
    // The server kept the old version; the staged data was kept locally.
    assert_eq!(
        server_content(&server, "alice", "keep.txt").unwrap(),
        b"old content"
    );
    eventually(TIMEOUT, "failed upload kept locally", || {
        fs::read_dir(alice.failed_dir())
            .map(|d| d.count() == 1)
            .unwrap_or(false)
    });
    let kept = fs::read_dir(alice.failed_dir())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(fs::metadata(&kept).unwrap().len(), 600 << 10);
    assert!(
        alice.log_text().contains(&kept.display().to_string()),
        "kept path not logged"
    );

    // cp fails with a clear message.
    let local = tempfile::tempdir().unwrap();
    let big = local.path().join("big");
    fs::write(&big, content(4, 3 << 20)).unwrap();
    let out = Command::new("cp")
        .arg(&big)
        .arg(alice.path("alice/"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("quota"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // df shows the quota, and `stat -f` adds up: nothing free beyond the total.
    let st = nix_statvfs(alice.root());
    assert_eq!(
        st.f_blocks * st.f_frsize,
        1 << 20,
        "df total is not the quota"
    );
    assert!(st.f_bfree <= st.f_blocks && st.f_bavail <= st.f_blocks);
    assert!(
        st.f_ffree <= st.f_files && st.f_favail <= st.f_files,
        "{} inodes free of {}",
        st.f_ffree,
        st.f_files
    );
    assert!(st.f_files > 0);
}

#[test]
fn a_full_server_disk_fails_the_crossing_write_with_enospc() {
    if !fuse_available() {
        return;
    }
    if sharefs_tests::backend::cluster_selected() {
        // Contents go to the object store: no server disk to fill.
        eprintln!("not run on the cluster backend: its contents are on no disk of the server");
        return;
    }
    let small = SmallFs::new(16);
    let server = TestServer::start_in(Some(&small.join("data")), &["--disk-reserve", "0"]);
    // A first file (made without the mount) makes the folder's files exist.
    rt().block_on(async {
        let (c, _) = server.connect("alice").await;
        upload(&c, "first", b"first").await;
    });
    let alice = TestMount::new(&server, "alice");
    small.fill_leaving(2 << 20);
    let mut f = fs::File::create(alice.path("alice/big")).unwrap();
    let chunk = content(5, 64 << 10);
    let mut written = 0usize;
    let refused = loop {
        match f.write(&chunk) {
            Ok(n) => written += n,
            Err(e) => break e,
        }
        assert!(
            written <= 8 << 20,
            "no write refused on a disk with 2 MiB free"
        );
    };
    assert_eq!(refused.raw_os_error(), Some(libc::ENOSPC), "{refused}");
    assert!(
        written <= 2 << 20,
        "{written} bytes accepted with 2 MiB free"
    );
    assert!(
        alice.log_text().contains("no space"),
        "the refused write is not logged"
    );
}

/// statvfs(2) of a path.
fn nix_statvfs(p: &Path) -> libc::statvfs {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st
}

#[test]
fn mount_survives_a_server_restart_and_fails_fast_when_it_is_gone() {
    if !fuse_available() {
        return;
    }
    let mut server = TestServer::start();
    let alice = TestMount::with(&server, "alice", &["--timeout", "3"], &[]);
    fs::write(alice.path("alice/before.txt"), b"before").unwrap();
    let mut reader = fs::File::open(alice.path("alice/before.txt")).unwrap();

    server.restart();
    // Reads and writes work again (the mount reconnects and re-opens at the same version).
    let mut s = String::new();
    reader.read_to_string(&mut s).unwrap();
    assert_eq!(s, "before");
    fs::write(alice.path("alice/after.txt"), b"after").unwrap();
    assert_eq!(
        server_content(&server, "alice", "after.txt").unwrap(),
        b"after"
    );
    assert_eq!(fs::read(alice.path("alice/before.txt")).unwrap(), b"before");

    // Server gone: stat of something not cached fails with EIO within the bound.
    server.kill9();
    let started = Instant::now();
    let r = fs::metadata(alice.path("alice/not-cached-anywhere"));
    let took = started.elapsed();
    assert_errno(r, libc::EIO, "stat with the server down");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let started = Instant::now();
    assert_errno(
        fs::write(alice.path("alice/while-down.txt"), b"x"),
        libc::EIO,
        "write with the server down",
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    server.restart();
    fs::write(alice.path("alice/back.txt"), b"back").unwrap();
    assert_eq!(
        server_content(&server, "alice", "back.txt").unwrap(),
        b"back"
    );
}

#[test]
fn unmount_and_ctrl_c_leave_no_mount_behind() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let mut a = TestMount::new(&server, "alice");
    assert!(a.is_mounted());
    let status = a.interrupt();
    assert!(status.success(), "exit status after SIGINT: {status}");
    assert!(!a.is_mounted(), "still mounted after SIGINT");

    let mut b = TestMount::new(&server, "alice");
    let status = b.unmount();
    assert!(
        status.success(),
        "exit status after fusermount3 -u: {status}"
    );
    assert!(!b.is_mounted());
}

/// Equal contents, or a failure naming the first differing byte (not megabytes of bytes).
#[track_caller]
fn assert_same(got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    let last = got.iter().zip(want).rposition(|(a, b)| a != b);
    panic!(
        "{} bytes, want {}; first difference at {first:?}, last at {last:?}",
        got.len(),
        want.len()
    );
}

#[test]
fn rewriting_in_place_keeps_the_bytes_not_written() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    let path = alice.path("alice/db.bin");
    let on_server = || server_content(&server, "alice", "db.bin").unwrap();
    let mut want = content(7, 24 << 20);
    fs::write(&path, &want).unwrap();
    assert_same(&on_server(), &want);

    // A patch in the middle, through a descriptor opened without O_TRUNC.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"patched in the middle", 13 << 20).unwrap();
    drop(f);
    want[13 << 20..(13 << 20) + 21].copy_from_slice(b"patched in the middle");
    assert_same(&on_server(), &want);

    // The first half rewritten from byte 0 (`dd conv=notrunc`): the second half stays.
    let local = tempfile::tempdir().unwrap();
    let half = local.path().join("half");
    let new_half = content(8, 12 << 20);
    fs::write(&half, &new_half).unwrap();
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", half.display()))
            .arg(format!("of={}", path.display()))
            .args(["bs=1M", "conv=notrunc", "status=none"]),
    );
    want[..12 << 20].copy_from_slice(&new_half);
    assert_same(&on_server(), &want);

    // Read back through the same descriptor before closing: written and unwritten parts.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    f.write_all(b"head").unwrap();
    let mut buf = vec![0u8; 8];
    f.seek(SeekFrom::Start(20 << 20)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, want[20 << 20..(20 << 20) + 8]);
    drop(f);
    want[..4].copy_from_slice(b"head");
    assert_same(&on_server(), &want);
    assert_same(&fs::read(&path).unwrap(), &want);
}

/// The files in a directory (none if it does not exist).
fn files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_close_that_failed_is_not_committed_later() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::with(&server, "alice", &["--timeout", "2"], &[]);
    let path = alice.path("alice/big.bin");
    fs::write(&path, b"old content").unwrap();
    // The name and attributes are now in the kernel's cache: opening needs no server.
    assert_eq!(fs::metadata(&path).unwrap().len(), 11);

    server.pause();
    let data = content(23, 3 << 20);
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(&data).unwrap();
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: closing the descriptor we own.
    let rc = unsafe { libc::close(fd) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    server.resume();
    assert_eq!(
        (rc, errno),
        (-1, Some(libc::EIO)),
        "close with the server stalled"
    );

    // The server keeps the old version: nothing uploads the file after its close()
    // reported the failure (a retry at the last release came within the timeout).
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let now = server_content(&server, "alice", "big.bin").unwrap();
        assert!(
            now == b"old content",
            "the failed close was committed later ({} bytes on the server)",
            now.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The data is kept locally under the file's name, and the path is logged.
    eventually(TIMEOUT, "failed upload kept locally", || {
        files_in(&alice.failed_dir()).len() == 1
    });
    let kept = files_in(&alice.failed_dir()).remove(0);
    assert!(
        kept.to_string_lossy().ends_with("-big.bin"),
        "{}",
        kept.display()
    );
    assert_same(&fs::read(&kept).unwrap(), &data);
    assert!(
        alice.log_text().contains(&kept.display().to_string()),
        "kept path not logged"
    );
}

#[test]
fn two_mounts_of_one_cache_keep_their_own_staged_files() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let first = TestMount::new(&server, "alice");
    let data = content(22, 3 << 20);
    let mut f = fs::File::create(first.path("alice/big.bin")).unwrap();
    f.write_all(&data).unwrap();
    // A second mount of the same cache starts while the first is writing: it recovers
    // nothing of a live mount's.
    let second = TestMount::with_cache_dir(&server, "alice", &[], first.cache_dir());
    assert_eq!(
        files_in(&first.failed_dir()),
        Vec::<std::path::PathBuf>::new()
    );
    f.sync_all().unwrap();
    drop(f);
    assert_same(&server_content(&server, "alice", "big.bin").unwrap(), &data);
    assert_same(&fs::read(second.path("alice/big.bin")).unwrap(), &data);
    assert_eq!(
        files_in(&first.failed_dir()),
        Vec::<std::path::PathBuf>::new()
    );
}

#[test]
fn a_killed_mount_is_mounted_again_and_its_unsaved_data_kept() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let mut alice = TestMount::new(&server, "alice");
    // A large file is being written out of sequence (so staged on disk: a sequential
    // one would be streamed, its bytes on the server, see docs/SEMANTICS.md) when the
    // mount process dies.
    let data = content(21, 3 << 20);
    let mut f = fs::File::create(alice.path("alice/big.bin")).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&data[1 << 20..]).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&data[..1 << 20]).unwrap();
    alice.kill9();
    drop(f);
    assert_errno(
        fs::metadata(alice.root()),
        libc::ENOTCONN,
        "stat of the dead mount",
    );
    let left = files_in(&alice.cache_dir().join("staging"));
    assert!(!left.is_empty(), "nothing staged on disk");

    // `sharefs mount` on the same directory clears the dead mount and mounts.
    if let Err(e) = alice.remount(&server, "alice", &[]) {
        panic!("{e}");
    }
    assert!(fs::read_dir(alice.path("alice")).is_ok());
    // What the dead mount had staged is in failed/, under the file's name, and logged.
    let kept = files_in(&alice.failed_dir());
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        kept[0].to_string_lossy().ends_with("-big.bin"),
        "{}",
        kept[0].display()
    );
    assert_same(&fs::read(&kept[0]).unwrap(), &data);
    assert!(
        alice.log_text().contains(&kept[0].display().to_string()),
        "recovered path not logged"
    );
    for dir in &left {
        assert!(!dir.exists(), "{} left in staging", dir.display());
    }
    // None of the data the dead mount held reached the server.
    assert!(server_content(&server, "alice", "big.bin").is_none_or(|d| d.is_empty()));

    // A live mount is refused, clearly, and keeps working.
    let out = output_within(&mut alice.command(&server, "alice", &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mounted over a live mount: {err}");
    assert!(err.contains("already mounted"), "{err}");
    fs::write(alice.path("alice/after.txt"), b"after").unwrap();
    assert_eq!(
        server_content(&server, "alice", "after.txt").unwrap(),
        b"after"
    );
}
