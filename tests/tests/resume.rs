//! Uploads through a real mount outlive the server: files copied while the server is
//! killed with `kill -9` and started again all close without an error and arrive whole,
//! and the mount keeps no more of a streamed file than the server has not made durable.

use std::fs;
use std::process::{Command, Stdio};

use sharefs_tests::mount::{fuse_available, TestMount};
use sharefs_tests::*;

/// The size of the largest upload the server is receiving.
fn receiving(server: &TestServer) -> u64 {
    fs::read_dir(server.data.join("tmp"))
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name();
                let name = name.to_string_lossy();
                (name.starts_with("part-") && !name.ends_with(".json"))
                    .then(|| e.metadata().map_or(0, |m| m.len()))
            })
            .max()
            .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// `cp` of 24 files while the server is killed and restarted twice, each time in the
/// middle of a file's stream: every `cp` succeeds (the mount resumes the upload, or finds
/// its commit made) and every file arrives whole.
#[test]
fn copies_through_server_kills_all_succeed() {
    if !fuse_available() {
        return;
    }
    const FILES: u64 = 24;
    let size = |i: u64| (6 << 20) + (i as usize) * 7919;
    let mut server = TestServer::start();
    let alice = TestMount::with(&server, "alice", &["--timeout", "20"], &[]);
    let src = tempfile::tempdir().unwrap();
    for i in 0..FILES {
        fs::write(src.path().join(format!("f{i}")), content(i, size(i))).unwrap();
    }
    // Another process copies: a thread of this one would hold its memory map while its
    // write waits on the mount, and the server's restart (a fork) would wait for it.
    let script = format!(
        "for i in $(seq 0 {}); do cp \"$1/f$i\" \"$2/f$i\"; echo \"f$i $?\"; done",
        FILES - 1
    );
    let copier = Command::new("sh")
        .args(["-c", &script, "sh"])
        .arg(src.path())
        .arg(alice.path("alice"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..2 {
        // In the middle of a stream: more than a sync's worth of it received.
        eventually(TIMEOUT, "a stream under way", || {
            receiving(&server) >= 3 << 20
        });
        server.kill9();
        server.restart();
        // The next kill in another file's stream.
        eventually(TIMEOUT, "the stream resumed and done", || {
            receiving(&server) < 3 << 20
        });
    }
    let out = copier.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<&str> = report.lines().filter(|l| !l.ends_with(" 0")).collect();
    assert!(failed.is_empty(), "copies failed: {failed:?}\n{report}");
    assert_eq!(report.lines().count() as u64, FILES, "{report}");
    for i in 0..FILES {
        let got = server_content(&server, "alice", &format!("f{i}"))
            .unwrap_or_else(|| panic!("f{i} missing"));
        assert!(
            got == content(i, size(i)),
            "f{i}: wrong content ({} bytes)",
            got.len()
        );
    }
    let log = server.log_text();
    assert!(
        log.contains("upload resumed"),
        "no upload was resumed:\n{log}"
    );
    // Nothing is left staged by the mount.
    let staged = fs::read_dir(alice.cache_dir().join("staging")).map_or(0, |d| {
        d.flat_map(|m| fs::read_dir(m.unwrap().path()).into_iter().flatten())
            .count()
    });
    assert_eq!(staged, 0);
}
