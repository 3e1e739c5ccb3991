//! A data directory written by the flat (protocol 1) server migrates to trees at the first
//! start of this server, also when that start is killed at any moment.
//!
//! `tests/fixtures/flat-v1.tar.gz` was written by the protocol 1 server and client
//! (commit 734182f): users alice (quota 10M) and bob; alice's small files in a pack, a
//! large one as a blob, a delete, a name with a space and an accent, a pending notification (bob downloaded "with space é.txt") and history;
//! bob's folder as a snapshot plus a journal (1,100 files created, 1,090 deleted). The
//! server was killed with `kill -9`, so journals end in their preallocated zeros.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sharefs_tests::*;

const SMALL: &str = "8cc5fb1eb08a47ced3601fec2403b98f41d81fe5038eef4768210a4b37de2f23";

/// The fixture unpacked into a temp directory; returns (holder, data dir).
fn unpack_fixture() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/flat-v1.tar.gz");
    let out = Command::new("tar")
        .arg("xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = dir.path().join("data");
    (dir, data)
}

/// Starts the server on the migrated fixture with the test password for both users.
fn serve(data: &Path) -> TestServer {
    let server = TestServer::start_existing(data, &[]);
    // The harness reads what the server has as carol, a user of its own.
    server.add_user("carol", PASSWORD);
    for user in ["alice", "bob"] {
        server.user(
            &["passwd", user, "--password-stdin"],
            Some(&format!("{PASSWORD}\n")),
        );
    }
    server
}

/// Everything the flat server held is there, in the root of each folder.
fn check_migrated(server: &TestServer) {
    let expected = [
        ("alice", "small.txt", SMALL),
        (
            "alice",
            "medium.bin",
            "883c4331bdc6bda04b84ad3d2659664c19f03720483a282f862acae807546571",
        ),
        (
            "alice",
            "large.bin",
            "051f741add0ed05aec281e4a5bb7b587e0f289df8bc44339e3f7c26fc5f467b1",
        ),
        (
            "alice",
            "old-name.txt",
            "48901c1c0946f7a0a4e350a15d293a2d84d544577a6fc5fc71354f46295ec9f9",
        ),
        ("alice", "with space é.txt", SMALL),
        (
            "bob",
            "bobs.txt",
            "ea66ca775fa2deb82e37b8e70f6a9d34972c3b614ab75d81ac59edcd90e09096",
        ),
        (
            "bob",
            "n1091.txt",
            "5aa40505b3338bb4902d336f713da3881909e66f097230ff3e5dc280ed86ea4b",
        ),
        (
            "bob",
            "n1100.txt",
            "8066d254b1c81edef55a0b36b516d87a2136ccd8c6cba0f7cf54faafa20481e2",
        ),
    ];
    for (owner, name, sha) in expected {
        let data = server_content(server, owner, name)
            .unwrap_or_else(|| panic!("{owner}/{name} missing after migration"));
        assert_eq!(sha256(&data), sha, "{owner}/{name}");
    }
    for gone in ["gone.txt", "new-name.txt"] {
        assert!(
            server_content(server, "alice", gone).is_none(),
            "{gone} is back"
        );
    }
    assert!(server_content(server, "bob", "n1090.txt").is_none());

    rt().block_on(async {
        let (alice, _) = server.connect("alice").await;
        let (pending, recent) = alice.notifications(10).await.unwrap();
        assert!(
            pending
                .iter()
                .any(|n| n.file == "with space é.txt" && n.downloader == "bob"),
            "pending notification lost: {pending:?}"
        );
        assert!(
            recent.iter().any(|n| n.file == "large.bin"),
            "history lost: {recent:?}"
        );
        let space = alice.statfs().await.unwrap();
        assert_eq!(space.total, 10 << 20, "quota");
        assert_eq!(space.used, 22 + 60000 + 300000 + 13 + 22, "usage");
    });
}

#[test]
fn a_flat_data_directory_of_the_previous_release_migrates() {
    let (_dir, data) = unpack_fixture();
    let mut server = serve(&data);
    check_migrated(&server);
    // The migrated tree takes directories, and all of it survives a restart.
    rt().block_on(async {
        let (alice, _) = server.connect("alice").await;
        sharefs_client::paths::mkdir_p(&alice, "later/deeper")
            .await
            .unwrap();
    });
    server.restart();
    check_migrated(&server);
    let log = server.log_text();
    for owner in ["alice", "bob"] {
        let times = log
            .lines()
            .filter(|l| l.contains("migrated") && l.contains(&format!("owner=\"{owner}\"")))
            .count();
        assert_eq!(times, 1, "{owner} migrated {times} times:\n{log}");
    }
}

#[test]
fn kill_9_during_migration_leaves_a_directory_the_next_start_finishes() {
    let bin = bin("sharefs-server");
    for delay_ms in [0u64, 1, 2, 4, 8, 15, 30, 60] {
        let (_dir, data) = unpack_fixture();
        let mut child = Command::new(&bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let server = serve(&data);
        check_migrated(&server);
    }
}

/// `--data` given as a relative path of one component is a directory like any other.
#[test]
fn a_relative_data_directory_of_one_component_works() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("sharefs-server"))
        .args(["user", "add", "dora", "--data", "data", "--password-stdin"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"pw\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "user add --data data: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("data/users.json").is_file());
}
