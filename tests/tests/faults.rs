//! Integrity under faults, end to end: a real server on a real, nearly full filesystem
//! (a small tmpfs each test mounts), real TCP. Every write the server confirmed must read
//! back exactly, also after restarts; every write it could not make durable must fail with
//! a clear error and leave nothing behind.

use std::collections::BTreeMap;

use sharefs_client::RemoteClient;
use sharefs_protocol::ErrorCode;
use sharefs_tests::*;

/// Writes `count` files of `size` bytes (content from `seed + i`) one after another and
/// returns the names the server confirmed, with their seeds. A refusal must say the disk
/// is full; any other error fails the test.
async fn write_until_full(
    client: &RemoteClient,
    prefix: &str,
    count: u64,
    size: usize,
) -> (BTreeMap<String, u64>, u64) {
    let mut confirmed = BTreeMap::new();
    let mut refused = 0;
    for i in 0..count {
        let name = format!("{prefix}{i:05}");
        let data = content(i + 1000 * size as u64, size);
        let r = within(
            "upload",
            sharefs_client::transfer::upload(
                client,
                &at(&name),
                &data[..],
                Some(size as u64),
                |_| {},
            ),
        )
        .await;
        match r {
            Ok(info) => {
                assert_eq!(info.size, size as u64);
                confirmed.insert(name, i + 1000 * size as u64);
            }
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{name}: {e}");
                refused += 1;
            }
        }
    }
    (confirmed, refused)
}

/// Every confirmed file is listed with its size and reads back exactly.
async fn verify(server: &TestServer, confirmed: &BTreeMap<String, u64>, size: usize, when: &str) {
    let (client, _) = server.connect("alice").await;
    let listed: BTreeMap<String, u64> = within("list", client.list("alice", ROOT_ID))
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.name, f.size))
        .collect();
    let mut wrong = Vec::new();
    for (name, seed) in confirmed {
        if listed.get(name) != Some(&(size as u64)) {
            wrong.push(format!("{name}: listed as {:?}", listed.get(name)));
            continue;
        }
        let data = download(&client, "alice", name).await.unwrap();
        if data != content(*seed, size) {
            wrong.push(format!("{name}: content differs"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{when}: {} of {} confirmed files wrong, first: {:?}",
        wrong.len(),
        confirmed.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// Every confirmed file reads back exactly while the server runs, after a clean restart
/// and after kill -9.
async fn verify_through_restarts(
    server: &mut TestServer,
    confirmed: &BTreeMap<String, u64>,
    size: usize,
) {
    verify(server, confirmed, size, "while running").await;
    server.terminate();
    server.restart();
    verify(server, confirmed, size, "after a clean restart").await;
    server.restart();
    verify(server, confirmed, size, "after kill -9").await;
}

/// A server whose data directory is on `fs`, keeping `reserve` free.
fn server_on(fs: &SmallFs, reserve: &str) -> TestServer {
    TestServer::start_in(Some(&fs.join("data")), &["--disk-reserve", reserve])
}

/// Small files (appended to the pack) on a disk with less free space than one step of
/// the zeros kept ahead of the pack: each write is confirmed and intact, or refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_never_corrupts_confirmed_small_files() {
    for (count, size) in [(200u64, 60 * 1024usize), (4000, 4096)] {
        let fs = SmallFs::new(32);
        let mut server = server_on(&fs, "0");
        let (alice, _) = server.connect("alice").await;
        // A first file makes the folder, journal and pack exist.
        upload(&alice, "first", b"first").await;
        fs.fill_leaving(2 << 20);
        let (confirmed, refused) = write_until_full(&alice, "f", count, size).await;
        eprintln!(
            "{count} x {size} B with 2 MiB free: {} confirmed, {refused} refused",
            confirmed.len()
        );
        assert!(!confirmed.is_empty(), "nothing fit in 2 MiB");
        assert!(refused > 0, "the disk never filled up");
        verify_through_restarts(&mut server, &confirmed, size).await;
    }
}

/// Empty files cost only journal records: with less free space than one step of the
/// journal's zeros, every confirmed create survives restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_keeps_every_confirmed_create() {
    let fs = SmallFs::new(32);
    let mut server = server_on(&fs, "0");
    let (alice, _) = server.connect("alice").await;
    upload(&alice, "first", b"first").await;
    fs.fill_leaving(512 << 10);
    let (confirmed, refused) = write_until_full(&alice, "e", 7000, 0).await;
    eprintln!(
        "7000 creates with 512 KiB free: {} confirmed, {refused} refused",
        confirmed.len()
    );
    assert!(confirmed.len() > 100, "too few creates fit in 512 KiB");
    verify_through_restarts(&mut server, &confirmed, 0).await;
}

/// With free space below the reserve, creates, renames and uploads are refused with
/// ENOSPC and change nothing; deletes still work (they make room); nothing confirmed
/// before is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_but_a_delete_respects_the_reserve() {
    let fs = SmallFs::new(32);
    let mut server = server_on(&fs, "16M");
    let (alice, _) = server.connect("alice").await;
    let mut confirmed = BTreeMap::new();
    for i in 0..20u64 {
        upload(&alice, &format!("k{i:05}"), &content(i + 1000, 1000)).await;
        confirmed.insert(format!("k{i:05}"), i + 1000);
    }
    fs.fill_leaving(8 << 20);
    let (more, refused) = write_until_full(&alice, "e", 50, 0).await;
    assert!(
        more.is_empty(),
        "{} empty creates cut into the reserve",
        more.len()
    );
    assert_eq!(refused, 50);
    let (more, _) = write_until_full(&alice, "s", 5, 1000).await;
    assert!(more.is_empty(), "small files cut into the reserve");
    let e = within("rename", alice.rename(&mv("k00000", "moved")))
        .await
        .expect_err("a rename cut into the reserve");
    assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}");
    within("delete", alice.remove("alice", ROOT_ID, "k00019", false))
        .await
        .unwrap();
    confirmed.remove("k00019");
    verify_through_restarts(&mut server, &confirmed, 1000).await;
}

/// Parallel uploads add up against the reserve: together they never leave less free
/// than the reserve, whether they declared their size or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_respect_the_reserve() {
    const SIZE: usize = 56 << 20;
    let fs = SmallFs::new(256);
    let server = server_on(&fs, "128M");
    let data = std::sync::Arc::new(content(5, SIZE));
    let mut tasks = Vec::new();
    for i in 0..4u64 {
        let opts = server.options("alice");
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let (client, _) = RemoteClient::connect(&opts).await?;
            let size = (i % 2 == 0).then_some(SIZE as u64);
            sharefs_client::transfer::upload(
                &client,
                &at(&format!("big{i}")),
                &data[..],
                size,
                |_| {},
            )
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match within("upload", t).await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}"),
        }
    }
    let free = fs.free();
    eprintln!(
        "4 parallel uploads of 56 MiB under a 128 MiB reserve: {ok} confirmed, {} MiB left free",
        free >> 20
    );
    assert!(ok >= 1, "no upload fit");
    assert!(
        free >= 128 << 20,
        "only {free} bytes left free under a 128 MiB reserve"
    );
}

/// At 0 bytes free, others still download (the owner is told at once), and the
/// notification is written out as soon as there is room again, surviving a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_go_on_when_the_disk_is_full() {
    use sharefs_protocol::Event;
    let fs = SmallFs::new(32);
    let mut server = server_on(&fs, "0");
    let (alice, mut alice_events) = server.connect("alice").await;
    let data = content(9, 100_000);
    upload(&alice, "shared.bin", &data).await;
    fs.fill_leaving(0);
    assert!(fs.free() < 4096, "the disk did not fill up");

    let (bob, _) = server.connect("bob").await;
    let got = download(&bob, "alice", "shared.bin").await.unwrap();
    assert_eq!(got, data, "download at a full disk");
    let shown = loop {
        match within("notification", alice_events.recv()).await {
            Some(Event::Notification { notification }) => break notification,
            Some(_) => continue,
            None => panic!("alice's connection closed"),
        }
    };
    assert_eq!(
        (shown.downloader.as_str(), shown.file.as_str()),
        ("bob", "shared.bin")
    );
    let (pending, _) = within("notifications", alice.notifications(0))
        .await
        .unwrap();
    assert_eq!(pending.iter().map(|n| n.id).collect::<Vec<_>>(), [shown.id]);

    // Room again: the next download writes out the waiting one too.
    fs.unfill();
    let (carol, _) = server.connect("carol").await;
    download(&carol, "alice", "shared.bin").await.unwrap();
    server.terminate();
    server.restart();
    let (alice, _) = server.connect("alice").await;
    let (pending, _) = within("notifications", alice.notifications(0))
        .await
        .unwrap();
    let who: Vec<&str> = pending.iter().map(|n| n.downloader.as_str()).collect();
    assert_eq!(who, ["bob", "carol"], "notifications after a restart");
}

/// The notification history is made durable with each record (a power cut must not lose
/// it): watched with strace, a download's record is followed by an fsync or fdatasync of
/// history.jsonl before the download's data arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notification_history_is_synced_with_each_record() {
    let server = TestServer::start();
    let (alice, _) = server.connect("alice").await;
    upload(&alice, "shared.txt", b"hello").await;
    let (bob, _) = server.connect("bob").await;
    let trace = tempfile::NamedTempFile::new().unwrap();
    let mut strace = std::process::Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(trace.path())
        .arg("-p")
        .arg(server.pid().unwrap().to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("strace (the test needs it installed)");
    // strace is attached once it has traced something: a listing costs no sync, an
    // upload of alice's does.
    let attached = std::time::Instant::now();
    loop {
        upload(&alice, "probe.txt", b"probe").await;
        if std::fs::read_to_string(trace.path()).is_ok_and(|t| t.contains("fdatasync")) {
            break;
        }
        assert!(attached.elapsed() < TIMEOUT, "strace never attached");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    download(&bob, "alice", "shared.txt").await.unwrap();
    let synced = |t: &str| {
        t.lines().any(|l| {
            (l.contains("fdatasync(") || l.contains("fsync(")) && l.contains("history.jsonl")
        })
    };
    let seen = std::time::Instant::now();
    while !std::fs::read_to_string(trace.path()).is_ok_and(|t| synced(&t)) {
        if seen.elapsed() > std::time::Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = strace.kill();
    let _ = strace.wait();
    let text = std::fs::read_to_string(trace.path()).unwrap();
    assert!(
        synced(&text),
        "history.jsonl was never synced; syncs seen:\n{text}"
    );
}
