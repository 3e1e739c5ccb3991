//! Cluster nodes over a real PostgreSQL and a real S3 server (`tests/src/backend.rs`):
//! several nodes serve one set of trees; a tree changed through one is current through
//! another; an upload begun on one node and cut by its kill -9 is resumed on another; a
//! database restart gives bounded errors, then service again without restarting nodes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sharefs_protocol::{ErrorCode, Event};
use sharefs_tests::backend::Backend;
use sharefs_tests::mount::{fuse_available, TestMount};
use sharefs_tests::*;

/// Takes up `upload` on `client`, waiting (bounded) while a node still holds it.
async fn resume(client: &sharefs_client::RemoteClient, upload: u64) -> u64 {
    within("resume", async {
        loop {
            match client.upload_resume(upload).await {
                Err(e) if e.code() == Some(ErrorCode::Busy) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                r => return r.unwrap(),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_trees_and_an_upload_survives_its_node() {
    let backend = Arc::new(Backend::start());
    let mut one = TestServer::start_node(&backend, &[]);
    let two = TestServer::start_node(&backend, &[]);
    let (alice1, _) = one.connect("alice").await;
    let (alice2, _) = two.connect("alice").await;
    let (bob2, mut bob_events) = two.connect("bob").await;
    // bob's node caches alice's tree; a change through the other node reaches bob's
    // session as an event (the change feed).
    bob2.resolve("alice", "").await.unwrap();

    // Written through one node, read through the other: contents and tree.
    let small = content(1, 1000);
    let big = content(2, (9 << 20) + 77);
    upload(&alice1, "small", &small).await;
    let started = std::time::Instant::now();
    loop {
        match within("a change made through the other node", bob_events.recv()).await {
            Some(Event::Changed { owner, file, .. })
                if owner == "alice" && file.name == "small" =>
            {
                break
            }
            Some(_) => continue,
            None => panic!("bob's connection closed"),
        }
    }
    eprintln!(
        "a change reached a session on the other node in {:?}",
        started.elapsed()
    );
    upload(&alice1, "big", &big).await;
    assert_eq!(download(&bob2, "alice", "small").await.unwrap(), small);
    assert_eq!(download(&bob2, "alice", "big").await.unwrap(), big);
    let root = alice2.resolve("alice", "").await.unwrap();
    alice2.mkdir(root.id, "d", 0o755).await.unwrap();
    let d = alice1.resolve("alice", "d").await.unwrap();
    assert_eq!(d.kind, sharefs_protocol::EntryKind::Dir);
    alice1
        .rename(&sharefs_client::remote::Move {
            parent: ROOT_ID,
            name: "big".into(),
            new_parent: d.id,
            new_name: "big".into(),
            noreplace: false,
        })
        .await
        .unwrap();
    assert_eq!(download(&bob2, "alice", "d/big").await.unwrap(), big);
    assert_eq!(
        bob2.resolve("alice", "big").await.unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
    // A name taken through one node is taken for the other.
    assert_eq!(
        alice1.mkdir(root.id, "d", 0o755).await.unwrap_err().code(),
        Some(ErrorCode::Exists)
    );
    drop((alice1, alice2, bob2));

    // An upload begun on node one, durable to 5 MiB, cut by its kill -9: node two
    // resumes it from there and commits it whole.
    let data = content(3, (11 << 20) + 5);
    let hash = blake3::hash(&data).to_hex().to_string();
    let id = {
        let (alice1, _) = one.connect("alice").await;
        let up = alice1.upload_begin(&at("resumed"), None).await.unwrap();
        for (i, piece) in data[..5 << 20].chunks(1 << 20).enumerate() {
            alice1
                .send_chunk(up, (i as u64) << 20, Bytes::copy_from_slice(piece))
                .await
                .unwrap();
        }
        assert_eq!(alice1.upload_sync(up).await.unwrap(), 5 << 20);
        one.kill9();
        up
    };
    let (alice2, _) = two.connect("alice").await;
    let from = resume(&alice2, id).await;
    assert_eq!(from, 5 << 20);
    assert_eq!(
        alice2.upload_read(id, (4 << 20) - 2, 4).await.unwrap(),
        &data[(4 << 20) - 2..(4 << 20) + 2]
    );
    for (i, piece) in data[5 << 20..].chunks(1 << 20).enumerate() {
        alice2
            .send_chunk(
                id,
                (5 << 20) + ((i as u64) << 20),
                Bytes::copy_from_slice(piece),
            )
            .await
            .unwrap();
    }
    alice2
        .upload_commit(id, data.len() as u64, &hash, None)
        .await
        .unwrap();
    one.restart();
    let (carol1, _) = one.connect("carol").await;
    assert_eq!(download(&carol1, "alice", "resumed").await.unwrap(), data);

    // The database goes away: bounded errors, then service again, nodes untouched.
    backend.postgres.stop(false);
    let failed = within(
        "a request while the database is down",
        alice2.resolve("alice", "small"),
    )
    .await;
    assert!(failed.is_err(), "answered without its database");
    backend.postgres.restart();
    within("service after the database restart", async {
        while download(&carol1, "alice", "small").await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(download(&carol1, "alice", "small").await.unwrap(), small);
}

/// Mounts on two nodes: what one writes (a tree, through `cp -r`) the other reads, and
/// an overwrite through one is what the other reads next.
#[test]
fn mounts_on_two_nodes_see_one_tree() {
    if !fuse_available() {
        return;
    }
    let backend = Arc::new(Backend::start());
    let one = TestServer::start_node(&backend, &[]);
    let two = TestServer::start_node(&backend, &[]);
    let alice = TestMount::new(&one, "alice");
    let bob = TestMount::new(&two, "bob");
    let src = tempfile::tempdir().unwrap();
    for d in 0..3 {
        let dir = src.path().join(format!("d{d}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..5 {
            std::fs::write(
                dir.join(format!("f{f}")),
                content(d * 10 + f, 3000 + f as usize),
            )
            .unwrap();
        }
    }
    run_ok(
        std::process::Command::new("cp")
            .arg("-r")
            .arg(src.path())
            .arg(alice.path("alice/tree")),
    );
    let out = run_ok(
        std::process::Command::new("diff")
            .arg("-r")
            .arg(src.path())
            .arg(bob.path("alice/tree")),
    );
    assert_eq!(out, "");
    let file = alice.path("alice/tree/d1/f2");
    std::fs::write(&file, b"changed through node one").unwrap();
    eventually(
        Duration::from_secs(5),
        "the other node's mount reads the new content",
        || {
            std::fs::read(bob.path("alice/tree/d1/f2")).ok().as_deref()
                == Some(&b"changed through node one"[..])
        },
    );
}

/// A mount given two nodes (one certificate shared by both) keeps copying when the node
/// it is attached to is killed: it reconnects to the other, resumes its upload there, and
/// every `cp` succeeds with the whole file.
#[test]
fn a_mount_fails_over_to_another_node_mid_copy() {
    if !fuse_available() {
        return;
    }
    let backend = Arc::new(Backend::start());
    let mut one = TestServer::start_node(&backend, &[]);
    let cert = one.data.join("tls/cert.pem");
    let key = one.data.join("tls/key.pem");
    let two = TestServer::start_node(
        &backend,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(one.fingerprint, two.fingerprint);
    let servers = format!("{},{}", one.addr, two.addr);
    let alice = TestMount::with(&one, "alice", &[], &[("SHAREFS_SERVER", &servers)]);
    let src = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("f{i}"), content(40 + i, (24 << 20) + i as usize)))
        .collect();
    for (name, data) in &files {
        std::fs::write(src.path().join(name), data).unwrap();
    }
    // The copies run in a shell of their own, which reports each one that fails.
    let script = files
        .iter()
        .map(|(name, _)| {
            format!(
                "cp {} {} || echo FAILED {name}",
                src.path().join(name).display(),
                alice.path("alice").join(name).display()
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let copies = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the node once the first copy is well under way.
    eventually(Duration::from_secs(60), "the first copy under way", || {
        std::fs::metadata(alice.path("alice/f0")).is_ok_and(|m| m.len() > 8 << 20)
    });
    one.kill9();
    let out = within_blocking(Duration::from_secs(240), move || copies.wait_with_output());
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !out.contains("FAILED"),
        "copies failed over a node's death: {out}\n{}",
        alice.log_text()
    );
    for (name, data) in &files {
        assert_eq!(
            server_content(&two, "alice", name).as_deref(),
            Some(&data[..]),
            "{name} is not whole on the other node"
        );
    }
}

/// Runs `f` on a thread, failing the test if it takes longer than `limit`.
fn within_blocking<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("not done within {limit:?}"))
        .unwrap()
}
