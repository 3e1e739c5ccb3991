//! Stalled networks and stopped servers, through a real mount: an operation that failed
//! never takes effect later, a silent connection is replaced within the timeout, and an
//! operation waits at most its one deadline.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use sharefs_tests::mount::{fuse_available, TestMount};
use sharefs_tests::*;

const OP_TIMEOUT: Duration = Duration::from_secs(5);

fn put(server: &TestServer, name: &str, data: &[u8]) {
    rt().block_on(async {
        let (c, _) = server.connect("alice").await;
        upload(&c, name, data).await;
    });
}

/// Runs `op`, which must fail with EIO, within `limit`.
fn fails_with_eio<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    op: impl FnOnce() -> std::io::Result<T>,
) {
    let started = Instant::now();
    let r = op();
    let took = started.elapsed();
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}) on a stalled network"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
    }
    eprintln!("{what}: EIO after {took:?}");
    assert!(
        took <= limit,
        "{what}: EIO only after {took:?} (limit {limit:?})"
    );
}

/// Writes `data` to `path` and closes it, returning close()'s error (which `fs::write`
/// ignores).
fn write_and_close(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    let mut f = fs::File::create(path)?;
    f.write_all(data)?;
    // SAFETY: closing the descriptor we own, once.
    if unsafe { libc::close(f.into_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Waits until the server has dealt with the requests a stall held back: it logs each
/// one it refuses. A server that runs them instead logs nothing of the kind; the test then
/// goes on after a bound and finds their effects.
fn stale_requests_handled(server: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let log = server.log_text();
        if log.contains("not run") || log.contains("replaced by a newer connection") {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("the server logged no refused request");
}

/// A server where alice has x, y and z, each "<name> v0".
fn server_with_xyz() -> TestServer {
    let server = TestServer::start();
    for name in ["x", "y", "z"] {
        put(&server, name, format!("{name} v0").as_bytes());
    }
    server
}

/// Through the mount (so its caches hold them): x and z exist, y reads "y v0".
fn see_xyz(dir: &Path) {
    assert_eq!(fs::read(dir.join("y")).unwrap(), b"y v0");
    fs::metadata(dir.join("x")).unwrap();
    fs::metadata(dir.join("z")).unwrap();
}

/// `rm x`, `cp v1 -> y` and `mv z z2` (and `also`), all at once, so each request goes
/// out on the connection that stalls; each must fail with EIO within about one timeout:
/// one operation waits at most one timeout (a read's retries and reopen included), the
/// ones after it at most a second more while the connection is still down.
fn change_xyz_in_vain(dir: &Path, also: impl FnOnce(Duration) + Send) {
    let limit = OP_TIMEOUT + Duration::from_millis(2500);
    std::thread::scope(|s| {
        s.spawn(move || also(limit));
        s.spawn(move || fails_with_eio("rm x", limit, || fs::remove_file(dir.join("x"))));
        s.spawn(move || {
            fails_with_eio("cp v1 -> y", limit, || {
                write_and_close(&dir.join("y"), b"y v1")
            })
        });
        s.spawn(move || {
            fails_with_eio("mv z z2", limit, || {
                fs::rename(dir.join("z"), dir.join("z2"))
            })
        });
    });
}

/// The server holds exactly `want`: each name with its content, or absent.
fn server_holds(server: &TestServer, want: &[(&str, Option<&[u8]>)]) {
    for (name, content) in want {
        assert_eq!(
            server_content(server, "alice", name).as_deref(),
            *content,
            "{name}"
        );
    }
}

fn mount_through(server: &TestServer, proxy: &StallProxy) -> TestMount {
    let timeout = OP_TIMEOUT.as_secs().to_string();
    TestMount::with(
        server,
        "alice",
        &["--server", &proxy.addr, "--timeout", &timeout],
        &[],
    )
}

#[test]
fn operations_that_failed_on_a_stalled_network_never_run_later() {
    if !fuse_available() {
        return;
    }
    let server = server_with_xyz();
    let big = content(3, 8 << 20);
    put(&server, "big", &big);
    let proxy = StallProxy::new(&server.addr);
    let mount = mount_through(&server, &proxy);
    let dir = mount.path("alice");
    see_xyz(&dir);
    let opened = fs::File::open(dir.join("big")).unwrap();

    proxy.stall_all();
    change_xyz_in_vain(&dir, |limit| {
        fails_with_eio("uncached read", limit, || {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; 64 * 1024];
            opened.read_exact_at(&mut buf, 6 << 20)
        })
    });

    // Meanwhile another client writes newer versions.
    put(&server, "x", b"x v2");
    put(&server, "y", b"y v2");

    // Everything the stalled path held reaches the server now.
    proxy.resume();
    stale_requests_handled(&server);
    eventually(TIMEOUT, "the mount to work again", || {
        fs::read(dir.join("x")).is_ok_and(|d| d == b"x v2")
    });
    server_holds(
        &server,
        &[
            ("x", Some(b"x v2")),
            ("y", Some(b"y v2")),
            ("z", Some(b"z v0")),
            ("z2", None),
        ],
    );
}

#[test]
fn operations_that_failed_on_a_stopped_server_never_run_later() {
    if !fuse_available() {
        return;
    }
    let server = server_with_xyz();
    let timeout = OP_TIMEOUT.as_secs().to_string();
    let mount = TestMount::with(&server, "alice", &["--timeout", &timeout], &[]);
    let dir = mount.path("alice");
    see_xyz(&dir);

    // SIGSTOP: the connection stays up, the kernel takes the requests, nothing answers.
    server.pause();
    change_xyz_in_vain(&dir, |_| {});
    server.resume();

    stale_requests_handled(&server);
    eventually(TIMEOUT, "the mount to work again", || {
        fs::read(dir.join("y")).is_ok()
    });
    server_holds(
        &server,
        &[
            ("x", Some(b"x v0")),
            ("y", Some(b"y v0")),
            ("z", Some(b"z v0")),
            ("z2", None),
        ],
    );
}

#[test]
fn a_silent_connection_is_replaced_within_the_timeout() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    put(&server, "a", b"a v0");
    let proxy = StallProxy::new(&server.addr);
    let mount = mount_through(&server, &proxy);
    let dir = mount.path("alice");
    assert_eq!(fs::read(dir.join("a")).unwrap(), b"a v0");

    // Idle: the heartbeat alone finds the silent connection and replaces it.
    let reconnects = |m: &TestMount| m.log_text().matches("reconnected").count();
    let before = reconnects(&mount);
    let started = Instant::now();
    proxy.stall_existing();
    eventually(
        OP_TIMEOUT,
        "an idle mount to replace its silent connection",
        || reconnects(&mount) > before,
    );
    eprintln!("idle: replaced after {:?}", started.elapsed());
    assert!(
        mount.log_text().contains("no sign of life"),
        "{}",
        mount.log_text()
    );

    // Busy: an operation started on a connection that goes silent still succeeds, on
    // the replacement, within its timeout.
    let before = reconnects(&mount);
    proxy.stall_existing();
    let started = Instant::now();
    write_and_close(&dir.join("b"), b"b v1").unwrap();
    let took = started.elapsed();
    eprintln!("write + close across a silent connection: {took:?}");
    assert!(took < OP_TIMEOUT, "took {took:?}");
    assert!(reconnects(&mount) > before);
    assert_eq!(
        server_content(&server, "alice", "b").as_deref(),
        Some(&b"b v1"[..])
    );
}
