//! A real tree in every folder, on real mounts: what a user does with directories,
//! symbolic links, modes and times (`mkdir -p`, `cp -r`, `tar x`, `git clone`, `rsync -a`,
//! `cp -a`, `chmod +x`, `mv` of a subtree, `rm -r`), and what others see of it.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sharefs_tests::mount::{fuse_available, TestMount};
use sharefs_tests::*;

fn assert_errno<T: std::fmt::Debug>(r: std::io::Result<T>, errno: i32, what: &str) {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected errno {errno}"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(errno), "{what}: {e}"),
    }
}

/// What `cp -a`, `tar` and `rsync -a` must keep of a tree: each entry's kind, permission
/// bits, mtime (whole seconds: tar keeps no more), size and content or link target.
fn describe(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.mode() & 0o7777;
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                walk(root, &path, out);
                format!("dir {mode:o} mtime {}", meta.mtime())
            } else {
                let data = fs::read(&path).unwrap();
                format!(
                    "file {mode:o} mtime {} size {} sha {}",
                    meta.mtime(),
                    meta.len(),
                    sha256(&data)
                )
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A local tree with nested directories, an executable, a private file, relative and
/// absolute (dangling) symbolic links and old modification times.
fn sample_tree(root: &Path, dirs: usize, files_per_dir: usize) {
    for d in 0..dirs {
        let dir = root.join(format!("d{:03}/sub{}", d, d % 3));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..files_per_dir {
            let len = (d * 131 + f * 977) % 9000;
            fs::write(
                dir.join(format!("f{f}.txt")),
                content((d * 1000 + f) as u64, len),
            )
            .unwrap();
        }
    }
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::write(root.join("bin/run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    fs::set_permissions(root.join("bin/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("private.txt"), "mine").unwrap();
    fs::set_permissions(root.join("private.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("bin/run.sh", root.join("run")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    run_ok(
        Command::new("touch")
            .args(["-h", "-d", "2001-02-03 04:05:06"])
            .arg(root.join("run")),
    );
    run_ok(Command::new("find").arg(root).args([
        "-not",
        "-type",
        "l",
        "-exec",
        "touch",
        "-d",
        "2020-01-02 03:04:05",
        "{}",
        "+",
    ]));
}

#[test]
fn mkdir_p_cp_r_and_diff_r_of_a_tree_of_thousands_of_files() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");

    // Any depth.
    let deep = alice.path(&format!("alice/projects/q3/{}", "d/".repeat(40)));
    run_ok(Command::new("mkdir").arg("-p").arg(&deep));
    assert!(fs::metadata(&deep).unwrap().is_dir());
    fs::write(deep.join("leaf.txt"), b"deep").unwrap();
    assert_eq!(fs::read(deep.join("leaf.txt")).unwrap(), b"deep");
    assert_errno(
        fs::create_dir(alice.path("alice/projects")),
        libc::EEXIST,
        "mkdir again",
    );

    let local = tempfile::tempdir().unwrap();
    let photos = local.path().join("photos");
    sample_tree(&photos, 40, 50);
    run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(&photos)
            .arg(alice.path("alice/")),
    );
    run_ok(
        Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&photos)
            .arg(alice.path("alice/photos")),
    );

    // What another mount of the same user sees is the same tree.
    let again = TestMount::new(&server, "alice");
    run_ok(
        Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&photos)
            .arg(again.path("alice/photos")),
    );
    let df = run_ok(Command::new("df").arg("-i").arg(again.path("alice")));
    assert!(df.lines().count() == 2, "{df}");
}

#[test]
fn tar_x_and_cp_a_keep_directories_symlinks_modes_and_mtimes() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    sample_tree(&src, 6, 5);
    let expected = describe(&src);

    let tarball = local.path().join("src.tar.gz");
    run_ok(
        Command::new("tar")
            .arg("czf")
            .arg(&tarball)
            .arg("-C")
            .arg(local.path())
            .arg("src"),
    );
    run_ok(
        Command::new("tar")
            .arg("xf")
            .arg(&tarball)
            .arg("-C")
            .arg(alice.path("alice/")),
    );
    assert_eq!(describe(&alice.path("alice/src")), expected, "tar x");

    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(alice.path("alice/copy")),
    );
    assert_eq!(describe(&alice.path("alice/copy")), expected, "cp -a");
    run_ok(
        Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&src)
            .arg(alice.path("alice/copy")),
    );

    // Kept on the server, not only in this mount's memory.
    let other = TestMount::new(&server, "alice");
    assert_eq!(
        describe(&other.path("alice/copy")),
        expected,
        "seen by a new mount"
    );
}

#[test]
fn git_clone_gives_a_clean_status_and_fsck() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    let local = tempfile::tempdir().unwrap();
    let repo = local.path().join("repo");
    let git = |dir: &Path, args: &[&str]| {
        run_ok(
            Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(["-c", "user.name=t", "-c", "user.email=t@example.org"])
                .args(args),
        )
    };
    fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    sample_tree(&repo.join("tree"), 8, 6);
    for round in 0..5 {
        fs::write(
            repo.join("log.txt"),
            format!("round {round}\n").repeat(round + 1),
        )
        .unwrap();
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", &format!("round {round}")]);
    }

    let clone = alice.path("alice/repo");
    run_ok(
        Command::new("git")
            .args(["clone", "-q"])
            .arg(&repo)
            .arg(&clone),
    );
    assert_eq!(
        git(&clone, &["status", "--porcelain"]),
        "",
        "status not clean"
    );
    git(&clone, &["fsck", "--full", "--strict"]);
    assert_eq!(
        git(&clone, &["log", "--format=%s"]).lines().count(),
        5,
        "history"
    );
    // Work in the clone: commit, branch, gc (renames, deletes and lock files).
    fs::write(clone.join("new.txt"), "new\n").unwrap();
    git(&clone, &["add", "new.txt"]);
    git(&clone, &["commit", "-q", "-m", "new"]);
    git(&clone, &["checkout", "-q", "-b", "topic"]);
    git(&clone, &["gc", "-q"]);
    git(&clone, &["fsck", "--full", "--strict"]);
    assert_eq!(git(&clone, &["status", "--porcelain"]), "");
}

#[test]
fn rsync_a_twice_sends_nothing_the_second_time() {
    if !fuse_available() {
        return;
    }
    if Command::new("rsync").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("SHAREFS_REQUIRE_FUSE").is_none(),
            "rsync is required in CI"
        );
        eprintln!("\n*** SKIPPED: rsync missing ***\n");
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    let local = tempfile::tempdir().unwrap();
    let docs = local.path().join("docs");
    sample_tree(&docs, 10, 10);
    let rsync = || {
        run_ok(
            Command::new("rsync")
                .args(["-a", "--stats"])
                .arg(format!("{}/", docs.display()))
                .arg(format!("{}/", alice.path("alice/docs").display())),
        )
    };
    let first = rsync();
    assert!(
        first.contains("Number of regular files transferred: 10"),
        "{first}"
    );
    let second = rsync();
    assert!(
        second.contains("Number of regular files transferred: 0"),
        "second run sent files again:\n{second}"
    );
    assert_eq!(describe(&alice.path("alice/docs")), describe(&docs));
}

#[test]
fn chmod_is_kept_and_an_executable_runs() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    let script = alice.path("alice/run.sh");
    fs::write(&script, "#!/bin/sh\necho hello from the share\n").unwrap();
    assert_eq!(fs::metadata(&script).unwrap().mode() & 0o777, 0o644);
    run_ok(Command::new("chmod").arg("+x").arg(&script));
    assert_eq!(fs::metadata(&script).unwrap().mode() & 0o777, 0o755);
    assert_eq!(run_ok(&mut Command::new(&script)), "hello from the share\n");

    run_ok(Command::new("chmod").arg("600").arg(&script));
    fs::create_dir(alice.path("alice/dir")).unwrap();
    run_ok(
        Command::new("chmod")
            .arg("700")
            .arg(alice.path("alice/dir")),
    );
    // touch -d and touch -m with UTIME_OMIT of the other time.
    run_ok(
        Command::new("touch")
            .args(["-m", "-d", "2003-04-05 06:07:08"])
            .arg(&script),
    );
    let before_atime = fs::metadata(&script).unwrap().atime();
    run_ok(
        Command::new("touch")
            .args(["-a", "-d", "1999-01-01 00:00:00"])
            .arg(alice.path("alice/dir")),
    );

    let other = TestMount::new(&server, "alice");
    let meta = fs::metadata(other.path("alice/run.sh")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.mtime(), 1049522828, "touch -m -d");
    assert_eq!(meta.atime(), before_atime, "atime kept by touch -m");
    let dir = fs::metadata(other.path("alice/dir")).unwrap();
    assert_eq!(dir.mode() & 0o777, 0o700);
    assert_eq!(dir.atime(), 915148800, "touch -a -d");
}

#[test]
fn a_subtree_moves_atomically_and_rm_r_removes_it() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    let bob = TestMount::new(&server, "bob");
    let projects = alice.path("alice/projects");
    sample_tree(&projects, 5, 4);
    let expected = describe(&projects);
    fs::create_dir(alice.path("alice/archive")).unwrap();

    // An open handle follows its file through the move of its parent directories.
    let mut open = OpenOptions::new()
        .append(true)
        .open(projects.join("d001/sub1/f0.txt"))
        .unwrap();
    let before = fs::read(projects.join("d001/sub1/f0.txt")).unwrap();

    run_ok(
        Command::new("mv")
            .arg(&projects)
            .arg(alice.path("alice/archive/2026")),
    );
    assert_errno(fs::metadata(&projects), libc::ENOENT, "old place");
    assert_eq!(describe(&alice.path("alice/archive/2026")), expected);
    open.write_all(b"appended after the move").unwrap();
    drop(open);
    let mut after = before.clone();
    after.extend_from_slice(b"appended after the move");
    assert_eq!(
        fs::read(alice.path("alice/archive/2026/d001/sub1/f0.txt")).unwrap(),
        after
    );

    // Another mount sees the move within a second.
    eventually(Duration::from_secs(1), "bob sees the moved tree", || {
        fs::metadata(bob.path("alice/archive/2026/d001/sub1/f0.txt"))
            .is_ok_and(|m| m.len() == after.len() as u64)
            && fs::metadata(bob.path("alice/projects")).is_err()
    });

    // A directory cannot move into its own subtree; rmdir of a non-empty one fails.
    assert_errno(
        fs::rename(
            alice.path("alice/archive"),
            alice.path("alice/archive/2026/inside"),
        ),
        libc::EINVAL,
        "move into own subtree",
    );
    assert_errno(
        fs::remove_dir(alice.path("alice/archive")),
        libc::ENOTEMPTY,
        "rmdir non-empty",
    );
    // rename(2) over an empty directory replaces it; over a non-empty one fails.
    fs::create_dir(alice.path("alice/empty")).unwrap();
    fs::create_dir(alice.path("alice/moving")).unwrap();
    fs::write(alice.path("alice/moving/x"), b"x").unwrap();
    fs::rename(alice.path("alice/moving"), alice.path("alice/empty")).unwrap();
    assert_eq!(fs::read(alice.path("alice/empty/x")).unwrap(), b"x");
    assert_errno(
        fs::rename(alice.path("alice/archive"), alice.path("alice/empty")),
        libc::ENOTEMPTY,
        "rename over non-empty dir",
    );
    assert_errno(
        fs::rename(alice.path("alice/empty/x"), alice.path("alice/archive")),
        libc::EISDIR,
        "file over dir",
    );

    run_ok(
        Command::new("rm")
            .arg("-r")
            .arg(alice.path("alice/archive")),
    );
    assert_errno(
        fs::metadata(alice.path("alice/archive")),
        libc::ENOENT,
        "rm -r",
    );
    eventually(Duration::from_secs(1), "bob sees it gone", || {
        fs::metadata(bob.path("alice/archive")).is_err()
    });
    let left: Vec<_> = fs::read_dir(alice.path("alice"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["empty"]);
}

#[test]
fn others_trees_are_read_only_and_modes_decide_what_others_see() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let bob = TestMount::new(&server, "bob");
    let alice = TestMount::new(&server, "alice");
    fs::create_dir_all(bob.path("bob/a/b")).unwrap();
    fs::write(bob.path("bob/a/b/c.pdf"), b"%PDF deep").unwrap();
    fs::create_dir(bob.path("bob/secret")).unwrap();
    fs::write(bob.path("bob/secret/plans.txt"), b"plans").unwrap();
    fs::write(bob.path("bob/diary.txt"), b"dear diary").unwrap();
    fs::create_dir(bob.path("bob/dropbox")).unwrap();
    fs::write(bob.path("bob/dropbox/known.txt"), b"known").unwrap();

    let listing = run_ok(Command::new("ls").arg("-lR").arg(alice.path("bob")));
    assert!(
        listing.contains("c.pdf") && listing.contains("plans.txt"),
        "{listing}"
    );
    let local = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("cp")
            .arg(alice.path("bob/a/b/c.pdf"))
            .arg(local.path()),
    );
    assert_eq!(fs::read(local.path().join("c.pdf")).unwrap(), b"%PDF deep");

    // Bob hears that alice downloaded a/b/c.pdf.
    let rt = rt();
    rt.block_on(async {
        let (client, _) = server.connect("bob").await;
        within("bob's notification names the path", async {
            loop {
                let (pending, recent) = client.notifications(10).await.unwrap();
                if pending
                    .iter()
                    .chain(recent.iter())
                    .any(|n| n.file == "a/b/c.pdf" && n.downloader == "alice")
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    });

    // Nothing alice does writes to bob's tree.
    assert_errno(
        fs::write(alice.path("bob/a/new.txt"), b"x"),
        libc::EACCES,
        "create in bob's tree",
    );
    assert_errno(
        fs::create_dir(alice.path("bob/a/newdir")),
        libc::EACCES,
        "mkdir in bob's tree",
    );
    assert_errno(
        fs::remove_file(alice.path("bob/a/b/c.pdf")),
        libc::EACCES,
        "unlink in bob's tree",
    );
    assert_errno(
        fs::set_permissions(
            alice.path("bob/a/b/c.pdf"),
            fs::Permissions::from_mode(0o777),
        ),
        libc::EACCES,
        "chmod in bob's tree",
    );
    assert_errno(
        OpenOptions::new()
            .write(true)
            .open(alice.path("bob/a/b/c.pdf")),
        libc::EACCES,
        "open for writing in bob's tree",
    );

    // Bob makes things private with the "other" bits.
    fs::set_permissions(bob.path("bob/diary.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(bob.path("bob/secret"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(bob.path("bob/dropbox"), fs::Permissions::from_mode(0o711)).unwrap();
    eventually(Duration::from_secs(1), "alice sees bob's new modes", || {
        fs::read(alice.path("bob/diary.txt")).is_err()
    });
    assert_errno(
        fs::read(alice.path("bob/diary.txt")),
        libc::EACCES,
        "0600 file",
    );
    assert_errno(
        fs::metadata(alice.path("bob/secret/plans.txt")),
        libc::EACCES,
        "inside a 0700 dir",
    );
    assert_errno(
        fs::read_dir(alice.path("bob/dropbox")),
        libc::EACCES,
        "list 0711 dir",
    );
    assert_eq!(
        fs::read(alice.path("bob/dropbox/known.txt")).unwrap(),
        b"known",
        "a known name in a 0711 dir"
    );
    // Bob still reads everything of his own.
    assert_eq!(fs::read(bob.path("bob/diary.txt")).unwrap(), b"dear diary");
    assert_eq!(
        fs::read(bob.path("bob/secret/plans.txt")).unwrap(),
        b"plans"
    );
}

#[test]
fn changes_anywhere_in_a_tree_reach_other_mounts_within_a_second() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let bob = TestMount::new(&server, "bob");
    let alice = TestMount::new(&server, "alice");
    fs::create_dir_all(bob.path("bob/x/y/z")).unwrap();
    fs::write(bob.path("bob/x/y/z/file.txt"), b"one").unwrap();
    // Alice caches the listings and the content.
    assert_eq!(fs::read(alice.path("bob/x/y/z/file.txt")).unwrap(), b"one");
    let names = |p: &Path| -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(p)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    assert_eq!(names(&alice.path("bob/x/y/z")), ["file.txt"]);

    fs::write(bob.path("bob/x/y/z/file.txt"), b"two!").unwrap();
    fs::write(bob.path("bob/x/y/z/new.txt"), b"new").unwrap();
    eventually(Duration::from_secs(1), "content and listing", || {
        fs::read(alice.path("bob/x/y/z/file.txt")).is_ok_and(|d| d == b"two!")
            && names(&alice.path("bob/x/y/z")) == ["file.txt", "new.txt"]
    });
    fs::rename(bob.path("bob/x/y"), bob.path("bob/moved")).unwrap();
    eventually(Duration::from_secs(1), "a moved directory", || {
        names(&alice.path("bob/x")).is_empty()
            && fs::read(alice.path("bob/moved/z/new.txt")).is_ok_and(|d| d == b"new")
    });
    run_ok(
        Command::new("chmod")
            .arg("0640")
            .arg(bob.path("bob/moved/z/new.txt")),
    );
    eventually(Duration::from_secs(1), "a mode", || {
        fs::metadata(alice.path("bob/moved/z/new.txt")).is_ok_and(|m| m.mode() & 0o7 == 0)
    });
}

#[test]
fn symlinks_hard_links_and_special_files() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    fs::create_dir(alice.path("alice/dir")).unwrap();
    fs::write(alice.path("alice/dir/target.txt"), b"target").unwrap();
    std::os::unix::fs::symlink("dir/target.txt", alice.path("alice/rel")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", alice.path("alice/abs")).unwrap();
    std::os::unix::fs::symlink("no/such/thing", alice.path("alice/dangling")).unwrap();
    assert_eq!(fs::read(alice.path("alice/rel")).unwrap(), b"target");
    assert_eq!(
        fs::read_link(alice.path("alice/abs")).unwrap(),
        Path::new("/etc/hostname")
    );
    assert_errno(
        fs::read(alice.path("alice/dangling")),
        libc::ENOENT,
        "dangling",
    );
    assert!(fs::symlink_metadata(alice.path("alice/dangling"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_errno(
        fs::hard_link(alice.path("alice/dir/target.txt"), alice.path("alice/hard")),
        libc::EPERM,
        "hard link",
    );
    let fifo = std::ffi::CString::new(alice.path("alice/fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );

    let other = TestMount::new(&server, "alice");
    assert_eq!(
        fs::read_link(other.path("alice/rel")).unwrap(),
        Path::new("dir/target.txt")
    );
    assert_eq!(fs::read(other.path("alice/rel")).unwrap(), b"target");
}

/// Regression: open(O_RDWR) of an existing 32 MiB file, fsync, close, open(O_RDWR) again,
/// pread 10 KiB at 2023424 returned EIO (logged nowhere) although the data was intact.
#[test]
fn reopening_a_large_file_read_write_after_fsync_reads_it_back() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    fs::create_dir(alice.path("alice/io")).unwrap();
    let path = alice.path("alice/io/big.bin");
    let data = content(32, 32 << 20);
    fs::write(&path, &data).unwrap();
    for round in 0..3 {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.sync_all().unwrap();
        drop(f);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut buf = vec![0u8; 10 * 1024];
        f.read_exact_at(&mut buf, 2023424)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(buf, data[2023424..2023424 + 10 * 1024], "round {round}");
        f.write_all_at(b"patch", 4096).unwrap();
        f.sync_all().unwrap();
    }
    let mut expected = data;
    expected[4096..4101].copy_from_slice(b"patch");
    assert_eq!(sha256(&fs::read(&path).unwrap()), sha256(&expected));
}
