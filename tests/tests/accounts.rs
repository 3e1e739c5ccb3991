//! Hostile users: what one logged-in user can make the server hold (quota and disk by
//! parallel or stalled uploads, pending notifications) stays bounded, an account removed
//! or re-passworded while connected loses its sessions, and a normal user is served all
//! along.

use std::time::{Duration, Instant};

use bytes::Bytes;
use sharefs_client::RemoteClient;
use sharefs_protocol::ErrorCode;
use sharefs_tests::*;

const MIB: usize = 1 << 20;

/// A server with `mallory` added (and given `quota`, if any) besides alice, bob and carol.
fn with_mallory(server: &TestServer, quota: Option<&str>) {
    server.add_user("mallory", PASSWORD);
    if let Some(q) = quota {
        server.user(&["quota", "mallory", q], None);
    }
}

/// Bob, a normal user, uploads and reads back a file while the attack goes on.
async fn bob_is_served(server: &TestServer, seed: u64) {
    let (bob, _) = server.connect("bob").await;
    let data = content(seed, 300 * 1024);
    let name = format!("normal-{seed}");
    upload(&bob, &name, &data).await;
    let (carol, _) = server.connect("carol").await;
    assert_eq!(download(&carol, "bob", &name).await.unwrap(), data);
}

/// Sends `data` as the whole of `upload` and commits it.
async fn send_and_commit(
    client: &RemoteClient,
    upload: u64,
    data: &[u8],
) -> Result<sharefs_protocol::FileInfo, sharefs_client::ClientError> {
    for (i, chunk) in data.chunks(MIB).enumerate() {
        client
            .send_chunk(upload, (i * MIB) as u64, Bytes::copy_from_slice(chunk))
            .await?;
    }
    let hash = blake3::hash(data).to_hex().to_string();
    within(
        "commit",
        client.upload_commit(upload, data.len() as u64, &hash, None),
    )
    .await
}

/// Begins `n` uploads of `size` bytes each (`f0`, `f1`, ...) at once.
async fn begin_parallel(
    client: &RemoteClient,
    n: usize,
    size: usize,
) -> Vec<Result<u64, sharefs_client::ClientError>> {
    let begins = (0..n).map(|i| async move {
        client
            .upload_begin(&at(&format!("f{i}")), Some(size as u64))
            .await
    });
    within("parallel begins", futures::future::join_all(begins)).await
}

/// Sixteen uploads begun at once, each declaring the whole quota: one is let in, the
/// others are refused at once (not after their bytes reached the server's disk); uploads
/// of undeclared size are refused at their chunks and commit. The quota is never crossed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_uploads_add_up_against_the_quota() {
    let server = TestServer::start();
    with_mallory(&server, Some("1M"));
    let (mallory, _) = server.connect("mallory").await;

    let begun = begin_parallel(&mallory, 16, MIB).await;
    let mut started = Vec::new();
    for result in begun {
        match result {
            Ok(upload) => started.push(upload),
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::QuotaExceeded), "{e}"),
        }
    }
    assert_eq!(
        started.len(),
        1,
        "uploads of 1 MiB each began under a 1 MiB quota"
    );
    bob_is_served(&server, 1).await;
    let data = content(2, MIB);
    send_and_commit(&mallory, started[0], &data).await.unwrap();

    // Full: a small put and an upload of undeclared size are refused too.
    let e = within(
        "put",
        mallory.put_small(&at("small"), Bytes::from_static(b"x")),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::QuotaExceeded), "{e}");
    let undeclared = within("begin", mallory.upload_begin(&at("g"), None))
        .await
        .unwrap();
    let e = send_and_commit(&mallory, undeclared, b"more")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::QuotaExceeded), "{e}");

    // Replacing the file is allowed (its old bytes are freed); parallel undeclared
    // replacements commit one at a time, each within the quota.
    let replacements = (0..4u64).map(|i| {
        let mallory = &mallory;
        async move {
            let upload = mallory.upload_begin(&at("f0"), None).await?;
            send_and_commit(mallory, upload, &content(10 + i, MIB)).await
        }
    });
    let done = within("replacements", futures::future::join_all(replacements)).await;
    assert!(done.iter().any(Result::is_ok), "{done:?}");
    let space = within("statfs", mallory.statfs()).await.unwrap();
    assert_eq!(space.used, MIB as u64);
    let files = mallory.list("mallory", ROOT_ID).await.unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    bob_is_served(&server, 3).await;
}

/// Sixteen parallel uploads of declared size on a small disk: those that would cut into
/// the reserve are refused with `no_space` at their begin, the reserve stays free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_uploads_add_up_against_the_disk_reserve() {
    const SIZE: usize = 4 * MIB;
    let fs = SmallFs::new(64);
    let server = TestServer::start_in(Some(&fs.join("data")), &["--disk-reserve", "40M"]);
    with_mallory(&server, None);
    let (mallory, _) = server.connect("mallory").await;
    let begun = begin_parallel(&mallory, 16, SIZE).await;
    let mut started = Vec::new();
    for result in begun {
        match result {
            Ok(upload) => started.push(upload),
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}"),
        }
    }
    assert!(
        !started.is_empty() && started.len() < 16,
        "{} began",
        started.len()
    );
    let data = content(4, SIZE);
    for upload in started {
        send_and_commit(&mallory, upload, &data).await.unwrap();
    }
    assert!(fs.free() >= 40 << 20, "only {} bytes left free", fs.free());
}

/// An upload that receives nothing is let go after `--upload-idle-timeout`, giving back
/// its disk claim and its quota reservation; its commit on that connection then fails.
/// Meanwhile a normal user is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_gives_back_its_disk_and_quota() {
    let fs = SmallFs::new(64);
    let server = TestServer::start_in(
        Some(&fs.join("data")),
        &["--disk-reserve", "16M", "--upload-idle-timeout", "1"],
    );
    with_mallory(&server, Some("1M"));
    let (mallory, _) = server.connect("mallory").await;
    let (alice, _) = server.connect("alice").await;

    // Mallory holds her whole quota and (almost) all the disk above the reserve.
    let quota_hog = within("begin", mallory.upload_begin(&at("q"), Some(MIB as u64)))
        .await
        .unwrap();
    let space = within("statfs", alice.statfs()).await.unwrap();
    let disk_hog = within(
        "begin",
        alice.upload_begin(&at("d"), Some(space.available - 4 * MIB as u64)),
    )
    .await
    .unwrap();
    let held = Instant::now();
    let e = within("begin", mallory.upload_begin(&at("q2"), Some(MIB as u64)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::QuotaExceeded), "{e}");
    let (bob, _) = server.connect("bob").await;
    let e = within("begin", bob.upload_begin(&at("b"), Some(8 * MIB as u64)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}");
    let small = content(5, 100 * 1024);
    upload(&bob, "small", &small).await;

    // Both are given back once the stalled uploads are dropped.
    let (mut quota, mut disk) = (None, None);
    let dropped = tokio::time::timeout(Duration::from_secs(15), async {
        while quota.is_none() || disk.is_none() {
            if quota.is_none() {
                quota = mallory.upload_begin(&at("q2"), Some(MIB as u64)).await.ok();
            }
            if disk.is_none() {
                disk = bob.upload_begin(&at("b"), Some(8 * MIB as u64)).await.ok();
            }
            // Nothing to await: the server drops them silently.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        dropped.is_ok(),
        "the stalled uploads still hold their quota and disk"
    );
    assert!(
        held.elapsed() >= Duration::from_secs(1),
        "dropped before the bound"
    );
    assert!(
        held.elapsed() < Duration::from_secs(10),
        "{:?}",
        held.elapsed()
    );
    let (quota, disk) = (quota.unwrap(), disk.unwrap());
    send_and_commit(&mallory, quota, &content(6, MIB))
        .await
        .unwrap();
    send_and_commit(&bob, disk, &content(7, 8 * MIB))
        .await
        .unwrap();
    for (client, upload) in [(&mallory, quota_hog), (&alice, disk_hog)] {
        let e = within("commit", client.upload_commit(upload, 0, "x", None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
        assert!(e.to_string().contains("without data"), "{e}");
    }
    assert!(server
        .log_text()
        .contains("upload received no data for too long"));
    assert_eq!(download(&alice, "bob", "small").await.unwrap(), small);
}

/// Waits (bounded) until `client`'s connection is gone; returns how long that took.
async fn ended_within(client: &RemoteClient, limit: Duration) -> Duration {
    let start = Instant::now();
    tokio::time::timeout(limit, client.closed())
        .await
        .unwrap_or_else(|_| panic!("the session was still open after {limit:?}"));
    start.elapsed()
}

/// Mallory and alice are both connected; mallory reads alice's file.
async fn mallory_and_alice(server: &TestServer) -> (RemoteClient, RemoteClient) {
    with_mallory(server, None);
    let (alice, _) = server.connect("alice").await;
    upload(&alice, "notes", b"alice's notes").await;
    let (mallory, _) = server.connect("mallory").await;
    assert_eq!(
        download(&mallory, "alice", "notes").await.unwrap(),
        b"alice's notes"
    );
    (mallory, alice)
}

/// `sharefs-server user remove` beside a running server ends the removed user's sessions
/// within a second, idle or not; other users go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_user_ends_her_sessions() {
    let server = TestServer::start();
    let (mallory, alice) = mallory_and_alice(&server).await;
    let (idle, _) = server.connect("mallory").await;
    server.user(&["remove", "mallory"], None);
    let took = ended_within(&mallory, Duration::from_secs(2)).await;
    eprintln!("session ended {took:?} after the removal");
    ended_within(&idle, Duration::from_secs(2)).await;
    let e = within("list", mallory.list("alice", ROOT_ID))
        .await
        .unwrap_err();
    assert_eq!(e.code(), None, "{e}");
    assert!(
        within("put", mallory.put_small(&at("x"), Bytes::from_static(b"x")))
            .await
            .is_err()
    );
    let opts = server.options("mallory");
    let e = match within("reconnect", RemoteClient::connect(&opts)).await {
        Ok(_) => panic!("a removed user logged in"),
        Err(e) => e,
    };
    assert_eq!(e.code(), Some(ErrorCode::AuthFailed), "{e}");

    // Alice's connection was not touched.
    upload(&alice, "later", b"still here").await;
    assert_eq!(
        download(&alice, "alice", "notes").await.unwrap(),
        b"alice's notes"
    );
    let log = server.log_text();
    assert!(log.contains("your account was removed"), "{log}");
}

/// `sharefs-server user passwd` ends the user's sessions the same way; the new password
/// logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_password_ends_the_old_sessions() {
    let server = TestServer::start();
    let (mallory, alice) = mallory_and_alice(&server).await;
    server.user(
        &["passwd", "mallory", "--password-stdin"],
        Some("another password\n"),
    );
    ended_within(&mallory, Duration::from_secs(2)).await;
    assert!(within("list", mallory.list("alice", ROOT_ID))
        .await
        .is_err());
    let mut opts = server.options("mallory");
    opts.password = "another password".into();
    let (again, _) = within("login", RemoteClient::connect(&opts)).await.unwrap();
    assert_eq!(
        download(&again, "alice", "notes").await.unwrap(),
        b"alice's notes"
    );
    bob_is_served(&server, 8).await;
    upload(&alice, "later", b"still here").await;
    assert!(server.log_text().contains("your password was changed"));
}

/// A quota set or lifted beside a running server applies to the next upload of a
/// connected user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_change_applies_to_the_next_upload() {
    let server = TestServer::start();
    with_mallory(&server, None);
    let (mallory, _) = server.connect("mallory").await;
    upload(&mallory, "a", &content(1, 2 * MIB)).await;
    server.user(&["quota", "mallory", "3M"], None);
    let e = within(
        "begin",
        mallory.upload_begin(&at("b"), Some(2 * MIB as u64)),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::QuotaExceeded), "{e}");
    upload(&mallory, "b", &content(2, MIB)).await;
    server.user(&["quota", "mallory", "none"], None);
    upload(&mallory, "c", &content(3, 2 * MIB)).await;
    assert!(!mallory.is_closed(), "a quota change ended the session");
}

/// Mallory opens 2,000 distinct files of alice's while alice is away: alice's pending
/// notifications stay bounded (the default 256, plus one digest that says how many older
/// ones it stands for), on disk as at her next login; bob is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_flood_leaves_a_bounded_digest() {
    use futures::StreamExt;
    const FILES: usize = 2000;
    const CAP: usize = 256;
    let server = TestServer::start();
    with_mallory(&server, None);
    let names: Vec<String> = (0..FILES).map(|i| format!("f{i:04}")).collect();
    let ids: Vec<u64>;
    {
        let (alice, _) = server.connect("alice").await;
        let made: Vec<_> = within(
            "alice's files",
            futures::stream::iter(&names)
                .map(|name| {
                    let alice = &alice;
                    async move {
                        alice
                            .put_small(&at(name), Bytes::from(name.clone().into_bytes()))
                            .await
                    }
                })
                .buffer_unordered(16)
                .collect(),
        )
        .await;
        ids = made.into_iter().map(|r| r.unwrap().id).collect();
    }

    let (mallory, _) = server.connect("mallory").await;
    let flood = futures::stream::iter(&ids)
        .map(|id| mallory.open_with_head("alice", *id, 64))
        .buffer_unordered(16)
        .for_each(|r| async move {
            assert_eq!(r.unwrap().0, 0, "a whole small file needs no handle");
        });
    within("the flood, and bob meanwhile", async {
        tokio::join!(flood, bob_is_served(&server, 9))
    })
    .await;

    let pending_dir = server.data.join("notifications/alice/pending");
    let on_disk = std::fs::read_dir(&pending_dir).unwrap().count();
    assert!(on_disk <= CAP + 1, "{on_disk} pending records on disk");

    // Alice logs in: what is replayed is what is pending, digest first.
    let (alice, mut events) = server.connect("alice").await;
    let (pending, _) = within("notifications", alice.notifications(0))
        .await
        .unwrap();
    let mut replayed = 0;
    while let Ok(event) = events.try_recv() {
        if matches!(event, sharefs_protocol::Event::Notification { .. }) {
            replayed += 1;
        }
    }
    assert_eq!(replayed, pending.len());
    assert_digest_first(&pending, CAP, FILES, "mallory");
    let digest = &pending[0];
    assert_eq!(
        digest.file,
        format!("{} more files, not shown one by one", digest.folded)
    );
    // Each of the others is one of the latest files opened.
    assert!(pending[1..]
        .iter()
        .all(|n| n.downloader == "mallory" && n.count == 1));

    // Acknowledged like any other.
    within("ack", alice.ack(vec![digest.id])).await.unwrap();
    let (after, _) = within("notifications", alice.notifications(0))
        .await
        .unwrap();
    assert_eq!(after.len(), pending.len() - 1);
    assert!(after.iter().all(|n| n.folded == 0));
    assert!(server.log_text().contains("folded into a digest"));
}
