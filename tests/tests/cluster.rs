//! Cluster nodes over a real PostgreSQL and a real S3 server (`tests/src/backend.rs`):
//! several nodes serve one set of trees; a tree changed through one is current through
//! another; an upload begun on one node and cut by its kill -9 is resumed on another; a
//! database restart gives bounded errors, then service again without restarting nodes;
//! accounts and download notifications are the cluster's, not a node's.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sharefs_protocol::{ErrorCode, Event};
use sharefs_tests::backend::Backend;
use sharefs_tests::desktop::{NotificationServer, TestBus};
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
/// an overwrite through one is what the other reads next. The second node fetches
/// blocks ahead of sequential readers: a big file read through it comes out whole.
#[test]
fn mounts_on_two_nodes_see_one_tree() {
    if !fuse_available() {
        return;
    }
    let backend = Arc::new(Backend::start());
    let one = TestServer::start_node(&backend, &[]);
    let two = TestServer::start_node(&backend, &["--s3-read-ahead", "16"]);
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
    let big = content(99, 13 * 1024 * 1024 + 5);
    std::fs::write(alice.path("alice/big"), &big).unwrap();
    let read = std::fs::read(bob.path("alice/big")).unwrap();
    assert!(read == big, "the big file read through node two differs");
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

/// Three nodes sharing one certificate (the first's), as docs/SCALE-OUT.md deploys them.
fn three_nodes(backend: &Arc<Backend>) -> [TestServer; 3] {
    let one = TestServer::start_node(backend, &[]);
    let cert = one.data.join("tls/cert.pem");
    let key = one.data.join("tls/key.pem");
    let args = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let two = TestServer::start_node(backend, &args);
    let three = TestServer::start_node(backend, &args);
    [one, two, three]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_and_notifications_belong_to_the_cluster() {
    if !fuse_available() {
        return;
    }
    let backend = Arc::new(Backend::start());
    let [one, mut two, three] = three_nodes(&backend);

    // An account added through the CLI once logs in on every node; removed, on none.
    one.add_user("dave", "pw-dave");
    for node in [&one, &two, &three] {
        let mut ls = node.cli("dave");
        ls.env("SHAREFS_PASSWORD", "pw-dave").arg("ls");
        let out = ls.output().unwrap();
        assert!(out.status.success(), "dave cannot log in on {}", node.addr);
    }
    let (dave, mut dave_events) = three.connect_with("dave", "pw-dave").await;
    upload(&dave, "old", b"dave's").await;
    {
        // Node one caches dave's tree.
        let (carol, _) = one.connect("carol").await;
        assert_eq!(download(&carol, "dave", "old").await.unwrap(), b"dave's");
    }
    one.user(&["remove", "dave", "--purge"], None);
    within("dave's session on another node ends", async {
        while dave_events.recv().await.is_some() {}
    })
    .await;
    assert!(dave.resolve("dave", "").await.is_err());
    // Purged, then made again: a new, empty tree on every node, the cached one included.
    one.add_user("dave", "pw-dave2");
    for node in [&one, &two] {
        let (dave, _) = node.connect_with("dave", "pw-dave2").await;
        assert_eq!(
            dave.resolve("dave", "old").await.unwrap_err().code(),
            Some(ErrorCode::NotFound),
            "a purged file through {}",
            node.addr
        );
        upload(
            &dave,
            &format!("new-{}", node.addr.replace([':', '.'], "-")),
            b"new",
        )
        .await;
    }

    {
        let (alice, _) = one.connect("alice").await;
        upload(&alice, "report.pdf", b"%PDF quarterly").await;
        upload(&alice, "second.pdf", b"%PDF annual").await;
    }
    // alice's mount is attached to node two (node three if two goes); bob downloads
    // through node one.
    let bus = TestBus::start();
    let daemon = NotificationServer::start(&bus).await;
    let servers = format!("{},{}", two.addr, three.addr);
    let alice = TestMount::with(
        &two,
        "alice",
        &[],
        &[
            ("SHAREFS_SERVER", &servers),
            ("DBUS_SESSION_BUS_ADDRESS", &bus.address),
        ],
    );
    assert!(alice.path("alice/report.pdf").exists());
    let (bob, _) = one.connect("bob").await;
    let started = std::time::Instant::now();
    assert_eq!(
        download(&bob, "alice", "report.pdf").await.unwrap(),
        b"%PDF quarterly"
    );
    within("the pop-up on alice's desktop", async {
        while daemon.shown().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let took = started.elapsed();
    eprintln!("a download through node one reached alice on node two in {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let (watcher, _) = three.connect("alice").await;
    within("acknowledged", async {
        while !watcher.notifications(0).await.unwrap().0.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Her node dies; a download meanwhile is not lost, and the one she saw is not shown
    // again when her mount moves to node three.
    two.kill9();
    assert_eq!(
        download(&bob, "alice", "second.pdf").await.unwrap(),
        b"%PDF annual"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let pending = watcher.notifications(0).await.unwrap().0;
        if alice.log_text().contains("bob downloaded second.pdf") && pending.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no second pop-up through node three: {pending:?}\n{}",
            alice.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each shown once (the mount logs each notification it shows); the second may have
    // joined the first's pop-up, as a burst does.
    let log = alice.log_text();
    assert_eq!(log.matches("bob downloaded report.pdf").count(), 1, "{log}");
    assert_eq!(log.matches("bob downloaded second.pdf").count(), 1, "{log}");
    let last = daemon.shown().pop().unwrap();
    assert!(
        last.summary == "bob downloaded second.pdf" || last.summary.contains("2 files"),
        "{last:?}"
    );
    let (pending, recent) = watcher.notifications(10).await.unwrap();
    assert!(pending.is_empty());
    let files: Vec<&str> = recent.iter().map(|n| n.file.as_str()).collect();
    assert_eq!(files, ["report.pdf", "second.pdf"]);
}

/// Pending notifications stay bounded in the database as on disk: past
/// `--max-pending-notifications` the oldest fold into one digest, replayed first;
/// acknowledged, the digest goes and the folded ones stay as history. The history is
/// trimmed to the newest 10,000 of the owner's notifications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_notifications_fold_into_a_digest_across_nodes() {
    const FILES: usize = 40;
    const CAP: usize = 8;
    let backend = Arc::new(Backend::start());
    let cap = CAP.to_string();
    let args = ["--max-pending-notifications", cap.as_str()];
    let one = TestServer::start_node(&backend, &args);
    let two = TestServer::start_node(&backend, &args);
    let (alice, _) = one.connect("alice").await;
    let mut ids = Vec::new();
    for i in 0..FILES {
        let name = format!("f{i:02}");
        let made = alice
            .put_small(&at(&name), Bytes::from(name.into_bytes()))
            .await
            .unwrap();
        ids.push(made.id);
    }
    drop(alice);
    // An old history of 10,100 acknowledged downloads, oldest first.
    let history = |sql: &str| backend.postgres.sql(&backend.url, sql);
    history(
        "INSERT INTO sharefs_notes (owner, downloader, file, size, first_ms, last_ms, count, pending)
         SELECT 'alice', 'carol', 'old/' || n, 1, n, n, 1, false
         FROM generate_series(1, 10100) AS n",
    );
    // bob opens every file, half through each node.
    let (bob1, _) = one.connect("bob").await;
    let (bob2, _) = two.connect("bob").await;
    for (i, id) in ids.iter().enumerate() {
        let bob = if i % 2 == 0 { &bob1 } else { &bob2 };
        within("an open", bob.open_with_head("alice", *id, 64))
            .await
            .unwrap();
    }
    let (alice, _) = two.connect("alice").await;
    let (pending, _) = alice.notifications(0).await.unwrap();
    assert_digest_first(&pending, CAP, FILES, "bob");
    let digest = &pending[0];
    alice.ack(vec![digest.id]).await.unwrap();
    let (after, recent) = alice.notifications(100).await.unwrap();
    assert_eq!(after.len(), pending.len() - 1);
    assert!(after.iter().all(|n| n.folded == 0));
    let bobs = recent.iter().filter(|n| n.downloader == "bob").count();
    assert_eq!(bobs, FILES, "every download is history");
    assert!(recent.iter().all(|n| n.folded == 0));
    // Each node trimmed at its first record: the oldest went, the newest 10,000 stayed
    // (and the 38 made after).
    let count = |sql: &str| history(sql).trim().parse::<u64>().unwrap();
    let kept = count("SELECT count(*) FROM sharefs_notes WHERE owner = 'alice'");
    assert!(
        (10_000..=10_000 + FILES as u64).contains(&kept),
        "{kept} kept"
    );
    let oldest = count("SELECT min(first_ms) FROM sharefs_notes WHERE file LIKE 'old/%'");
    assert!(oldest > 100, "the oldest kept is old/{oldest}");
}

/// Writes `data` to `path` in 256 KiB writes and closes it; the errno of the first call
/// that failed, with its name.
fn write_and_close(path: &std::path::Path, data: &[u8]) -> Result<(), (&'static str, i32)> {
    use std::os::unix::ffi::OsStrExt;
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: plain system calls on a descriptor this function owns.
    unsafe {
        let fd = libc::open(
            c_path.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
            0o644,
        );
        if fd < 0 {
            return Err(("open", errno()));
        }
        for piece in data.chunks(256 << 10) {
            let mut done = 0;
            while done < piece.len() {
                let n = libc::write(fd, piece[done..].as_ptr().cast(), piece.len() - done);
                if n < 0 {
                    let e = errno();
                    libc::close(fd);
                    return Err(("write", e));
                }
                done += n as usize;
            }
        }
        if libc::close(fd) != 0 {
            return Err(("close", errno()));
        }
    }
    Ok(())
}

/// 20 files written through two mounts attached to one node, which is killed while they
/// go up: every `close()` succeeds or fails with EIO; every file closed without an error
/// is whole through the other node; none is ever there in part.
#[test]
fn twenty_uploads_survive_the_kill_of_their_node() {
    if !fuse_available() {
        return;
    }
    let backend = Arc::new(Backend::start());
    let [mut one, two, _three] = three_nodes(&backend);
    let servers = format!("{},{}", one.addr, two.addr);
    let env = [("SHAREFS_SERVER", servers.as_str())];
    let mounts = [
        Arc::new(TestMount::with(&one, "alice", &[], &env)),
        Arc::new(TestMount::with(&one, "bob", &[], &env)),
    ];
    let files: Vec<(usize, String, Arc<Vec<u8>>)> = (0..20)
        .map(|i| {
            let owner = i % 2;
            let len = ((1 + i % 5) << 20) + i * 4099;
            (
                owner,
                format!("up{i:02}"),
                Arc::new(content(100 + i as u64, len)),
            )
        })
        .collect();
    let owners = ["alice", "bob"];
    let writers: Vec<_> = files
        .iter()
        .map(|(owner, name, data)| {
            let mount = mounts[*owner].clone();
            let path = mount.path(&format!("{}/{name}", owners[*owner]));
            let data = data.clone();
            std::thread::spawn(move || write_and_close(&path, &data))
        })
        .collect();
    // Kill the node once a few are well under way.
    eventually(Duration::from_secs(60), "uploads under way", || {
        files
            .iter()
            .filter(|(owner, name, _)| {
                std::fs::metadata(mounts[*owner].path(&format!("{}/{name}", owners[*owner])))
                    .is_ok_and(|m| m.len() > 1 << 20)
            })
            .count()
            >= 3
    });
    one.kill9();
    let results: Vec<_> = within_blocking(Duration::from_secs(300), move || {
        Ok(writers
            .into_iter()
            .map(|w| w.join().unwrap_or(Err(("panic", 0))))
            .collect::<Vec<_>>())
    });
    let (mut closed, mut eio) = (0, 0);
    for ((owner, name, data), result) in files.iter().zip(&results) {
        let stored = server_content(&two, owners[*owner], name);
        match result {
            Ok(()) => {
                closed += 1;
                assert_eq!(
                    stored.as_deref(),
                    Some(&data[..]),
                    "{name}: closed without an error but not whole on the other node"
                );
            }
            Err((call, errno)) => {
                assert_eq!(
                    *errno,
                    libc::EIO,
                    "{name}: {call} failed with errno {errno}"
                );
                eio += 1;
                // The mount makes the file (empty) when it is created; a failed close
                // leaves it so, or whole, never in part.
                if let Some(stored) = stored.filter(|s| !s.is_empty()) {
                    assert_eq!(stored.len(), data.len(), "{name}: a partial file");
                    assert!(stored == **data, "{name}: a file of other bytes");
                }
            }
        }
    }
    eprintln!("20 uploads over the kill of their node: {closed} closed, {eio} failed with EIO");
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
