//! Hostile clients and careless settings: oversized logins, password guessing, small
//! frames, control characters in names, and who may read the data directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sharefs_protocol::{
    ClientMessage, ErrorCode, Frame, FrameCodec, Reply, Request, ServerMessage, DEFAULT_MAX_FRAME,
    MAGIC, MIN_FRAME, VERSION,
};
use sharefs_tests::raw::connect_from;
use sharefs_tests::*;
use tokio_util::codec::Framed;

/// A login by hand, from `src`, to a plaintext server: `Ok(())` for `login_ok`, or the
/// error code and message it was refused with.
async fn raw_login(
    addr: &str,
    src: [u8; 4],
    user: &str,
    password: &str,
) -> Result<(), (ErrorCode, String)> {
    let stream = connect_from(src, addr).await.unwrap();
    let mut framed = Framed::new(stream, FrameCodec::new(DEFAULT_MAX_FRAME));
    let hello = ClientMessage::Hello {
        magic: MAGIC.into(),
        version: VERSION,
        max_frame: DEFAULT_MAX_FRAME,
    };
    let login = ClientMessage::Login {
        user: user.into(),
        password: password.into(),
        client: None,
    };
    framed
        .send(Frame::new(&hello, Bytes::new()).unwrap())
        .await
        .unwrap();
    let reply = framed.next().await.unwrap().unwrap();
    assert!(matches!(
        reply.message().unwrap(),
        ServerMessage::Hello { .. }
    ));
    framed
        .send(Frame::new(&login, Bytes::new()).unwrap())
        .await
        .unwrap();
    let reply = framed.next().await.unwrap().unwrap();
    match reply.message().unwrap() {
        ServerMessage::LoginOk { .. } => Ok(()),
        ServerMessage::Error { error, .. } => Err((error.code, error.message)),
        other => panic!("unexpected answer to a login: {other:?}"),
    }
}

/// The code of a refused login; panics if it was accepted.
fn refused(result: Result<(), (ErrorCode, String)>) -> ErrorCode {
    match result {
        Ok(()) => panic!("login accepted"),
        Err((code, _)) => code,
    }
}

/// Keeps a logged-in client downloading a file while `attack` runs, and returns what the
/// attack returned and the server's peak memory meanwhile (KiB).
async fn serve_during<T: Send + 'static>(
    server: &TestServer,
    attack: impl std::future::Future<Output = T> + Send + 'static,
) -> (T, u64) {
    let (alice, _) = server.connect("alice").await;
    let data = content(5, 300 << 10);
    upload(&alice, "f", &data).await;
    let (bob, _) = server.connect("bob").await;
    let attack = tokio::spawn(attack);
    let mut peak = 0;
    let mut served = 0;
    while !attack.is_finished() {
        peak = peak.max(server.rss_kib().unwrap_or(0));
        let got = download(&bob, "alice", "f").await.unwrap();
        assert_eq!(got, data);
        served += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(served > 0);
    (within("attack", attack).await.unwrap(), peak)
}

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
    let (handle, _) = within(
        "open",
        bob.open("alice", bob.resolve("alice", "big").await.unwrap().id),
    )
    .await
    .unwrap();
    let got = within("read", bob.read(handle, 100, 1 << 20))
        .await
        .unwrap();
    assert_eq!(&got[..], &big[100..100 + (1 << 20)]);
    // And so is one past the end of the file: it comes back short.
    let tail = within("read", bob.read(handle, (3 << 20) - 10, 1 << 20))
        .await
        .unwrap();
    assert_eq!(&tail[..], &big[(3 << 20) - 10..]);
    assert_eq!(bob.list("alice", ROOT_ID).await.unwrap().len(), 2);
    // A client asking for more than fits gets what fits, from the open and from a read.
    let chunk = alice.chunk_size() as usize;
    let (handle, _, head) = within(
        "open",
        bob.open_with_head(
            "alice",
            bob.resolve("alice", "big").await.unwrap().id,
            1 << 20,
        ),
    )
    .await
    .unwrap();
    assert_eq!(&head[..], &big[..chunk]);
    let read = Request::Read {
        handle,
        offset: 7,
        len: 1 << 20,
    };
    match within("read", bob.call(read, Bytes::new())).await.unwrap() {
        (Reply::Data, data) => assert_eq!(&data[..], &big[7..7 + chunk]),
        (other, _) => panic!("{other:?}"),
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_user_names_and_passwords_are_refused_at_once_and_kept_nowhere() {
    let server = TestServer::start_with(&["--plaintext"]);
    let before = server.rss_kib().unwrap();
    let addr = server.addr.clone();
    let attack = async move {
        let mut tasks = Vec::new();
        for i in 0..100u32 {
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                // Each from its own address and with its own name, as a spray would be.
                let src = [127, 0, 10 + (i / 200) as u8, (i % 200) as u8 + 1];
                let name = format!("{i}{}", "n".repeat(2_000_000));
                raw_login(&addr, src, &name, "password").await
            }));
            if tasks.len() == 8 {
                for t in tasks.drain(..) {
                    let (code, message) = t.await.unwrap().unwrap_err();
                    assert_eq!(code, ErrorCode::InvalidName, "{message}");
                    assert!(message.contains("longer than 32 bytes"), "{message}");
                }
            }
        }
        let e = raw_login(&addr, [127, 0, 9, 1], "alice", &"p".repeat(1 << 20)).await;
        let (code, message) = e.unwrap_err();
        assert_eq!(code, ErrorCode::TooLarge, "{message}");
        assert!(
            message.contains("password longer than 1024 bytes"),
            "{message}"
        );
    };
    let ((), _) = serve_during(&server, attack).await;
    let after = server.rss_kib().unwrap();
    eprintln!("RSS {before} -> {after} KiB");
    assert!(
        after < before + 64 * 1024,
        "server RSS grew from {before} to {after} KiB"
    );
    let log = server.log_text();
    assert!(log.len() < 1 << 20, "{} bytes of log", log.len());
    assert!(log.contains("invalid user name"), "{log}");
    assert!(!log.contains(&"n".repeat(100)), "a name was logged in full");
    // The real users are still welcome, with the right password only.
    server.connect("carol").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_logins_are_logged_at_a_bounded_rate() {
    let server = TestServer::start_with(&["--plaintext", "--login-delay-ms", "0"]);
    let addr = server.addr.clone();
    let started = Instant::now();
    let summary = "more login failures suppressed";
    // Wrong passwords from one address: ten failures, then refusals that cost the server
    // nothing but a log line, in bursts until the log has summed some up.
    let log = server.log_path().to_path_buf();
    let attack = async move {
        let mut refusals = 0u32;
        while !std::fs::read_to_string(&log).unwrap().contains(summary) {
            assert!(started.elapsed() < TIMEOUT, "no summary line");
            let burst = (0..50).map(|_| raw_login(&addr, [127, 0, 20, 1], "alice", "guess"));
            for r in futures::future::join_all(burst).await {
                match refused(r) {
                    ErrorCode::AuthFailed => {}
                    ErrorCode::Throttled => refusals += 1,
                    other => panic!("{other:?}"),
                }
            }
        }
        refusals
    };
    let (refusals, _) = serve_during(&server, attack).await;
    // Budgets are per second of the server's clock: a run spans at most two more of them.
    let elapsed = started.elapsed().as_secs() + 2;
    let text = server.log_text();
    let lines = text
        .lines()
        .filter(|l| l.contains("login failed") || l.contains("login refused"))
        .count() as u64;
    assert!(refusals > 100, "{refusals} refusals");
    assert!(
        lines <= 10 * elapsed,
        "{lines} lines for {refusals} refusals in {elapsed} s"
    );
    // alice herself, from her own address, is not locked out by it.
    server.connect("alice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guesses_lock_out_the_guessing_address_not_the_user() {
    let server = TestServer::start_with(&["--plaintext", "--login-delay-ms", "1"]);
    let addr = server.addr.clone();
    let attack = async move {
        // 60 guesses at once from one address: each is counted before its password is
        // checked, so no more than the lockout allows get a check.
        let guesses = (0..60).map(|_| raw_login(&addr, [127, 0, 30, 1], "alice", "guess"));
        let codes: Vec<ErrorCode> = futures::future::join_all(guesses)
            .await
            .into_iter()
            .map(refused)
            .collect();
        let failed = codes
            .iter()
            .filter(|c| **c == ErrorCode::AuthFailed)
            .count();
        let throttled = codes.iter().filter(|c| **c == ErrorCode::Throttled).count();
        assert_eq!((failed, throttled), (10, 50), "{codes:?}");
        // The address is refused for every user now, even with the right password.
        let e = raw_login(&addr, [127, 0, 30, 1], "carol", PASSWORD).await;
        assert_eq!(refused(e), ErrorCode::Throttled);
        // Elsewhere alice logs in at once with her password.
        raw_login(&addr, [127, 0, 31, 1], "alice", PASSWORD)
            .await
            .unwrap();
    };
    serve_during(&server, attack).await;
    server.connect("alice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logging_into_ones_own_account_does_not_reset_the_count_of_guesses() {
    let server = TestServer::start_with(&["--plaintext", "--login-delay-ms", "1"]);
    let addr = server.addr.clone();
    let attack = async move {
        // carol guesses other users' passwords, three at a time, logging in as herself in
        // between: the address's failures add up all the same.
        let src = [127, 0, 40, 1];
        let mut failed = 0;
        for round in 0..10 {
            for user in ["alice", "bob", &format!("nobody{round}")] {
                match refused(raw_login(&addr, src, user, "guess").await) {
                    ErrorCode::AuthFailed => failed += 1,
                    ErrorCode::Throttled => {}
                    other => panic!("{other:?}"),
                }
            }
            let own = raw_login(&addr, src, "carol", PASSWORD).await;
            if round < 3 {
                own.unwrap();
            }
        }
        assert_eq!(failed, 10, "guesses answered");
    };
    serve_during(&server, attack).await;
    // Nobody else is locked out by it.
    server.connect("carol").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn password_checks_run_one_per_core_at_a_time() {
    let server = TestServer::start_with(&["--plaintext", "--login-delay-ms", "1"]);
    let addr = server.addr.clone();
    // 60 guesses at once, each from its own address: none is throttled, all are checked,
    // but only as many at a time as there are cores (each argon2 check takes 19 MiB).
    let attack = async move {
        let guesses = (0..60u8).map(|i| raw_login(&addr, [127, 0, 50, i + 1], "alice", "guess"));
        for r in futures::future::join_all(guesses).await {
            assert_eq!(refused(r), ErrorCode::AuthFailed);
        }
    };
    let ((), peak) = serve_during(&server, attack).await;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert!(
        peak < 100 * 1024 + cores * 20 * 1024,
        "server RSS peaked at {peak} KiB"
    );
    server.connect("alice").await;
}

/// Replaces `from` by `to` (of the same length) in every file under `dir`; how many held it.
fn replace_in_files(dir: &Path, from: &str, to: &str) -> usize {
    assert_eq!(from.len(), to.len());
    let mut changed = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let Some(at) = bytes.windows(from.len()).position(|w| w == from.as_bytes()) else {
            continue;
        };
        let mut bytes = bytes;
        bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
        std::fs::write(&path, bytes).unwrap();
        changed += 1;
    }
    changed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_are_refused_in_new_names_and_never_printed() {
    let mut server = TestServer::start_with(&["--plaintext"]);
    let (alice, _) = server.connect("alice").await;
    upload(&alice, "clean", b"clean").await;
    // Retitles the terminal, erases the line and returns to its start.
    let evil = "evil\x1b]0;pwned\x07\x1b[2K\rname";
    for name in [evil, "a\nb", "tab\t", "del\x7f", "c1\u{9b}", "nul\0"] {
        let put = Request::Put {
            parent: ROOT_ID,
            replace: None,
            mode: None,
            mtime_ns: None,
            owner: "alice".into(),
            name: name.into(),
            blake3: blake3::hash(b"data").to_hex().to_string(),
        };
        let e = alice
            .call(put, Bytes::from_static(b"data"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidName), "{name:?}: {e}");
        let e = alice.upload_begin(&at(name), None).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidName), "{name:?}: {e}");
        let e = alice.rename(&mv("clean", name)).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidName), "{name:?}: {e}");
    }
    assert_eq!(alice.list("alice", ROOT_ID).await.unwrap().len(), 1);

    // A name stored before they were refused: written into alice's metadata by hand, in
    // place of a name of the same length.
    let stored = r"evil\u001b]0;pwned\u0007\u001b[2K\rname";
    let placeholder = format!("evil{}name", "p".repeat(stored.len() - 8));
    upload(&alice, &placeholder, b"legacy").await;
    drop(alice);
    server.kill9();
    let folder = server.data.join("files").join("alice");
    let quoted = |s: &str| format!("\"{s}\"");
    assert!(replace_in_files(&folder, &quoted(&placeholder), &quoted(stored)) > 0);
    server.restart();

    // `sharefs ls` shows it quoted, on one line, with no control character.
    let mut ls = server.cli("alice");
    ls.args(["ls", "alice"]);
    let out = output_within(&mut ls);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert!(
        !stdout.chars().any(|c| c.is_control() && c != '\n'),
        "{stdout:?}"
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l == r"'evil'$'\033'']0;pwned'$'\a\033''[2K'$'\r''name'"),
        "{stdout}"
    );
    // The file can still be read, renamed to a clean name and deleted.
    let (alice, _) = server.connect("alice").await;
    assert_eq!(download(&alice, "alice", evil).await.unwrap(), b"legacy");
    alice.rename(&mv(evil, "tamed")).await.unwrap();
    alice
        .remove("alice", ROOT_ID, "tamed", false)
        .await
        .unwrap();
    assert_eq!(alice.list("alice", ROOT_ID).await.unwrap().len(), 1);
}
