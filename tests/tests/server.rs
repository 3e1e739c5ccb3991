//! End-to-end tests of the server and client library: real server processes, real TCP.

use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;
use sharefs_client::ClientError;
use sharefs_protocol::{ClientMessage, ErrorCode, Event, Frame, FrameCodec, Request};
use sharefs_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Framed;

fn code(e: &ClientError) -> Option<ErrorCode> {
    e.code()
}

async fn next_notification(
    events: &mut sharefs_client::EventStream,
) -> sharefs_protocol::Notification {
    loop {
        match within("notification event", events.recv()).await {
            Some(Event::Notification { notification }) => return notification,
            Some(_) => continue,
            None => panic!("connection closed while waiting for a notification"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_users_share_files_and_owner_is_notified() {
    let server = TestServer::start();
    let (alice, mut alice_events) = server.connect("alice").await;
    let (bob, _) = server.connect("bob").await;

    let small = b"quarterly numbers\n".to_vec();
    let big = content(7, 200 << 20);
    upload(&alice, "report.txt", &small).await;
    let info = upload(&alice, "big.bin", &big).await;
    assert_eq!(info.size, big.len() as u64);

    assert_eq!(
        bob.list_users().await.unwrap(),
        vec!["alice", "bob", "carol"]
    );
    let files = bob.list("alice", ROOT_ID).await.unwrap();
    let names: Vec<_> = files.iter().map(|f| (f.name.as_str(), f.size)).collect();
    assert_eq!(
        names,
        vec![
            ("big.bin", big.len() as u64),
            ("report.txt", small.len() as u64)
        ]
    );

    assert_eq!(download(&bob, "alice", "report.txt").await.unwrap(), small);
    let n = next_notification(&mut alice_events).await;
    assert_eq!(
        (n.downloader.as_str(), n.file.as_str(), n.count),
        ("bob", "report.txt", 1)
    );

    let got = download(&bob, "alice", "big.bin").await.unwrap();
    assert_eq!(sha256(&got), sha256(&big), "200 MiB download differs");
    let n = next_notification(&mut alice_events).await;
    assert_eq!((n.downloader.as_str(), n.file.as_str()), ("bob", "big.bin"));

    // Alice reading her own file is not a download. Open records before it replies, so
    // once her read returns, a wrong notification would already be pending.
    assert_eq!(
        download(&alice, "alice", "report.txt").await.unwrap(),
        small
    );
    let (pending, _) = alice.notifications(10).await.unwrap();
    let mut seen: Vec<_> = pending
        .iter()
        .map(|n| (n.downloader.as_str(), n.file.as_str()))
        .collect();
    seen.sort();
    assert_eq!(seen, vec![("bob", "big.bin"), ("bob", "report.txt")]);
    assert!(alice_events.try_recv().is_err(), "unexpected extra event");

    // Bob has no notifications of his own.
    assert!(bob.notifications(10).await.unwrap().0.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_downloads_are_coalesced() {
    let server = TestServer::start();
    let (alice, mut events) = server.connect("alice").await;
    let (bob, _) = server.connect("bob").await;
    upload(&alice, "f", b"x").await;
    for _ in 0..5 {
        download(&bob, "alice", "f").await.unwrap();
    }
    let n = next_notification(&mut events).await;
    assert_eq!(n.file, "f");
    let (pending, _) = alice.notifications(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].count, 5);
    assert!(
        events.try_recv().is_err(),
        "coalesced downloads pushed more than once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_owner_gets_notification_after_server_restart() {
    let mut server = TestServer::start();
    {
        let (alice, _) = server.connect("alice").await;
        upload(&alice, "notes.txt", b"hello").await;
    }
    let (bob, _) = server.connect("bob").await;
    download(&bob, "alice", "notes.txt").await.unwrap();
    drop(bob);

    server.restart(); // kill -9, then start again

    let (alice, mut events) = server.connect("alice").await;
    let n = next_notification(&mut events).await;
    assert_eq!(
        (n.downloader.as_str(), n.file.as_str()),
        ("bob", "notes.txt")
    );
    // Pending events are sent before any reply, so after this reply none can follow.
    alice.list_users().await.unwrap();
    assert!(events.try_recv().is_err(), "notification delivered twice");
    alice.ack(vec![n.id]).await.unwrap();
    drop(alice);

    let (alice, mut events) = server.connect("alice").await;
    let (pending, recent) = alice.notifications(10).await.unwrap();
    assert!(
        pending.is_empty(),
        "acknowledged notification still pending"
    );
    assert_eq!(recent.len(), 1, "history keeps the notification");
    assert!(
        !matches!(events.try_recv(), Ok(Event::Notification { .. })),
        "acknowledged notification re-sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_files_cannot_be_changed() {
    let server = TestServer::start();
    let (alice, _) = server.connect("alice").await;
    let (bob, _) = server.connect("bob").await;
    upload(&alice, "mine.txt", b"alice's").await;

    let denied = |r: Result<_, ClientError>| {
        let e = r.expect_err("request succeeded");
        assert_eq!(code(&e), Some(ErrorCode::PermissionDenied), "{e}");
    };
    denied(
        bob.remove("alice", ROOT_ID, "mine.txt", false)
            .await
            .map(|_| ()),
    );
    let rename = Request::Rename {
        owner: "alice".into(),
        parent: ROOT_ID,
        name: "mine.txt".into(),
        new_parent: ROOT_ID,
        new_name: "x".into(),
        noreplace: false,
    };
    denied(bob.call(rename, Bytes::new()).await.map(|_| ()));
    let chmod = Request::SetAttr {
        owner: "alice".into(),
        id: alice.resolve("alice", "mine.txt").await.unwrap().id,
        mode: Some(0o777),
        atime_ns: None,
        mtime_ns: None,
    };
    denied(bob.call(chmod, Bytes::new()).await.map(|_| ()));
    let mkdir = Request::Mkdir {
        owner: "alice".into(),
        parent: ROOT_ID,
        name: "d".into(),
        mode: 0o755,
    };
    denied(bob.call(mkdir, Bytes::new()).await.map(|_| ()));
    let begin = Request::UploadBegin {
        parent: ROOT_ID,
        replace: None,
        mode: None,
        owner: "alice".into(),
        name: "mine.txt".into(),
        size: Some(3),
    };
    denied(bob.call(begin, Bytes::new()).await.map(|_| ()));
    let put = Request::Put {
        parent: ROOT_ID,
        replace: None,
        mode: None,
        mtime_ns: None,
        owner: "alice".into(),
        name: "mine.txt".into(),
        blake3: blake3_hex(b"bob"),
    };
    denied(bob.call(put, Bytes::from_static(b"bob")).await.map(|_| ()));

    assert_eq!(
        download(&alice, "alice", "mine.txt").await.unwrap(),
        b"alice's"
    );
    assert_eq!(alice.list("alice", ROOT_ID).await.unwrap().len(), 1);

    // Missing things are ENOENT-like, not permission errors.
    let e = bob.lookup("alice", ROOT_ID, "nope").await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotFound));
    let e = bob.list("nobody", ROOT_ID).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotFound));
}

fn blake3_hex(data: &[u8]) -> String {
    ::blake3::hash(data).to_hex().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_come_in_pages() {
    let server = TestServer::start();
    let (alice, _) = server.connect("alice").await;
    for i in 0..5 {
        upload(&alice, &format!("f{i}"), b"x").await;
    }
    let page = |after: Option<&str>| Request::List {
        dir: ROOT_ID,
        owner: "alice".into(),
        after: after.map(str::to_string),
        limit: Some(2),
    };
    let (reply, _) = alice.call(page(None), Bytes::new()).await.unwrap();
    let sharefs_protocol::Reply::Files { files, more } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!((files.len(), more), (2, true));
    let (reply, _) = alice.call(page(Some("f3")), Bytes::new()).await.unwrap();
    let sharefs_protocol::Reply::Files { files, more } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!((files[0].name.as_str(), more), ("f4", false));
    assert_eq!(alice.list("alice", ROOT_ID).await.unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_are_refused() {
    let server = TestServer::start();
    let (alice, _) = server.connect("alice").await;
    let long = "x".repeat(300);
    for name in ["../x", "a/b", ".", "..", "a\0b", long.as_str(), ""] {
        let put = Request::Put {
            parent: ROOT_ID,
            replace: None,
            mode: None,
            mtime_ns: None,
            owner: "alice".into(),
            name: name.into(),
            blake3: blake3_hex(b"data"),
        };
        let e = alice
            .call(put, Bytes::from_static(b"data"))
            .await
            .unwrap_err();
        // A name over 255 bytes is ENAMETOOLONG's `name_too_long`.
        let want = if name.len() > 255 {
            ErrorCode::NameTooLong
        } else {
            ErrorCode::InvalidName
        };
        assert_eq!(code(&e), Some(want), "{name:?}: {e}");
        let e = alice.upload_begin(&at(name), None).await.unwrap_err();
        assert_eq!(code(&e), Some(want), "{name:?}: {e}");
    }
    let e = alice.list("../alice", ROOT_ID).await.unwrap_err();
    assert!(matches!(
        code(&e),
        Some(ErrorCode::NotFound | ErrorCode::InvalidName)
    ));
    assert!(alice.list("alice", ROOT_ID).await.unwrap().is_empty());
    // Nothing was written outside the data directory.
    assert!(!server.data.parent().unwrap().join("x").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_logins_are_refused() {
    let server = TestServer::start();
    let mut opts = server.options("alice");
    opts.password = "wrong".into();
    let e = sharefs_client::RemoteClient::connect(&opts)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::AuthFailed), "{e}");
    let mut opts = server.options("mallory");
    opts.password = PASSWORD.into();
    let e2 = sharefs_client::RemoteClient::connect(&opts)
        .await
        .unwrap_err();
    assert_eq!(code(&e2), Some(ErrorCode::AuthFailed));
    assert_eq!(
        e.to_string(),
        e2.to_string(),
        "unknown user distinguishable from wrong password"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_login_are_refused() {
    let server = TestServer::start_with(&["--plaintext"]);
    let stream = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let mut framed = Framed::new(stream, FrameCodec::new(1 << 20));
    let hello = ClientMessage::Hello {
        magic: sharefs_protocol::MAGIC.into(),
        version: sharefs_protocol::VERSION,
        max_frame: 1 << 20,
    };
    framed
        .send(Frame::new(&hello, Bytes::new()).unwrap())
        .await
        .unwrap();
    let req = ClientMessage::Request {
        id: 1,
        deadline_ms: None,
        lazy: false,
        op: Request::ListUsers,
    };
    framed
        .send(Frame::new(&req, Bytes::new()).unwrap())
        .await
        .unwrap();
    let mut saw_error = false;
    while let Some(frame) = within("server reply", futures::StreamExt::next(&mut framed)).await {
        let msg: sharefs_protocol::ServerMessage = frame.unwrap().message().unwrap();
        match msg {
            sharefs_protocol::ServerMessage::Hello { .. } => {}
            sharefs_protocol::ServerMessage::Error { id: None, error } => {
                assert_eq!(error.code, ErrorCode::ProtocolError);
                saw_error = true;
            }
            other => panic!("request before login answered: {other:?}"),
        }
    }
    assert!(saw_error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_mismatch_is_a_clear_error() {
    let server = TestServer::start_with(&["--plaintext"]);
    // The server's first answer to a hello of `version`.
    let answer = |version: u32| {
        let addr = server.addr.clone();
        async move {
            let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let mut framed = Framed::new(stream, FrameCodec::new(1 << 20));
            let hello = ClientMessage::Hello {
                magic: sharefs_protocol::MAGIC.into(),
                version,
                max_frame: 1 << 20,
            };
            framed
                .send(Frame::new(&hello, Bytes::new()).unwrap())
                .await
                .unwrap();
            let frame = within("reply", futures::StreamExt::next(&mut framed))
                .await
                .unwrap()
                .unwrap();
            frame.message::<sharefs_protocol::ServerMessage>().unwrap()
        }
    };
    for (version, upgrade) in [(99, "upgrade the server"), (1, "upgrade the client")] {
        match answer(version).await {
            sharefs_protocol::ServerMessage::Error { error, .. } => {
                assert_eq!(error.code, ErrorCode::VersionMismatch);
                assert!(error.message.contains(upgrade), "{}", error.message);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Version 2 clients are still served, in their version.
    match answer(2).await {
        sharefs_protocol::ServerMessage::Hello { version, .. } => assert_eq!(version, 2),
        other => panic!("unexpected {other:?}"),
    }
}

/// Reads until EOF; the server must close a misbehaving connection.
async fn expect_closed(mut stream: tokio::net::TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match within("server closes the connection", stream.read(&mut buf)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_and_garbage_close_only_that_connection() {
    let server = TestServer::start_with(&["--plaintext"]);
    let (alice, _) = server.connect("alice").await;
    upload(&alice, "still-here", b"fine").await;

    // Garbage before the handshake.
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    expect_closed(s).await;

    // A length prefix far beyond the maximum, after a proper login.
    let (bob, _) = server.connect("bob").await;
    drop(bob);
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    s.write_all(&[0u8; 1024]).await.unwrap();
    expect_closed(s).await;

    // Random bytes.
    let mut s = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    s.write_all(&content(3, 100_000)).await.unwrap_or(());
    expect_closed(s).await;

    // Valid frame, malformed JSON after login.
    let (carol, _) = server.connect("carol").await;
    drop(carol);
    let stream = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let mut framed = Framed::new(stream, FrameCodec::new(1 << 20));
    framed
        .send(Frame {
            header: Bytes::from_static(b"{not json"),
            payload: Bytes::new(),
        })
        .await
        .unwrap();
    expect_closed(framed.into_inner()).await;

    // The existing session was never disturbed.
    assert_eq!(
        download(&alice, "alice", "still-here").await.unwrap(),
        b"fine"
    );
    let (bob, _) = server.connect("bob").await;
    assert_eq!(
        download(&bob, "alice", "still-here").await.unwrap(),
        b"fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_clients_upload_and_download_at_once() {
    let server = std::sync::Arc::new(TestServer::start());
    let users = ["alice", "bob", "carol"];
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let server = server.clone();
        let user = users[i as usize % 3];
        tasks.push(tokio::spawn(async move {
            let (client, _) = server.connect(user).await;
            let data = content(i, 1_000_000 + i as usize * 37_123);
            let name = format!("file-{i}");
            upload(&client, &name, &data).await;
            let back = download(&client, user, &name).await.unwrap();
            assert_eq!(sha256(&back), sha256(&data), "{name}");
            // And read someone else's while others write.
            let other = users[(i as usize + 1) % 3];
            let _ = client.list(other, ROOT_ID).await.unwrap();
        }));
    }
    for t in tasks {
        within("client task", t).await.unwrap();
    }
    let (alice, _) = server.connect("alice").await;
    for i in 0..20u64 {
        let owner = users[i as usize % 3];
        let data = download(&alice, owner, &format!("file-{i}")).await.unwrap();
        assert_eq!(
            sha256(&data),
            sha256(&content(i, 1_000_000 + i as usize * 37_123))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_uploads_leaves_old_or_new_versions() {
    const FILES: u64 = 20;
    let size = |v: u64, i: u64| (3 << 20) + (i as usize) * 4099 + v as usize;
    let mut server = TestServer::start();
    {
        let (alice, _) = server.connect("alice").await;
        for i in 0..FILES {
            upload(&alice, &format!("f{i}"), &content(i, size(1, i))).await;
        }
    }
    let (watcher, mut events) = server.connect("bob").await;
    let mut tasks = Vec::new();
    for i in 0..FILES {
        let opts = server.options("alice");
        tasks.push(tokio::spawn(async move {
            let (client, _) = sharefs_client::RemoteClient::connect(&opts).await?;
            let data = content(1000 + i, size(2, i));
            sharefs_client::transfer::upload(
                &client,
                &at(&format!("f{i}")),
                &data[..],
                Some(data.len() as u64),
                |_| {},
            )
            .await
        }));
    }
    // Kill as soon as the first new version is committed: the rest are mid-flight.
    loop {
        match within("first commit", events.recv()).await {
            Some(Event::Changed { .. }) => break,
            Some(_) => continue,
            None => panic!("watcher disconnected"),
        }
    }
    server.kill9();
    let mut committed = 0;
    for t in tasks {
        if let Ok(Ok(_)) = within("upload task", t).await {
            committed += 1;
        }
    }
    drop(watcher);
    server.restart();

    let (alice, _) = server.connect("alice").await;
    let files = alice.list("alice", ROOT_ID).await.unwrap();
    assert_eq!(files.len() as u64, FILES, "a file vanished");
    let mut new_versions = 0;
    for f in &files {
        let i: u64 = f.name[1..].parse().unwrap();
        let data = download(&alice, "alice", &f.name).await.unwrap();
        assert_eq!(
            data.len() as u64,
            f.size,
            "{}: metadata size disagrees with blob",
            f.name
        );
        let h = sha256(&data);
        if h == sha256(&content(1000 + i, size(2, i))) {
            new_versions += 1;
        } else {
            assert_eq!(
                h,
                sha256(&content(i, size(1, i))),
                "{}: neither old nor new",
                f.name
            );
        }
    }
    assert!(new_versions >= committed, "an acknowledged commit was lost");
    assert!(
        new_versions < FILES as usize,
        "kill came too late to test anything"
    );
    // No temp file or orphaned blob survives the restart's recovery: only the parts of
    // the uploads cut short, kept for their clients to resume (each with its sidecar).
    let tmp: Vec<String> = std::fs::read_dir(server.data.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for name in &tmp {
        let part = name.strip_suffix(".json").unwrap_or(name);
        assert!(
            part.starts_with("part-")
                && tmp.contains(&part.to_string())
                && tmp.contains(&format!("{part}.json")),
            "left after restart: {name} ({tmp:?})"
        );
    }
    let blobs = std::fs::read_dir(server.data.join("files/alice"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".blob")
        })
        .count();
    assert_eq!(blobs as u64, FILES, "orphaned blobs after recovery");
}

/// Takes up `upload` on `client`, waiting (bounded) while the server still holds it for
/// the connection that went.
async fn resume(client: &sharefs_client::RemoteClient, upload: u64) -> u64 {
    within("resume", async {
        loop {
            match client.upload_resume(upload).await {
                Err(e) if e.code() == Some(ErrorCode::Busy) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                r => return r.unwrap(),
            }
        }
    })
    .await
}

/// A client that vanishes mid-upload leaves the upload for a resume within the upload
/// idle bound (over a server restart too), and nothing once that is past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_outlives_its_connection_and_the_server_for_the_idle_bound() {
    let mut server = TestServer::start_with(&["--upload-idle-timeout", "2"]);
    let tmp_files =
        |server: &TestServer| std::fs::read_dir(server.data.join("tmp")).unwrap().count();
    let (alice, _) = server.connect("alice").await;
    upload(&alice, "keep", b"old").await;
    let data = content(5, (3 << 20) + 4321);
    let hash = blake3::hash(&data).to_hex().to_string();
    let upload_id = {
        let (vanishing, _) = server.connect("alice").await;
        let up = vanishing.upload_begin(&at("keep"), None).await.unwrap();
        vanishing
            .send_chunk(up, 0, Bytes::copy_from_slice(&data[..1 << 20]))
            .await
            .unwrap();
        assert_eq!(vanishing.upload_sync(up).await.unwrap(), 1 << 20);
        up
    };
    // Another user cannot take it; its owner can, from where it was made durable.
    let (bob, _) = server.connect("bob").await;
    assert_eq!(
        bob.upload_resume(upload_id).await.unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
    let (alice2, _) = server.connect("alice").await;
    assert_eq!(resume(&alice2, upload_id).await, 1 << 20);
    alice2
        .send_chunk(
            upload_id,
            1 << 20,
            Bytes::copy_from_slice(&data[1 << 20..2 << 20]),
        )
        .await
        .unwrap();
    assert_eq!(alice2.upload_sync(upload_id).await.unwrap(), 2 << 20);
    drop((alice, alice2, bob));

    // kill -9 of the server: the upload is still there after the restart.
    server.kill9();
    server.restart();
    let (alice, _) = server.connect("alice").await;
    assert_eq!(resume(&alice, upload_id).await, 2 << 20);
    assert_eq!(
        alice
            .upload_read(upload_id, (1 << 20) - 3, 6)
            .await
            .unwrap(),
        &data[(1 << 20) - 3..(1 << 20) + 3]
    );
    alice
        .send_chunk(upload_id, 2 << 20, Bytes::copy_from_slice(&data[2 << 20..]))
        .await
        .unwrap();
    let info = alice
        .upload_commit(upload_id, data.len() as u64, &hash, None)
        .await
        .unwrap();
    assert_eq!(download(&alice, "alice", "keep").await.unwrap(), data);
    let (_, size, blake3) = alice.content_hash(info.id).await.unwrap();
    assert_eq!((size, blake3), (data.len() as u64, hash));
    assert_eq!(tmp_files(&server), 0, "a committed upload left files");

    // One that nobody resumes is discarded after the bound.
    {
        let (vanishing, _) = server.connect("alice").await;
        let up = vanishing.upload_begin(&at("keep"), None).await.unwrap();
        vanishing
            .send_chunk(up, 0, Bytes::from(vec![1u8; 1 << 20]))
            .await
            .unwrap();
        vanishing.list_users().await.unwrap();
        assert_eq!(tmp_files(&server), 2);
    }
    within("unresumed upload discarded", async {
        while tmp_files(&server) != 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(download(&alice, "alice", "keep").await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_handle_keeps_reading_its_version() {
    let server = TestServer::start();
    let (alice, _) = server.connect("alice").await;
    let old = content(1, 3 << 20);
    upload(&alice, "f", &old).await;
    let (handle, info) = alice
        .open("alice", alice.resolve("alice", "f").await.unwrap().id)
        .await
        .unwrap();
    upload(&alice, "f", &content(2, 1 << 20)).await;
    let head = alice.read(handle, 0, 1024).await.unwrap();
    assert_eq!(&head[..], &old[..1024]);
    let tail = alice.read(handle, info.size - 10, 1024).await.unwrap();
    assert_eq!(&tail[..], &old[old.len() - 10..]);
    alice.close(handle).await.unwrap();
    assert_eq!(
        alice.lookup("alice", ROOT_ID, "f").await.unwrap().size,
        1 << 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_comes_whole_with_its_open_keeps_no_handle() {
    let server = TestServer::start();
    let (alice, _) = server.connect("alice").await;
    let small = content(3, 5000);
    upload(&alice, "small", &small).await;
    upload(&alice, "empty", b"").await;
    let big = content(4, 3 << 20);
    upload(&alice, "big", &big).await;

    let (handle, info, data) = alice
        .open_with_head(
            "alice",
            alice.resolve("alice", "small").await.unwrap().id,
            8192,
        )
        .await
        .unwrap();
    assert_eq!((handle, info.size), (0, 5000));
    assert_eq!(&data[..], &small[..]);
    let (handle, _, data) = alice
        .open_with_head(
            "alice",
            alice.resolve("alice", "empty").await.unwrap().id,
            8192,
        )
        .await
        .unwrap();
    assert_eq!((handle, data.len()), (0, 0));
    // A head shorter than the file: a handle to read the rest with.
    let (handle, _, data) = alice
        .open_with_head(
            "alice",
            alice.resolve("alice", "small").await.unwrap().id,
            1000,
        )
        .await
        .unwrap();
    assert_ne!(handle, 0);
    assert_eq!(&data[..], &small[..1000]);
    let rest = alice.read(handle, 1000, 8192).await.unwrap();
    assert_eq!(&rest[..], &small[1000..]);
    let (handle, _, data) = alice
        .open_with_head(
            "alice",
            alice.resolve("alice", "big").await.unwrap().id,
            1 << 20,
        )
        .await
        .unwrap();
    assert_ne!(handle, 0);
    assert_eq!(&data[..], &big[..1 << 20]);
    // Handle 0 is nobody's: reading through it fails, closing it is harmless.
    assert!(alice.read(0, 0, 10).await.is_err());
    alice.close(0).await.unwrap();
    alice.list_users().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_keeps_committed_data() {
    let mut server = TestServer::start();
    let (alice, _) = server.connect("alice").await;
    upload(&alice, "f", b"committed").await;
    let up = alice.upload_begin(&at("g"), None).await.unwrap();
    alice
        .send_chunk(up, 0, Bytes::from_static(b"partial"))
        .await
        .unwrap();
    alice.list_users().await.unwrap();
    let status = server.terminate();
    assert!(status.success(), "server exit status {status}");
    within("client sees the close", alice.closed()).await;
    server.restart();
    let (alice, _) = server.connect("alice").await;
    let names: Vec<_> = alice
        .list("alice", ROOT_ID)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, vec!["f"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_small_file_writes_keeps_every_acknowledged_file() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    const WRITERS: u64 = 4;
    const NAMES: u64 = 40;
    let size = |t: u64, j: u64| ((t * 7919 + j * 104_729) % 60_000) as usize;
    let mut server = TestServer::start();
    /// name -> (last acknowledged j, j in flight)
    type Versions = HashMap<String, (Option<u64>, Option<u64>)>;
    let state: Arc<Mutex<Versions>> = Arc::default();
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..WRITERS {
        let opts = server.options("alice");
        let state = state.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let (client, _) = sharefs_client::RemoteClient::connect(&opts).await?;
            for j in 0.. {
                let name = format!("t{t}_{}", j % NAMES);
                state.lock().unwrap().entry(name.clone()).or_default().1 = Some(j);
                let data = content(t * 1_000_000 + j, size(t, j));
                sharefs_client::transfer::upload(
                    &client,
                    &at(&name),
                    &data[..],
                    Some(data.len() as u64),
                    |_| {},
                )
                .await?;
                state.lock().unwrap().insert(name, (Some(j), None));
                acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Ok::<(), ClientError>(())
        }));
    }
    // Kill once many small files (new ones and overwrites) have been acknowledged.
    within("300 acknowledged writes", async {
        while acked.load(std::sync::atomic::Ordering::SeqCst) < 300 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    server.kill9();
    for t in tasks {
        let r = within("writer task", t).await.unwrap();
        assert!(r.is_err(), "writer finished without the server");
    }
    server.restart();

    let (alice, _) = server.connect("alice").await;
    let listed: HashMap<String, u64> = alice
        .list("alice", ROOT_ID)
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.name, f.size))
        .collect();
    let state = state.lock().unwrap().clone();
    for (name, (done, in_flight)) in &state {
        let t: u64 = name[1..name.find('_').unwrap()].parse().unwrap();
        let ok_versions: Vec<u64> = done.iter().chain(in_flight.iter()).copied().collect();
        let Some(&size_listed) = listed.get(name) else {
            assert!(done.is_none(), "{name}: acknowledged but lost");
            continue;
        };
        let data = download(&alice, "alice", name).await.unwrap();
        assert_eq!(data.len() as u64, size_listed, "{name}: size disagrees");
        let h = sha256(&data);
        assert!(
            ok_versions
                .iter()
                .any(|j| h == sha256(&content(t * 1_000_000 + j, size(t, *j)))),
            "{name}: content is neither the acknowledged nor the in-flight version"
        );
    }
    for name in listed.keys() {
        assert!(
            state.contains_key(name),
            "{name} appeared but was never written"
        );
    }
}
