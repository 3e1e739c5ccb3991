//! The `sharefs` and `sharefs-server` binaries as a user runs them.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use sharefs_tests::*;

fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .expect("running the binary")
}

fn ok(cmd: Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Fails with exactly one line on stderr.
fn fails(cmd: Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "unexpectedly succeeded");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    err
}

#[test]
fn put_ls_get_rm_and_notifications() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("report.txt");
    let data = content(5, 3 << 20);
    std::fs::write(&src, &data).unwrap();

    let mut put = server.cli("alice");
    put.arg("put").arg(&src);
    ok(put);
    let mut put = server.cli("alice");
    put.arg("put").arg(&src).arg("copy.txt");
    ok(put);

    let mut ls = server.cli("bob");
    ls.arg("ls");
    assert_eq!(ok(ls), "alice\nbob\ncarol\n");
    let mut ls = server.cli("bob");
    ls.args(["ls", "-l", "alice"]);
    let listing = ok(ls);
    assert!(
        listing.contains("report.txt") && listing.contains(&data.len().to_string()),
        "{listing}"
    );

    let dest = dir.path().join("got.txt");
    let mut get = server.cli("bob");
    get.args(["get", "alice/report.txt"]).arg(&dest);
    ok(get);
    assert_eq!(std::fs::read(&dest).unwrap(), data);

    let mut get = server.cli("bob");
    get.args(["get", "alice/report.txt", "-"]);
    let out = run(get);
    assert!(out.status.success());
    assert_eq!(out.stdout, data);

    // Into a directory: the file keeps its name; no temp file is left behind.
    let mut get = server.cli("bob");
    get.args(["get", "alice/copy.txt"]).arg(dir.path());
    ok(get);
    assert_eq!(std::fs::read(dir.path().join("copy.txt")).unwrap(), data);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".sharefs-get"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let mut notes = server.cli("alice");
    notes.arg("notifications");
    let text = ok(notes);
    assert!(text.contains("bob downloaded report.txt"), "{text}");
    assert!(text.contains("bob downloaded copy.txt"), "{text}");
    assert!(
        text.contains("(2 times)"),
        "coalesced count missing: {text}"
    );

    let mut rm = server.cli("bob");
    rm.args(["rm", "alice/report.txt"]);
    let err = fails(rm);
    assert!(err.contains("permission denied"), "{err}");

    let mut rm = server.cli("alice");
    rm.args(["rm", "report.txt"]);
    ok(rm);
    let mut get = server.cli("bob");
    get.args(["get", "alice/report.txt"])
        .arg(dir.path().join("gone"));
    let err = fails(get);
    assert_eq!(
        err.trim(),
        "sharefs: alice/report.txt: no such file or directory"
    );
    assert!(!dir.path().join("gone").exists());
}

#[test]
fn follow_prints_notifications_as_they_arrive() {
    let server = TestServer::start();
    let mut put = server.cli("alice");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), b"a").unwrap();
    put.arg("put").arg(dir.path().join("a.txt"));
    ok(put);

    let mut follow = server.cli("alice");
    follow
        .args(["notifications", "--follow"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = follow.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    // The follower is subscribed once it is logged in; a download before that would be
    // delivered as pending, which the follower prints too. Either way it arrives once.
    let mut get = server.cli("bob");
    get.args(["get", "alice/a.txt", "-"]);
    ok(get);
    let line = rx.recv_timeout(TIMEOUT).expect("no notification printed");
    assert!(line.contains("bob downloaded a.txt"), "{line}");
    // It gets acknowledged (checked without the CLI, which would acknowledge it itself).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (alice, _) = server.connect("alice").await;
        within("acknowledged by --follow", async {
            while !alice.notifications(0).await.unwrap().0.is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
    });
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn bad_settings_fail_with_one_line() {
    let server = TestServer::start();
    let mut ls = server.cli("alice");
    ls.env("SHAREFS_PASSWORD", "wrong").arg("ls");
    assert!(fails(ls).contains("wrong password"));

    let mut ls = server.cli("alice");
    ls.env("SHAREFS_SERVER", "127.0.0.1:1").arg("ls");
    assert!(fails(ls).contains("cannot connect"));

    let mut ls = server.cli("alice");
    ls.env_remove("SHAREFS_PASSWORD").arg("ls");
    assert!(fails(ls).contains("no password"));

    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::File::create(&pw)
        .unwrap()
        .write_all(b"correct horse\n")
        .unwrap();
    let mut ls = server.cli("alice");
    ls.env_remove("SHAREFS_PASSWORD")
        .arg("--password-file")
        .arg(&pw)
        .arg("ls");
    ok(ls);

    let mut put = server.cli("alice");
    put.args(["put", "/nonexistent/file"]);
    fails(put);

    for args in [vec!["--version"], vec!["--help"]] {
        let mut c = Command::new(bin("sharefs"));
        c.args(&args);
        ok(c);
        let mut c = Command::new(bin("sharefs-server"));
        c.args(&args);
        ok(c);
    }
}

#[test]
fn user_commands() {
    let server = TestServer::start();
    let listed = ok(server.user_command(&["list"]));
    let rows: Vec<Vec<&str>> = listed
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    let stored = if server.backend.is_some() {
        "STORED"
    } else {
        "ON DISK"
    };
    assert_eq!(rows[0], ["USER", "QUOTA", stored], "{listed}");
    let names: Vec<&str> = rows[1..].iter().map(|r| r[0]).collect();
    assert_eq!(names, ["alice", "bob", "carol"], "{listed}");
    assert!(rows[1..].iter().all(|r| r[1] == "none"), "{listed}");

    // Quotas are listed in the unit they were set in.
    server.user(&["quota", "bob", "10G"], None);
    let listed = ok(server.user_command(&["list"]));
    let bob = listed.lines().find(|l| l.starts_with("bob")).unwrap();
    assert!(bob.contains("10 GiB"), "{listed}");
    assert!(!listed.contains("10737418240"), "{listed}");

    // Added while the server runs: can log in at once.
    server.add_user("dave", "pw-dave");
    let mut ls = server.cli("dave");
    ls.env("SHAREFS_PASSWORD", "pw-dave").arg("ls");
    assert!(ok(ls).contains("dave"));

    let mut dup = server.user_command(&["add", "dave", "--password-stdin"]);
    dup.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = dup.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"x\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());

    ok(server.user_command(&["remove", "dave"]));
    let mut ls = server.cli("dave");
    ls.env("SHAREFS_PASSWORD", "pw-dave").arg("ls");
    fails(ls);

    if server.backend.is_none() {
        let text = std::fs::read_to_string(server.data.join("users.json")).unwrap();
        assert!(!text.contains(PASSWORD), "plaintext password on disk");
    }
}

#[test]
fn whole_trees_go_up_and_down_move_and_go_away() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("project");
    std::fs::create_dir_all(src.join("src/deep/er")).unwrap();
    std::fs::write(src.join("README"), b"read me").unwrap();
    std::fs::write(src.join("src/main.rs"), content(1, 300_000)).unwrap();
    std::fs::write(src.join("src/deep/er/x"), b"x").unwrap();
    std::os::unix::fs::symlink("src/main.rs", src.join("main")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(src.join("README"), std::fs::Permissions::from_mode(0o600)).unwrap();

    let cli = |user: &str, args: &[&str]| {
        let mut c = server.cli(user);
        c.args(args);
        c
    };
    ok(cli("alice", &["mkdir", "-p", "work/2026/q3"]));
    ok(cli("alice", &["mkdir", "-p", "work/2026/q3"]));
    fails(cli("alice", &["mkdir", "work/2026"]));
    let mut put = cli("alice", &["put", "-r"]);
    put.arg(&src).arg("work/2026/q3/");
    ok(put);
    let listing = ok(cli("bob", &["ls", "-l", "alice/work/2026/q3/project"]));
    assert!(
        listing.contains("-rw-------") && listing.contains("README"),
        "{listing}"
    );
    assert!(listing.contains("main -> src/main.rs"), "{listing}");
    assert!(
        listing.contains("drwx") && listing.contains("src/"),
        "{listing}"
    );
    assert_eq!(
        ok(cli("bob", &["ls", "alice/work/2026/q3/project/src"])),
        "deep\nmain.rs\n"
    );

    // Moves within the tree, into a directory or to a new name.
    ok(cli("alice", &["mv", "work/2026/q3/project", "work"]));
    ok(cli("alice", &["mv", "work/project", "work/renamed"]));
    fails(cli("alice", &["mv", "work", "work/renamed/inside"]));

    let back = dir.path().join("back");
    // Bob may list alice's tree but not read her 0600 README; alice gets it all.
    let mut get = cli("bob", &["get", "-r", "alice/work/renamed"]);
    get.arg(dir.path().join("bobs"));
    let err = fails(get);
    assert!(err.contains("permission denied"), "{err}");
    let mut get = cli("alice", &["get", "-r", "alice/work/renamed"]);
    get.arg(&back);
    ok(get);
    let out = std::process::Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&src)
        .arg(&back)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mode = std::fs::metadata(back.join("README"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    fails(cli("alice", &["rm", "work"]));
    let err = fails(cli("bob", &["rm", "-r", "alice/work"]));
    assert!(err.contains("permission denied"), "{err}");
    ok(cli("alice", &["rm", "-r", "work"]));
    assert_eq!(ok(cli("alice", &["ls", "alice"])), "");
}

#[test]
fn get_keeps_the_mode_and_overwrites_only_with_force() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("notes.txt");
    std::fs::write(&src, b"first").unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut put = server.cli("alice");
    put.arg("put").arg(&src);
    ok(put);

    let dest = dir.path().join("got.txt");
    let mut get = server.cli("bob");
    get.args(["get", "alice/notes.txt"]).arg(&dest);
    ok(get);
    let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "mode {mode:o}");

    // An existing file is left as it is, and so is a link (not followed).
    std::fs::write(&dest, b"mine").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink("elsewhere", &link).unwrap();
    for target in [&dest, &link] {
        let mut get = server.cli("bob");
        get.args(["get", "alice/notes.txt"]).arg(target);
        let err = fails(get);
        assert!(
            err.contains("already exists") && err.contains("--force"),
            "{err}"
        );
    }
    assert_eq!(std::fs::read(&dest).unwrap(), b"mine");
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("elsewhere"));
    // Into a directory, the file of that name counts too.
    std::fs::write(dir.path().join("notes.txt"), b"mine too").unwrap();
    let mut get = server.cli("bob");
    get.args(["get", "alice/notes.txt"]).arg(dir.path());
    fails(get);
    assert_eq!(
        std::fs::read(dir.path().join("notes.txt")).unwrap(),
        b"mine too"
    );

    let mut get = server.cli("bob");
    get.args(["get", "--force", "alice/notes.txt"]).arg(&dest);
    ok(get);
    assert_eq!(std::fs::read(&dest).unwrap(), b"first");
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".sharefs-get")
        })
        .count();
    assert_eq!(leftovers, 0);
}

#[test]
fn ls_shows_human_sizes_and_local_times() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.bin");
    std::fs::write(&src, content(3, 3 << 20)).unwrap();
    // 2026-01-02 03:04:05 UTC, which is 12:04 in Tokyo (no summer time there).
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_767_323_045);
    std::fs::File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_modified(mtime))
        .unwrap();
    let mut put = server.cli("alice");
    put.arg("put").arg(&src);
    ok(put);

    let mut ls = server.cli("alice");
    ls.env("TZ", "Asia/Tokyo").args(["ls", "-l", "-h", "alice"]);
    let line = ok(ls);
    assert!(line.contains(" 3.0M "), "{line}");
    assert!(line.contains("2026-01-02 12:04"), "{line}");
    let mut ls = server.cli("alice");
    ls.env("TZ", "UTC").args(["ls", "-l", "alice"]);
    let line = ok(ls);
    assert!(line.contains(&(3u64 << 20).to_string()), "{line}");
    assert!(line.contains("2026-01-02 03:04"), "{line}");
    // -h is not help for ls; --help still is.
    let mut help = Command::new(bin("sharefs"));
    help.args(["ls", "--help"]);
    assert!(ok(help).contains("--human-readable"));
}

#[test]
fn help_describes_every_positional_argument() {
    let mut top = Command::new(bin("sharefs"));
    top.arg("--help");
    let text = ok(top);
    let commands: Vec<String> = text
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 8, "{commands:?}");
    for command in &commands {
        let mut help = Command::new(bin("sharefs"));
        help.args([command, "--help"]);
        let text = ok(help);
        let Some(args) = text.split("Arguments:").nth(1) else {
            continue;
        };
        let section = args.trim_start_matches('\n').split("\n\n").next().unwrap();
        for line in section.lines() {
            // "  <NAME>  description": a name alone has no description.
            let words: Vec<&str> = line.split_whitespace().collect();
            assert!(
                words.len() >= 2,
                "sharefs {command}: argument without a description: {line:?}"
            );
        }
    }
}

#[test]
fn logs_have_no_colour_codes_unless_stderr_is_a_terminal() {
    let server = TestServer::start();
    let mut ls = server.cli("alice");
    ls.env("RUST_LOG", "debug").env_remove("NO_COLOR").arg("ls");
    let out = run(ls);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEBUG"), "no log lines to check: {err}");
    assert!(!err.contains('\x1b'), "ANSI codes in a piped log: {err:?}");
}

#[test]
fn mount_refuses_a_non_empty_or_mounted_directory() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mine.txt"), b"kept visible").unwrap();
    let mut mount = server.cli("alice");
    mount.arg("mount").arg(dir.path()).arg("--foreground");
    let err = fails(mount);
    assert!(err.contains("not empty"), "{err}");

    // Any filesystem mounted there, not only a sharefs one: mounts do not stack.
    let small = SmallFs::new(1);
    let mut mount = server.cli("alice");
    mount.arg("mount").arg(small.path()).arg("--foreground");
    let err = fails(mount);
    assert!(
        err.contains("already mounted") && err.contains("tmpfs"),
        "{err}"
    );
}

#[test]
fn failed_uploads_are_listed_retried_and_discarded() {
    let server = TestServer::start();
    let cache = tempfile::tempdir().unwrap();
    let failed = cache.path().join("failed");
    std::fs::create_dir(&failed).unwrap();
    // As a mount keeps them: <unix time>-<n>-<name>.
    std::fs::write(failed.join("1767323045-0-report.txt"), content(7, 3 << 20)).unwrap();
    std::fs::write(failed.join("1767323046-0-draft.txt"), b"draft").unwrap();
    let cmd = |args: &[&str]| {
        let mut c = server.cli("alice");
        c.arg("failed")
            .arg("--cache-dir")
            .arg(cache.path())
            .args(args);
        c
    };
    let listing = ok(cmd(&["list"]));
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 2, "{listing}");
    assert!(
        lines[0].starts_with("1767323045-0-report.txt") && lines[0].contains("3.0M"),
        "{listing}"
    );
    assert!(lines[0].ends_with("report.txt") && lines[1].ends_with("draft.txt"));

    ok(cmd(&["retry", "1767323045-0-report.txt"]));
    assert_eq!(
        server_content(&server, "alice", "report.txt").unwrap(),
        content(7, 3 << 20)
    );
    ok(cmd(&["retry", "1767323046-0-draft.txt", "drafts.txt"]));
    assert_eq!(
        server_content(&server, "alice", "drafts.txt").unwrap(),
        b"draft"
    );
    assert_eq!(ok(cmd(&["list"])), "");
    std::fs::write(failed.join("1767323047-0-junk"), b"junk").unwrap();
    let err = fails(cmd(&["discard", "nope"]));
    assert!(err.contains("no such failed upload"), "{err}");
    ok(cmd(&["discard", "1767323047-0-junk"]));
    assert_eq!(std::fs::read_dir(&failed).unwrap().count(), 0);
}

#[test]
fn status_shows_the_connection_uploads_in_progress_and_failed_uploads() {
    use sharefs_tests::mount::{fuse_available, TestMount};
    use std::time::Duration;
    if !fuse_available() {
        return;
    }
    let mut server = TestServer::start();
    let mut mount = TestMount::new(&server, "alice");
    let cache = mount.cache_dir().to_path_buf();
    let status = |server: &TestServer| {
        let mut cmd = server.cli("alice");
        cmd.arg("status").arg("--cache-dir").arg(&cache);
        ok(cmd)
    };
    let shows = |server: &TestServer, what: &[&str]| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let last = status(server);
            if what.iter().all(|w| last.contains(w)) {
                return last;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "status does not show {what:?} within 10 s:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let text = shows(&server, &["connection: up since", "uploads in progress: 0"]);
    assert!(text.contains("mounted: alice@"), "{text}");
    assert!(text.contains(&mount.root().display().to_string()), "{text}");
    assert!(text.contains("failed uploads kept here: 0"), "{text}");

    // A file being written is an upload in progress until its close. Written by a shell
    // whose standard output it is, with a builtin: any close of a copy of its descriptor
    // (a process forked meanwhile, a redirection undone) uploads, as every close does.
    let draft = mount.path("alice/draft.txt");
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(r#"exec >"$0"; printf 'in progress'; read x"#)
        .arg(&draft)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "the shell wrote", || {
        std::fs::metadata(&draft).is_ok_and(|m| m.len() == 11)
    });
    shows(&server, &["uploads in progress: 1", "draft.txt"]);
    drop(writer.stdin.take());
    // `read` meets the end of its input; the shell ends and its close uploads.
    writer.wait().unwrap();
    shows(&server, &["uploads in progress: 0"]);

    // Failed uploads the mount kept, with their sizes.
    std::fs::create_dir_all(mount.failed_dir()).unwrap();
    std::fs::write(mount.failed_dir().join("1700000000-1-lost.txt"), b"12345").unwrap();
    let text = status(&server);
    assert!(
        text.contains("failed uploads kept here: 1 (5 in all"),
        "{text}"
    );
    assert!(text.contains("lost.txt"), "{text}");

    // The connection down, and back.
    server.kill9();
    shows(&server, &["connection: DOWN, reconnecting since"]);
    server.restart();
    shows(&server, &["connection: up since"]);

    mount.unmount();
    let text = status(&server);
    assert!(text.contains("not mounted"), "{text}");
    assert!(text.contains("failed uploads kept here: 1"), "{text}");
}
