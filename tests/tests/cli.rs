//! The `sharefs` and `sharefs-server` binaries as a user runs them.

use std::io::Write;
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
    let mut list = Command::new(bin("sharefs-server"));
    list.args(["user", "list", "--data"]).arg(&server.data);
    let listed = ok(list);
    let rows: Vec<Vec<&str>> = listed
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(rows[0], ["USER", "QUOTA", "ON DISK"], "{listed}");
    let names: Vec<&str> = rows[1..].iter().map(|r| r[0]).collect();
    assert_eq!(names, ["alice", "bob", "carol"], "{listed}");
    assert!(rows[1..].iter().all(|r| r[1] == "none"), "{listed}");

    // Quotas are listed in the unit they were set in.
    server.user(&["quota", "bob", "10G"], None);
    let mut list = Command::new(bin("sharefs-server"));
    list.args(["user", "list", "--data"]).arg(&server.data);
    let listed = ok(list);
    let bob = listed.lines().find(|l| l.starts_with("bob")).unwrap();
    assert!(bob.contains("10 GiB"), "{listed}");
    assert!(!listed.contains("10737418240"), "{listed}");

    // Added while the server runs: can log in at once.
    server.add_user("dave", "pw-dave");
    let mut ls = server.cli("dave");
    ls.env("SHAREFS_PASSWORD", "pw-dave").arg("ls");
    assert!(ok(ls).contains("dave"));

    let mut dup = Command::new(bin("sharefs-server"));
    dup.args(["user", "add", "dave", "--password-stdin", "--data"])
        .arg(&server.data);
    dup.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = dup.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"x\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());

    let mut rm = Command::new(bin("sharefs-server"));
    rm.args(["user", "remove", "dave", "--data"])
        .arg(&server.data);
    ok(rm);
    let mut ls = server.cli("dave");
    ls.env("SHAREFS_PASSWORD", "pw-dave").arg("ls");
    fails(ls);

    let text = std::fs::read_to_string(server.data.join("users.json")).unwrap();
    assert!(!text.contains(PASSWORD), "plaintext password on disk");
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
