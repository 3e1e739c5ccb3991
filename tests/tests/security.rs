//! Security: server identity (pinning, CA), plaintext/TLS mismatches, login throttling,
//! floods and slow clients, quotas and the disk reserve.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sharefs_client::tls::TrustOptions;
use sharefs_client::{ClientError, RemoteClient};
use sharefs_protocol::ErrorCode;
use sharefs_tests::mount::{fuse_available, TestMount};
use sharefs_tests::raw::connect_from;
use sharefs_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn connect_err(opts: &sharefs_client::ConnectOptions) -> ClientError {
    match within("connect", RemoteClient::connect(opts)).await {
        Ok(_) => panic!("connection to {} unexpectedly succeeded", opts.server),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_refuses_another_server() {
    let a = TestServer::start();
    let b = TestServer::start();
    assert_ne!(a.fingerprint, b.fingerprint);
    // B impersonates A: the client expects A's certificate.
    let mut opts = b.options("alice");
    opts.tls = a.trust();
    let e = connect_err(&opts).await;
    assert!(matches!(e, ClientError::Tls(_)), "{e:?}");
    assert!(e.to_string().contains("--server-fingerprint"), "{e}");

    // Trust on first use: the first connection pins, the same server is accepted again.
    let dir = tempfile::tempdir().unwrap();
    let known = dir.path().join("known_servers");
    let mut opts = b.options("alice");
    opts.tls = Some(TrustOptions {
        known_servers: Some(known.clone()),
        ..Default::default()
    });
    within("first use", RemoteClient::connect(&opts))
        .await
        .unwrap();
    let pinned = std::fs::read_to_string(&known).unwrap();
    assert!(
        pinned.contains(b.fingerprint.as_deref().unwrap()),
        "{pinned}"
    );
    within("second use", RemoteClient::connect(&opts))
        .await
        .unwrap();

    // The address now presents another certificate (A's pin stands for what the client saw
    // before): a hard error that says what to do.
    let swapped = pinned.replace(
        b.fingerprint.as_deref().unwrap(),
        a.fingerprint.as_deref().unwrap(),
    );
    std::fs::write(&known, swapped).unwrap();
    let e = connect_err(&opts).await;
    let text = e.to_string();
    assert!(text.contains("SERVER IDENTITY CHANGED"), "{text}");
    assert!(text.contains(&known.display().to_string()), "{text}");
    // Nothing was re-pinned.
    assert!(!std::fs::read_to_string(&known)
        .unwrap()
        .contains(b.fingerprint.as_deref().unwrap()));

    // The CLI says the same in one line and fails.
    let mut ls = b.cli("alice");
    ls.env_remove("SHAREFS_SERVER_FINGERPRINT")
        .env("SHAREFS_KNOWN_SERVERS", &known)
        .arg("ls");
    let out = ls.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SERVER IDENTITY CHANGED") && err.lines().count() == 1,
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_tls_mismatches_are_clear_errors() {
    let tls_server = TestServer::start();
    let mut opts = tls_server.options("alice");
    opts.tls = None;
    let e = connect_err(&opts).await;
    assert!(e.to_string().contains("requires TLS"), "{e}");

    let plain = TestServer::start_with(&["--plaintext"]);
    let mut opts = plain.options("alice");
    opts.tls = Some(TrustOptions {
        fingerprint: tls_server.fingerprint.clone(),
        ..Default::default()
    });
    let e = connect_err(&opts).await;
    assert!(e.to_string().contains("--plaintext"), "{e}");
    // The plaintext server works for plaintext clients, and logs that TLS is off.
    let (c, _) = plain.connect("alice").await;
    c.list_users().await.unwrap();
    assert!(plain.log_text().contains("TLS off"));
}

/// A CA and certificates it issued, as PEM files in `dir`.
struct Pki {
    ca: std::path::PathBuf,
}

fn issue(
    dir: &Path,
    name: &str,
    host: &str,
    expired: bool,
    ca: &(rcgen::Certificate, rcgen::KeyPair),
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_signed_certificates_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let pki = Pki {
        ca: dir.path().join("ca.crt"),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
    let ca = (ca_cert, ca_key);

    let cases = [
        ("good", "localhost", false, true),
        ("wronghost", "example.com", false, false),
        ("expired", "localhost", true, false),
    ];
    for (name, host, expired, ok) in cases {
        let (cert, key) = issue(dir.path(), name, host, expired, &ca);
        let server = TestServer::start_with(&["--tls-cert", &cert, "--tls-key", &key]);
        let port = server.addr.rsplit(':').next().unwrap();
        let mut opts = server.options("alice");
        opts.server = format!("localhost:{port}");
        opts.tls = Some(TrustOptions {
            ca: Some(pki.ca.clone()),
            known_servers: Some(dir.path().join("known")),
            ..Default::default()
        });
        let result = within("connect", RemoteClient::connect(&opts)).await;
        match (ok, result) {
            (true, Ok((c, _))) => {
                c.list_users().await.unwrap();
            }
            (false, Err(ClientError::Tls(why))) => {
                assert!(why.contains("refused"), "{name}: {why}");
            }
            (ok, Ok(_)) => assert!(ok, "{name}: accepted"),
            (_, Err(e)) => panic!("{name}: {e:?}"),
        }
    }
    assert!(
        !dir.path().join("known").exists(),
        "CA-verified servers must not be pinned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_is_throttled_and_the_right_password_works_afterwards() {
    let server = TestServer::start_with(&["--login-lockout", "3", "--login-delay-ms", "10"]);
    let mut wrong = server.options("alice");
    wrong.password = "guess".into();
    let (mut failed, mut throttled) = (0, 0);
    for _ in 0..50 {
        match connect_err(&wrong).await.code() {
            Some(ErrorCode::AuthFailed) => failed += 1,
            Some(ErrorCode::Throttled) => throttled += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(failed, 10, "attempts before the lockout");
    assert_eq!(throttled, 40);
    // Locked out: even the right password is refused for now.
    let e = connect_err(&server.options("alice")).await;
    assert_eq!(e.code(), Some(ErrorCode::Throttled));
    assert!(e.to_string().contains("try again"), "{e}");
    // Other users are not locked out from another address.
    // After the window, the right password works (bounded wait).
    let started = Instant::now();
    loop {
        match RemoteClient::connect(&server.options("alice")).await {
            Ok(_) => break,
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::Throttled), "{e}"),
        }
        assert!(started.elapsed() < TIMEOUT, "still locked out");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(server.log_text().contains("login failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_registration_creates_accounts_only_when_enabled() {
    let closed = TestServer::start();
    let mut opts = closed.options("dave");
    opts.password = "dave's".into();
    assert_eq!(connect_err(&opts).await.code(), Some(ErrorCode::AuthFailed));

    let open = TestServer::start_with(&["--open-registration"]);
    let mut opts = open.options("dave");
    opts.password = "dave's".into();
    let (dave, _) = within("register", RemoteClient::connect(&opts))
        .await
        .unwrap();
    assert!(dave
        .list_users()
        .await
        .unwrap()
        .contains(&"dave".to_string()));
    drop(dave);
    // The account now has that password.
    opts.password = "other".into();
    assert_eq!(connect_err(&opts).await.code(), Some(ErrorCode::AuthFailed));
    let mut bad = open.options("Not Valid");
    bad.password = "x".into();
    assert!(connect_err(&bad).await.code().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_slow_loris_and_floods_do_not_stop_real_clients() {
    let server = TestServer::start_with(&["--max-connections", "150", "--handshake-timeout", "5"]);
    let (alice, _) = server.connect("alice").await;
    let data = content(9, 2 << 20);
    upload(&alice, "f", &data).await;
    let (bob, _) = server.connect("bob").await;

    let addr = server.addr.clone();
    let attack = tokio::spawn(async move {
        let mut tasks = Vec::new();
        // 500 garbage connections.
        for i in 0..500u32 {
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                let src = [127, 0, 1, (i % 200) as u8 + 1];
                if let Ok(mut s) = connect_from(src, &addr).await {
                    let _ = s.write_all(&content(i as u64, 1000 + i as usize)).await;
                    let _ = tokio::time::timeout(Duration::from_secs(5), s.readable()).await;
                }
            }));
        }
        // 200 slow-loris connections: a byte every 300 ms for 6 s, never a whole handshake.
        for i in 0..200u32 {
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                let src = [127, 0, 2, (i % 200) as u8 + 1];
                if let Ok(mut s) = connect_from(src, &addr).await {
                    for _ in 0..20 {
                        if s.write_all(&[0x16]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            }));
        }
        // A flood beyond the connection limit: each connection is held until the server
        // has been seen refusing one for the limit (it writes a Busy frame; a connection it
        // admitted only ever sees EOF), or for 10 s. The test machine's load then decides
        // nothing: the limit is reached by connections that stay open, not by a race
        // against the handshake timeout. The limit is low enough (150) that a loaded
        // machine, accepting the flood slower than the handshake timeout ends it, still
        // holds more than that open at once.
        let (refused_tx, refused) = tokio::sync::watch::channel(false);
        let refused_tx = Arc::new(refused_tx);
        for i in 0..400u32 {
            let addr = addr.clone();
            let (refused_tx, mut refused) = (refused_tx.clone(), refused.clone());
            tasks.push(tokio::spawn(async move {
                let src = [127, 0, 3, (i % 200) as u8 + 1];
                let Ok(mut s) = connect_from(src, &addr).await else {
                    return;
                };
                let hold = async {
                    let mut buf = [0u8; 64];
                    if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        refused_tx.send_replace(true);
                    }
                    // Admitted, or refused: stay until the limit has been seen.
                    let _ = refused.wait_for(|seen| *seen).await;
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), hold).await;
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });

    // Meanwhile the logged-in client keeps working, repeatedly.
    let mut peak_rss = 0;
    while !attack.is_finished() {
        let got = download(&bob, "alice", "f").await.unwrap();
        assert_eq!(sha256(&got), sha256(&data));
        peak_rss = peak_rss.max(server.rss_kib().unwrap_or(0));
    }
    within("attack finished", attack).await.unwrap();
    // And new clients get in once the junk has timed out.
    let started = Instant::now();
    let (carol, _) = loop {
        match RemoteClient::connect(&server.options("carol")).await {
            Ok(c) => break c,
            Err(e) => assert!(
                started.elapsed() < TIMEOUT,
                "cannot connect after the attack: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        download(&carol, "alice", "f").await.unwrap().len(),
        data.len()
    );
    assert!(peak_rss < 200 * 1024, "server RSS reached {peak_rss} KiB");
    assert!(
        server.log_text().contains("connection limit reached"),
        "flood never hit the limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_through_the_cli_keeps_the_old_version() {
    let server = TestServer::start();
    let mut q = server.user_command(&["quota", "alice", "1M"]);
    assert!(q.status().unwrap().success());
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("doc");
    std::fs::write(&small, b"small").unwrap();
    let mut put = server.cli("alice");
    put.arg("put").arg(&small);
    assert!(put.output().unwrap().status.success());
    std::fs::write(&small, content(1, 2 << 20)).unwrap();
    let mut put = server.cli("alice");
    put.arg("put").arg(&small);
    let out = put.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("quota") && err.lines().count() == 1, "{err}");
    let (c, _) = server.connect("bob").await;
    assert_eq!(download(&c, "alice", "doc").await.unwrap(), b"small");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_reserve_is_never_crossed() {
    if sharefs_tests::backend::cluster_selected() {
        // Contents go to the object store: no server disk to keep a reserve on.
        eprintln!("not run on the cluster backend: its contents are on no disk of the server");
        return;
    }
    // A reserve larger than any disk: every upload would cross it.
    let server = TestServer::start_with(&["--disk-reserve", "1000000T"]);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, b"data").unwrap();
    let mut put = server.cli("alice");
    put.arg("put").arg(&f);
    let out = put.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no space"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !fuse_available() {
        return;
    }
    let mount = TestMount::new(&server, "alice");
    // A create is made on the server at once, so it is refused there; had it been
    // accepted, fsync would report what close would (std::fs::write ignores close errors).
    match std::fs::File::create(mount.path("alice/f")) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}"),
        Ok(mut f) => {
            // Refused by the write (no room on the server), or at the latest by fsync.
            let r = std::io::Write::write_all(&mut f, b"data").and_then(|()| f.sync_all());
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        }
    }
    let (c, _) = server.connect("alice").await;
    assert!(c.list("alice", ROOT_ID).await.unwrap().is_empty());
}
