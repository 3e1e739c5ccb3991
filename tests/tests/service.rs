//! Running as a service: `sharefs-server` tells systemd (`NOTIFY_SOCKET`) when it is ready
//! and when it stops, re-reads the accounts on SIGHUP without dying of it, logs without
//! colour codes when its log is not a terminal, and the units in dist/systemd pass
//! `systemd-analyze verify` (CI sets `SHAREFS_REQUIRE_TOOLS`: a missing tool fails there).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use sharefs_tests::*;

/// A child process killed (and reaped) in `Drop`.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next datagram on `socket` (bounded by [`TIMEOUT`]).
fn next_message(socket: &UnixDatagram) -> String {
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no sd_notify message within {TIMEOUT:?}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn tells_systemd_when_ready_and_stopping_and_logs_without_colours() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let log = dir.path().join("server.log");
    let mut child = Running(
        Command::new(bin("sharefs-server"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path().join("data"))
            .env("NOTIFY_SOCKET", &socket_path)
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let listening = first_line(child.0.stdout.take().unwrap());

    let ready = next_message(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // Ready means serving: the listener is bound and the data directory open.
    let line = listening.recv_timeout(TIMEOUT).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap();
    std::net::TcpStream::connect(addr).unwrap();
    assert!(dir.path().join("data/files").is_dir());

    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let stopping = next_message(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("serving"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "colour codes in a log file:\n{text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_accounts_and_the_server_lives_on() {
    let server = TestServer::start();
    server.add_user("dave", "pw-dave");
    server.hangup();
    eventually(TIMEOUT, "reload logged", || {
        server.log_text().contains("reloaded the accounts")
    });
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("reloaded the accounts"))
        .unwrap();
    assert!(line.contains("accounts=4"), "{line}");

    // The new account logs in; the server did not die of the signal.
    let mut opts = server.options("dave");
    opts.password = "pw-dave".into();
    within("dave logs in", sharefs_client::RemoteClient::connect(&opts))
        .await
        .unwrap_or_else(|e| panic!("dave cannot log in after SIGHUP: {e}"));
    server.connect("alice").await;
    // A second reload works the same.
    server.hangup();
    eventually(TIMEOUT, "second reload logged", || {
        server.log_text().matches("reloaded the accounts").count() == 2
    });
}

/// The repository's dist/systemd directory.
fn units() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd")
}

/// `systemd-analyze [--user] verify unit`; fails the test on any complaint, warnings
/// included (verify exits 0 on those).
fn verify(analyze: &Path, unit: &Path, user: bool, manpath: &Path, runtime: &Path) {
    let mut cmd = Command::new(analyze);
    if user {
        cmd.arg("--user");
    }
    cmd.arg("verify")
        .arg(unit)
        .env("MANPATH", manpath)
        .env("XDG_RUNTIME_DIR", runtime)
        .env("SYSTEMD_LOG_COLOR", "0");
    let out = output_within(&mut cmd);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {}:\n{said}",
        unit.display()
    );
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let Some(analyze) = tool("systemd-analyze", REQUIRE_TOOLS, "apt-get install systemd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The units name their man pages: verify looks them up, so write the real ones.
    let man1 = dir.path().join("man/man1");
    for name in ["sharefs", "sharefs-server"] {
        let mut man = Command::new(bin(name));
        man.arg("man").arg(&man1);
        assert!(output_within(&mut man).status.success());
    }
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    // The installed binaries' paths are where the units expect them; here, the built ones.
    let server = std::fs::read_to_string(units().join("sharefs-server.service")).unwrap();
    assert!(server.contains("Type=notify"));
    assert!(server.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    let server = server.replace(
        "/usr/local/bin/sharefs-server",
        bin("sharefs-server").to_str().unwrap(),
    );
    let server_unit = dir.path().join("sharefs-server.service");
    std::fs::write(&server_unit, server).unwrap();
    verify(
        &analyze,
        &server_unit,
        false,
        &dir.path().join("man"),
        &runtime,
    );

    let mount = std::fs::read_to_string(units().join("sharefs-mount@.service")).unwrap();
    assert!(mount.contains("mount --foreground"));
    let mount = mount.replace("%h/.cargo/bin/sharefs", bin("sharefs").to_str().unwrap());
    let mount_unit = dir.path().join("sharefs-mount@work.service");
    std::fs::write(&mount_unit, mount).unwrap();
    verify(
        &analyze,
        &mount_unit,
        true,
        &dir.path().join("man"),
        &runtime,
    );
}
