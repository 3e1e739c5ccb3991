//! Hostile clients and careless settings: oversized logins, password guessing, small
//! frames, control characters in names, and who may read the data directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use sharefs_protocol::MIN_FRAME;
use sharefs_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smallest_frames_carry_large_files_in_small_chunks() {
    let frame = MIN_FRAME.to_string();
    let server = TestServer::start_with(&["--plaintext", "--max-frame", &frame]);
    let (alice, _) = server.connect("alice").await;
    assert!(alice.chunk_size() < MIN_FRAME, "{}", alice.chunk_size());
    let big = content(8, 3 << 20);
    upload(&alice, "big", &big).await;
    // Small enough for one `put` round trip on a default connection, not in this frame.
    let small = content(9, 200 << 10);
    upload(&alice, "small", &small).await;

    let (bob, _) = server.connect("bob").await;
    assert_eq!(
        sha256(&download(&bob, "alice", "big").await.unwrap()),
        sha256(&big)
    );
    assert_eq!(download(&bob, "alice", "small").await.unwrap(), small);
    // A read larger than a frame (as the mount makes) is split into several requests.
    let (handle, _) = within("open", bob.open("alice", "big")).await.unwrap();
    let got = within("read", bob.read(handle, 100, 1 << 20)).await.unwrap();
    assert_eq!(&got[..], &big[100..100 + (1 << 20)]);
    // And so is one past the end of the file: it comes back short.
    let tail = within("read", bob.read(handle, (3 << 20) - 10, 1 << 20))
        .await
        .unwrap();
    assert_eq!(&tail[..], &big[(3 << 20) - 10..]);
    assert_eq!(bob.list_files("alice").await.unwrap().len(), 2);
}

#[test]
fn serve_options_out_of_range_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("--max-frame", "1000"),
        ("--max-frame", "65536"),
        ("--max-frame", "4294967295"),
        ("--max-connections", "0"),
        ("--max-connections-per-addr", "0"),
        ("--max-in-flight", "0"),
        ("--max-uploads-per-user", "0"),
        ("--handshake-timeout", "0"),
        ("--idle-timeout", "0"),
        ("--login-lockout-after", "0"),
        ("--login-lockout", "0"),
    ];
    for (option, value) in cases {
        let mut serve = Command::new(bin("sharefs-server"));
        serve
            .args(["serve", "--plaintext", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path().join("data"))
            .args([option, value]);
        let out = output_within(&mut serve);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{option} {value}: {err}");
        assert!(
            err.contains(option) && err.contains("valid values"),
            "{option} {value}: {err}"
        );
    }
    // The smallest frame size is accepted.
    let server = TestServer::start_with(&["--plaintext", "--max-frame", &MIN_FRAME.to_string()]);
    assert!(server.rss_kib().is_some());
}

/// Every entry under `dir` whose mode lets anyone but the owner in.
fn open_to_others(dir: &Path, found: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        let mode = meta.permissions().mode() & 0o777;
        let wanted = if meta.is_dir() { 0o700 } else { 0o600 };
        if mode & 0o077 != 0 || (meta.is_dir() && mode != wanted) {
            found.push(format!("{} {mode:o}", entry.path().display()));
        }
        if meta.is_dir() {
            open_to_others(&entry.path(), found);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_private_whatever_the_umask() {
    // SAFETY: umask only changes this process's file creation mask; 022 is the usual one,
    // under which files are created readable by everyone unless their mode says otherwise.
    unsafe { libc::umask(0o022) };
    let mut server = TestServer::start();
    let (alice, _) = server.connect("alice").await;
    upload(&alice, "small", b"small file, in the pack").await;
    upload(&alice, "big", &content(3, 2 << 20)).await;
    let (bob, _) = server.connect("bob").await;
    // A download: notifications are written too.
    download(&bob, "alice", "small").await.unwrap();
    server.add_user("dave", "dave's password");
    eventually(TIMEOUT, "notification history written", || {
        server.data.join("notifications").join("alice").is_dir()
    });
    drop((alice, bob));

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&server.data), 0o700);
    let mut found = Vec::new();
    open_to_others(&server.data, &mut found);
    assert!(found.is_empty(), "readable by others: {found:#?}");
    assert_eq!(mode(&server.data.join("users.json")), 0o600);

    // A data directory left open by an earlier version is closed at start.
    std::fs::set_permissions(&server.data, std::fs::Permissions::from_mode(0o755)).unwrap();
    server.restart();
    assert_eq!(mode(&server.data), 0o700);
    let (carol, _) = server.connect("carol").await;
    assert_eq!(
        download(&carol, "alice", "small").await.unwrap(),
        b"small file, in the pack"
    );
}
