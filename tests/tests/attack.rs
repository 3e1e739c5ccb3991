//! Every known attack at once, from three addresses, while normal users keep working.
//!
//! `SHAREFS_ATTACK_SECS` sets how long the attack runs (default 45 s; the security review
//! runs it for 600). The server's peak RSS, descriptors and threads are printed and bounded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sharefs_client::RemoteClient;
use sharefs_protocol::{ClientMessage, Reply, Request};
use sharefs_tests::raw::{connect_from, RawClient};
use sharefs_tests::*;
use tokio::io::AsyncWriteExt;

const ATTACKER: &str = "mallory";

fn attack_secs() -> u64 {
    std::env::var("SHAREFS_ATTACK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45)
}

/// Runs `attack` over and over from `src` until `stop`, counting the rounds.
fn repeat<F, Fut>(
    src: [u8; 4],
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    attack: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn([u8; 4]) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            // Each round is bounded: a round the server stalls does not stall the attack.
            let _ = tokio::time::timeout(Duration::from_secs(30), attack(src)).await;
            rounds.fetch_add(1, Ordering::Relaxed);
        }
    })
}

async fn attacker(src: [u8; 4], addr: &str) -> Option<RawClient> {
    let stream = connect_from(src, addr).await.ok()?;
    RawClient::login_on(stream, ATTACKER, PASSWORD).await.ok()
}

/// Wrong passwords for alice, and huge user names.
async fn guess_passwords(src: [u8; 4], addr: String) {
    for i in 0..20 {
        let Ok(stream) = connect_from(src, &addr).await else {
            return;
        };
        let user = if i % 4 == 0 {
            "x".repeat(1 << 20)
        } else {
            "alice".to_string()
        };
        let _ = RawClient::login_on(stream, &user, "wrong").await;
    }
}

/// Garbage, and connections that send a byte now and then.
async fn garbage(src: [u8; 4], addr: String) {
    let mut held = Vec::new();
    for i in 0..10u64 {
        if let Ok(mut s) = connect_from(src, &addr).await {
            let _ = s.write_all(&content(i, 3000)).await;
            held.push(s);
        }
    }
    for _ in 0..10 {
        for s in &mut held {
            let _ = s.write_all(&[0x16]).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Opens the big file and asks for it hundreds of times over, never reading.
async fn stall_reads(src: [u8; 4], addr: String) {
    let Some(mut raw) = attacker(src, &addr).await else {
        return;
    };
    let open = Request::Open {
        owner: "alice".into(),
        id: raw.id_of("alice", "big").await,
        head: 0,
    };
    let Ok((Reply::Opened { handle, .. }, _)) = raw.call(open, Bytes::new()).await else {
        return;
    };
    for i in 0..300u64 {
        let op = Request::Read {
            handle,
            offset: (i % 2) << 20,
            len: 1 << 20,
        };
        raw.feed(op, Bytes::new()).await;
    }
    raw.flush_for(Duration::from_secs(25)).await;
}

/// Long listings, never read.
async fn stall_listings(src: [u8; 4], addr: String) {
    let Some(mut raw) = attacker(src, &addr).await else {
        return;
    };
    for _ in 0..300 {
        let op = Request::List {
            dir: ROOT_ID,
            owner: ATTACKER.into(),
            after: None,
            limit: None,
        };
        raw.feed(op, Bytes::new()).await;
    }
    raw.flush_for(Duration::from_secs(25)).await;
}

/// Thousands of opens on one connection, kept open a while.
async fn open_flood(src: [u8; 4], addr: String) {
    let Some(mut raw) = attacker(src, &addr).await else {
        return;
    };
    let big = raw.id_of("alice", "big").await;
    for _ in 0..5000 {
        let op = Request::Open {
            owner: "alice".into(),
            id: big,
            head: 0,
        };
        raw.feed(op, Bytes::new()).await;
    }
    raw.flush_for(Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if tokio::time::timeout(Duration::from_secs(1), raw.recv())
            .await
            .is_err()
        {
            continue;
        }
    }
}

/// Downloads of many distinct files: notifications for alice.
async fn notify_flood(src: [u8; 4], addr: String) {
    let Some(mut raw) = attacker(src, &addr).await else {
        return;
    };
    for i in 0..200 {
        let op = Request::Open {
            owner: "alice".into(),
            id: raw.id_of("alice", &format!("n{i}")).await,
            head: 16,
        };
        let _ = raw.call(op, Bytes::new()).await;
    }
}

/// Names with terminal escapes, and uploads far past the quota, in parallel.
async fn bad_writes(src: [u8; 4], addr: String) {
    let Some(mut raw) = attacker(src, &addr).await else {
        return;
    };
    let data = Bytes::from(content(7, 1000));
    let hash = blake3::hash(&data).to_hex().to_string();
    for name in ["\u{1b}]0;owned\u{7}", "a\u{1b}[2Kb", "tab\there"] {
        let op = Request::Put {
            parent: ROOT_ID,
            replace: None,
            mode: None,
            mtime_ns: None,
            owner: ATTACKER.into(),
            name: name.into(),
            blake3: hash.clone(),
        };
        let _ = raw.call(op, data.clone()).await;
    }
    let mut uploads = Vec::new();
    for i in 0..16 {
        let op = Request::UploadBegin {
            parent: ROOT_ID,
            replace: None,
            mode: None,
            owner: ATTACKER.into(),
            name: format!("up{i}"),
            size: Some(1 << 20),
        };
        if let Ok((Reply::UploadStarted { upload, .. }, _)) = raw.call(op, Bytes::new()).await {
            uploads.push(upload);
        }
    }
    let chunk = Bytes::from(content(8, 1 << 20));
    let hash = blake3::hash(&chunk).to_hex().to_string();
    for &upload in &uploads {
        let msg = ClientMessage::Chunk { upload, offset: 0 };
        let frame = sharefs_protocol::Frame::new(&msg, chunk.clone()).unwrap();
        let _ = futures::SinkExt::feed(&mut raw.framed, frame).await;
    }
    for &upload in &uploads {
        let op = Request::UploadCommit {
            mtime_ns: None,
            upload,
            size: 1 << 20,
            blake3: hash.clone(),
        };
        raw.feed(op, Bytes::new()).await;
    }
    raw.flush_for(Duration::from_secs(10)).await;
    for _ in 0..uploads.len() {
        if raw.recv().await.is_none() {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_attack_from_three_addresses_leaves_the_server_serving() {
    let server = TestServer::start_with(&["--plaintext", "--reply-timeout", "10"]);
    server.add_user(ATTACKER, PASSWORD);
    server.user(&["quota", ATTACKER, "1M"], None);
    let (alice, _) = server.connect("alice").await;
    let big = content(1, 2 << 20);
    upload(&alice, "big", &big).await;
    for i in 0..200 {
        upload(&alice, &format!("n{i}"), format!("file {i}").as_bytes()).await;
    }
    // Mallory's folder of long names, for long listings.
    let mut raw = RawClient::login(&server.addr, ATTACKER).await;
    let empty = blake3::hash(b"").to_hex().to_string();
    let puts = (0..1500)
        .map(|i| {
            let op = Request::Put {
                parent: ROOT_ID,
                replace: None,
                mode: None,
                mtime_ns: None,
                owner: ATTACKER.into(),
                name: format!("{}{i:04}", "\\".repeat(200)),
                blake3: empty.clone(),
            };
            (op, Bytes::new())
        })
        .collect();
    for answer in raw.pipeline(puts).await {
        answer.unwrap();
    }
    drop(raw);
    let baseline_rss = server.rss_kib().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let mut attacks = Vec::new();
    for last in 2..=4u8 {
        let src = [127, 0, 0, last];
        let addr = server.addr.clone();
        macro_rules! attack {
            ($f:ident) => {{
                let addr = addr.clone();
                attacks.push(repeat(src, stop.clone(), rounds.clone(), move |src| {
                    $f(src, addr.clone())
                }));
            }};
        }
        attack!(guess_passwords);
        attack!(garbage);
        attack!(stall_reads);
        attack!(stall_listings);
        attack!(open_flood);
        attack!(notify_flood);
        attack!(bad_writes);
    }

    // Normal users from 127.0.0.1: alice logs in afresh every round (no lockout), bob
    // lists, uploads and downloads.
    let (bob, _) = server.connect("bob").await;
    let started = Instant::now();
    let (mut peak_rss, mut peak_fds, mut peak_threads) = (0, 0, 0);
    let (mut round, mut slowest) = (0u64, Duration::ZERO);
    while started.elapsed() < Duration::from_secs(attack_secs()) {
        let t = Instant::now();
        let (alice, _) = within(
            "alice logs in",
            RemoteClient::connect(&server.options("alice")),
        )
        .await
        .unwrap_or_else(|e| panic!("alice cannot log in during the attack: {e}"));
        upload(&alice, "mine", format!("round {round}").as_bytes()).await;
        drop(alice);
        assert!(!bob.list("alice", ROOT_ID).await.unwrap().is_empty());
        upload(&bob, "note", format!("round {round}").as_bytes()).await;
        assert_eq!(download(&bob, "alice", "big").await.unwrap(), big);
        slowest = slowest.max(t.elapsed());
        round += 1;
        peak_rss = peak_rss.max(server.rss_kib().unwrap_or(0));
        peak_fds = peak_fds.max(server.open_fds().unwrap_or(0));
        peak_threads = peak_threads.max(server.threads().unwrap_or(0));
    }
    stop.store(true, Ordering::Relaxed);
    for a in attacks {
        a.abort();
    }
    eprintln!(
        "{} s of attack ({} attack rounds): {round} normal rounds, slowest {slowest:?}; \
         server RSS {baseline_rss} KiB before, peak {peak_rss} KiB; peak {peak_fds} descriptors, \
         {peak_threads} threads; log {} bytes",
        attack_secs(),
        rounds.load(Ordering::Relaxed),
        server.log_text().len()
    );
    assert!(
        slowest < Duration::from_secs(15),
        "a normal round took {slowest:?}"
    );
    assert!(peak_rss < 320 * 1024, "server RSS reached {peak_rss} KiB");
    assert!(peak_threads < 100, "{peak_threads} server threads");
    // Mallory's escapes never made it into a name, and her uploads stayed within her quota.
    let names = bob.list(ATTACKER, ROOT_ID).await.unwrap();
    assert!(names.iter().all(|f| !f.name.chars().any(char::is_control)));
    let ups: u64 = names
        .iter()
        .filter(|f| f.name.starts_with("up"))
        .map(|f| f.size)
        .sum();
    assert!(ups <= 1 << 20, "{ups} bytes committed under a 1 MiB quota");
}
