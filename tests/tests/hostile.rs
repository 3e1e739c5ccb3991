//! Hostile logged-in clients, driven by hand over raw sockets: each attack runs while a
//! normal user keeps working, and must neither stop that user nor grow the server without
//! bound.

use std::time::{Duration, Instant};

use bytes::Bytes;
use sharefs_client::RemoteClient;
use sharefs_protocol::{ErrorCode, Reply, Request};
use sharefs_tests::raw::RawClient;
use sharefs_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Names whose JSON takes twice their length: 251 backslashes and a number.
fn fat_name(i: usize) -> String {
    format!("{}{i:04}", "\\".repeat(251))
}

/// Creates `n` empty files with [`fat_name`]s in `user`'s folder, pipelined.
async fn fat_folder(server: &TestServer, user: &str, n: usize) {
    let mut raw = RawClient::login(&server.addr, user).await;
    let empty = blake3::hash(b"").to_hex().to_string();
    let puts = (0..n)
        .map(|i| {
            let op = Request::Put {
                parent: ROOT_ID,
                replace: None,
                mode: None,
                mtime_ns: None,
                owner: user.into(),
                name: fat_name(i),
                blake3: empty.clone(),
            };
            (op, Bytes::new())
        })
        .collect();
    for answer in raw.pipeline(puts).await {
        answer.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_too_large_for_one_frame_comes_in_pages_and_the_connection_lives() {
    let server = TestServer::start_with(&["--plaintext"]);
    // 4,000 names of 255 bytes that escape to 510: one page of 4,096 would take 2.4 MB of
    // JSON, more than a frame's header may.
    fat_folder(&server, "carol", 4000).await;
    let (alice, _) = server.connect("alice").await;
    let files = tokio::time::timeout(Duration::from_secs(30), alice.list("carol", ROOT_ID))
        .await
        .expect("listing never answered")
        .unwrap();
    assert_eq!(files.len(), 4000);
    assert_eq!(files[3999].name, fat_name(3999));
    // The same connection goes on working.
    upload(&alice, "after", b"still here").await;
    assert_eq!(
        download(&alice, "alice", "after").await.unwrap(),
        b"still here"
    );
    // And the CLI lists it too.
    let out = output_within(server.cli("bob").args(["ls", "carol"]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4000);
}

/// What a normal user does while an attack runs: list, upload, download.
async fn works(bob: &RemoteClient, round: usize, expect: &[u8]) {
    assert!(!bob.list("alice", ROOT_ID).await.unwrap().is_empty());
    let mine = format!("bob says {round}");
    upload(bob, "note", mine.as_bytes()).await;
    assert_eq!(download(bob, "alice", "big").await.unwrap(), expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_handles_are_limited_per_connection_and_per_user() {
    let server = TestServer::start_with(&[
        "--plaintext",
        "--max-open-per-connection",
        "60",
        "--max-open-per-user",
        "90",
    ]);
    let (alice, _) = server.connect("alice").await;
    let big = content(2, 300 * 1024);
    let big_id = upload(&alice, "big", &big).await.id;

    // One connection: its limit.
    let mut carol = RawClient::login(&server.addr, "carol").await;
    assert_eq!(carol.open_many("alice", big_id, 200).await, (60, 140));
    // A second connection of the same user: what is left of the user's limit.
    let mut carol2 = RawClient::login(&server.addr, "carol").await;
    assert_eq!(carol2.open_many("alice", big_id, 200).await, (30, 170));
    // Meanwhile others work, opens included.
    let (bob, _) = server.connect("bob").await;
    works(&bob, 0, &big).await;
    // Handles go with their connection.
    drop(carol);
    eventually(
        Duration::from_secs(10),
        "carol's handles are given back",
        || server.log_text().matches("disconnected").count() >= 1,
    );
    let mut carol3 = RawClient::login(&server.addr, "carol").await;
    assert_eq!(carol3.open_many("alice", big_id, 100).await, (60, 40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_handles_leave_descriptors_for_everyone_else() {
    // 400 descriptors: without a budget, a few hundred opens leave none for anyone.
    let server = TestServer::start_with_nofile(&["--plaintext"], 400);
    let (alice, _) = server.connect("alice").await;
    let big = content(2, 300 * 1024);
    let big_id = upload(&alice, "big", &big).await.id;
    let (bob, _) = server.connect("bob").await;

    // Users opening all they may: the server's budget (a quarter of its 400 descriptors)
    // refuses before the process runs out, each user getting at most half of what is
    // free, and bob still works.
    let mut raws = Vec::new();
    let mut total = 0;
    for i in 0..4 {
        let user = format!("user{i}");
        server.add_user(&user, PASSWORD);
        let mut raw = RawClient::login(&server.addr, &user).await;
        let (opened, _) = raw.open_many("alice", big_id, 300).await;
        total += opened;
        raws.push(raw);
    }
    assert!(
        (80..=100).contains(&total),
        "{total} handles open under a budget of 100"
    );
    for round in 0..3 {
        works(&bob, round, &big).await;
    }
    // New connections get in and read.
    let (dave, _) = server.connect("carol").await;
    assert_eq!(download(&dave, "alice", "big").await.unwrap(), big);
    assert!(
        server.open_fds().unwrap() < 300,
        "the server is near its descriptor limit"
    );
    assert!(!server.log_text().contains("Too many open files"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_up_nobody_and_is_disconnected() {
    let server = TestServer::start_with(&["--plaintext", "--reply-timeout", "4"]);
    let (alice, _) = server.connect("alice").await;
    let big = content(3, 2 << 20);
    upload(&alice, "big", &big).await;
    upload(&alice, "small", &content(4, 180)).await;

    // Carol opens the 2 MiB file and asks for it 300 times over, never reading a reply.
    let mut carol = RawClient::login(&server.addr, "carol").await;
    let big_id = carol.id_of("alice", "big").await;
    let handle = match carol
        .call(
            Request::Open {
                owner: "alice".into(),
                id: big_id,
                head: 0,
            },
            Bytes::new(),
        )
        .await
        .unwrap()
    {
        (Reply::Opened { handle, .. }, _) => handle,
        other => panic!("{other:?}"),
    };
    let started = Instant::now();
    let stalled = tokio::spawn(async move {
        for i in 0..300u64 {
            let op = Request::Read {
                handle,
                offset: (i % 2) << 20,
                len: 1 << 20,
            };
            carol.feed(op, Bytes::new()).await;
        }
        // The server stops reading her requests: this flush may never finish.
        carol.flush_for(Duration::from_secs(30)).await;
        carol
    });

    // Bob's downloads go on at once, however long carol stalls.
    let (bob, _) = server.connect("bob").await;
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(download(&bob, "alice", "small").await.unwrap().len(), 180);
        assert_eq!(download(&bob, "alice", "big").await.unwrap(), big);
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "bob waited {:?} for a download",
            t.elapsed()
        );
    }
    // Carol is disconnected once she has taken nothing for the reply timeout.
    eventually(
        Duration::from_secs(30),
        "the stalled client is closed",
        || server.log_text().contains("stopped taking its replies"),
    );
    assert!(started.elapsed() >= Duration::from_secs(4));
    let mut carol = stalled.await.unwrap();
    // Her socket is closed: what she reads now ends (after whatever was sent).
    let mut buf = vec![0u8; 1 << 20];
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match carol.framed.get_mut().read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stalled connection was never closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_queued_for_clients_that_do_not_read_are_bounded() {
    let server = TestServer::start_with(&["--plaintext", "--reply-timeout", "600"]);
    fat_folder(&server, "carol", 4000).await;
    let (alice, _) = server.connect("alice").await;
    let big = content(5, 1 << 20);
    upload(&alice, "big", &big).await;
    let before = server.rss_kib().unwrap();

    // 8 connections each ask for 300 listings of 256 KiB pages and never read.
    let mut attackers = Vec::new();
    for _ in 0..8 {
        let mut raw = RawClient::login(&server.addr, "carol").await;
        attackers.push(tokio::spawn(async move {
            for _ in 0..300 {
                let op = Request::List {
                    dir: ROOT_ID,
                    owner: "carol".into(),
                    after: None,
                    limit: None,
                };
                raw.feed(op, Bytes::new()).await;
            }
            raw.flush_for(Duration::from_secs(20)).await;
            raw
        }));
    }
    let (bob, _) = server.connect("bob").await;
    let mut peak_rss = 0;
    let mut peak_threads = 0;
    let mut round = 0;
    while attackers.iter().any(|a| !a.is_finished()) {
        works(&bob, round, &big).await;
        round += 1;
        peak_rss = peak_rss.max(server.rss_kib().unwrap());
        peak_threads = peak_threads.max(server.threads().unwrap());
    }
    // The attackers' sockets are still open, their replies unread.
    let _held: Vec<RawClient> = futures::future::join_all(attackers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for _ in 0..5 {
        works(&bob, round, &big).await;
        round += 1;
        peak_rss = peak_rss.max(server.rss_kib().unwrap());
        peak_threads = peak_threads.max(server.threads().unwrap());
    }
    eprintln!("RSS {before} KiB before, peak {peak_rss} KiB; peak threads {peak_threads}");
    assert!(
        peak_rss < before + 96 * 1024,
        "server RSS grew from {before} to {peak_rss} KiB"
    );
    assert!(peak_threads < 100, "{peak_threads} server threads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_has_one_deadline_from_accept_to_login() {
    let server = TestServer::start_with(&["--plaintext", "--handshake-timeout", "3"]);
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    // The first byte just before the timeout, then the rest of the hello never.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.write_all(&[0, 0]).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "never closed");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(4500),
        "closed after {took:?}, past the 3 s handshake timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_refused_as_busy_is_told_so_over_tls() {
    let server = TestServer::start_with(&["--max-connections", "1"]);
    let (_alice, _) = server.connect("alice").await;
    match within("connect", RemoteClient::connect(&server.options("bob"))).await {
        Ok(_) => panic!("a second connection got in past the limit of one"),
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::Busy), "{e}"),
    }
}
