//! Harness for the end-to-end tests: real `sharefs-server` processes on 127.0.0.1 with a
//! temp data directory, real TCP, the real client library and binaries.
//!
//! Everything a test starts is stopped in `Drop`, also when the test panics.
//!
//! # Layout
//! - this file: `TestServer`, binaries, bounded waits, content helpers;
//! - [`mount`]: `TestMount`, a real FUSE mount of `sharefs mount --foreground`;
//! - [`backend`]: a private PostgreSQL and a real S3 server for cluster nodes
//!   (`SHAREFS_TEST_BACKEND=cluster` makes every `TestServer` one);
//! - [`desktop`]: a private D-Bus bus and a recording notification daemon;
//! - [`keyring`]: a real Secret Service (gnome-keyring-daemon) on a private bus;
//! - [`proxy`]: a TCP proxy that stalls connections on demand;
//! - [`raw`]: a raw-protocol client for the server tests;
//! - [`smallfs`]: a small tmpfs, for a really full disk.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

#[cfg(feature = "client")]
use sharefs_client::{ConnectOptions, EventStream, RemoteClient};

pub mod backend;
pub mod desktop;
pub mod keyring;
#[cfg(feature = "client")]
pub mod mount;
pub mod proxy;
pub mod raw;
pub mod smallfs;

pub use proxy::StallProxy;
pub use smallfs::SmallFs;

/// Bound on every wait in the tests: a bug fails the test instead of hanging CI.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The bound of [`within`] and [`output_within`]: [`TIMEOUT`] times
/// `SHAREFS_TEST_TIME_SCALE` (a whole number, 1 when unset), for a slow backend such
/// as an unoptimised Garage keeping three copies of every block (tests/garage.sh).
pub fn patience() -> Duration {
    let scale = std::env::var("SHAREFS_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1)
        .clamp(1, 20);
    TIMEOUT * scale
}

/// Awaits `fut`, failing the test if it takes longer than [`patience`].
pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    let limit = patience();
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Path of one of the workspace's binaries, built once per test process.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/<profile>/deps/<test binary> -> target/<profile>
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target directory")
            .to_path_buf();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--bins", "-p", "sharefs-server"]);
        // The client's binary only for the tests that run it.
        if cfg!(feature = "client") {
            cmd.args(["-p", "sharefs-client"]);
        }
        if release {
            cmd.arg("--release");
        }
        // Cargo gives a test the variables it gives a build script of this package; build
        // scripts that watch them (ring's) would see a change and rebuild with everything
        // above them, here and again at the next `cargo` run from a shell.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(set_by_cargo_for_the_test) {
                cmd.env_remove(key);
            }
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
        dir
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} missing", path.display());
    path
}

/// Whether cargo sets the variable `key` for this test process (as for a build script of
/// this package), rather than the user for every cargo run.
fn set_by_cargo_for_the_test(key: &str) -> bool {
    key == "OUT_DIR"
        || key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_BIN_")
        || key.starts_with("CARGO_MANIFEST_")
        || matches!(
            key,
            "CARGO_CRATE_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
        )
}

pub const PASSWORD: &str = "correct horse";

/// The program `name` on PATH or in `~/.cargo/bin`; `None` (and a loud skip) if missing,
/// unless the environment variable `required_by` is set (as in CI): then the test fails,
/// saying to `install`.
/// Whether what a test needs is here (`ok`). If not: a loud skip, or a failure where the
/// environment variable `required_by` is set (CI).
pub fn present_or_skip(ok: bool, required_by: &str, what: &str) -> bool {
    if !ok {
        assert!(
            std::env::var_os(required_by).is_none(),
            "{what} is required ({required_by}) but missing"
        );
        eprintln!("\n*** SKIPPED: {what} missing: test not run ***\n");
    }
    ok
}

/// Whether `program --version` runs and succeeds.
pub fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn tool(name: &str, required_by: &str, install: &str) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin").join(name));
    }
    let found = candidates.into_iter().find(|p| p.is_file());
    present_or_skip(found.is_some(), required_by, &format!("{name} ({install})"));
    found
}

/// Environment variable that makes the tests needing an outside tool (promtool,
/// systemd-analyze, man) fail instead of skipping when it is missing; CI sets it.
pub const REQUIRE_TOOLS: &str = "SHAREFS_REQUIRE_TOOLS";

/// The first line a child prints, delivered on a channel so the caller can wait for it
/// with a bound (`recv_timeout`) instead of blocking on the pipe.
pub fn first_line(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx
}

/// A `sharefs-server` child process over a temp data directory.
pub struct TestServer {
    child: Option<Child>,
    pub addr: String,
    pub data: PathBuf,
    /// The server certificate's fingerprint; `None` for a `--plaintext` server.
    pub fingerprint: Option<String>,
    /// Holds the temp directory (data, logs) for the server's life.
    _dir: tempfile::TempDir,
    log: PathBuf,
    extra_args: Vec<String>,
    /// The server's limit on open files, if the test sets one.
    nofile: Option<u64>,
    /// The database and object store of a cluster node; `None`: the embedded store.
    pub backend: Option<std::sync::Arc<backend::Backend>>,
}

impl TestServer {
    /// Starts a server with users `alice`, `bob` and `carol` (password [`PASSWORD`]).
    pub fn start() -> TestServer {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> TestServer {
        Self::start_in(None, args)
    }

    /// Starts a server whose data directory is `data` (for instance on a [`SmallFs`]),
    /// or in a temp directory; logs always go to a temp directory.
    pub fn start_in(data: Option<&Path>, args: &[&str]) -> TestServer {
        Self::start_full(data, args, None, true)
    }

    /// Starts a server on an existing data directory `data` (its users as they are: none
    /// is added), for instance one an earlier version wrote.
    pub fn start_existing(data: &Path, args: &[&str]) -> TestServer {
        Self::start_full(Some(data), args, None, false)
    }

    /// Starts a server allowed at most `nofile` open files (its `ulimit -n`).
    pub fn start_with_nofile(args: &[&str], nofile: u64) -> TestServer {
        Self::start_full(None, args, Some(nofile), true)
    }

    /// Starts a cluster node over `backend` (which other nodes may share), with users
    /// `alice`, `bob` and `carol` in its own data directory.
    pub fn start_node(backend: &std::sync::Arc<backend::Backend>, args: &[&str]) -> TestServer {
        Self::start_over(None, args, None, true, Some(backend.clone()))
    }

    fn start_full(
        data: Option<&Path>,
        args: &[&str],
        nofile: Option<u64>,
        add_users: bool,
    ) -> TestServer {
        // SHAREFS_TEST_BACKEND=cluster: every server is a node over a backend of its own.
        let backend =
            backend::cluster_selected().then(|| std::sync::Arc::new(backend::Backend::start()));
        Self::start_over(data, args, nofile, add_users, backend)
    }

    fn start_over(
        data: Option<&Path>,
        args: &[&str],
        nofile: Option<u64>,
        add_users: bool,
        backend: Option<std::sync::Arc<backend::Backend>>,
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let data = data.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
        let mut server = TestServer {
            child: None,
            addr: "127.0.0.1:0".into(),
            data,
            fingerprint: None,
            log: dir.path().join("server.log"),
            _dir: dir,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            nofile,
            backend,
        };
        // A cluster's accounts are in its database: the first node adds them for all.
        let add_users = add_users
            && server
                .backend
                .as_ref()
                .is_none_or(|b| b.first_to_add_users());
        if add_users {
            for user in ["alice", "bob", "carol"] {
                server.add_user(user, PASSWORD);
            }
        }
        server.spawn();
        server
    }

    pub fn add_user(&self, name: &str, password: &str) {
        self.user(
            &["add", name, "--password-stdin"],
            Some(&format!("{password}\n")),
        );
    }

    /// `sharefs-server user ARGS` for this server's accounts: `--data DATA`, and a
    /// cluster node's `--metadata URL`.
    pub fn user_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("sharefs-server"));
        cmd.arg("user").args(args).arg("--data").arg(&self.data);
        if let Some(backend) = &self.backend {
            cmd.arg("--metadata").arg(&backend.url);
        }
        cmd
    }

    /// Runs `sharefs-server user ARGS` (also beside the running server) with `stdin` as
    /// its input; it must succeed.
    pub fn user(&self, args: &[&str], stdin: Option<&str>) {
        let mut child = self
            .user_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "user {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(bin("sharefs-server"));
        cmd.args(["serve", "--listen", &self.addr, "--data"])
            .arg(&self.data)
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(backend) = &self.backend {
            cmd.args(backend.server_args()).envs(backend.server_env());
        }
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and only touches the child.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let rx = first_line(stdout);
        self.child = Some(child);
        let line = rx
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|_| panic!("server did not start; log:\n{}", self.log_text()));
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .filter(|a| a.contains(':'))
            .unwrap_or_else(|| {
                panic!(
                    "unexpected server output {line:?}; log:\n{}",
                    self.log_text()
                )
            });
        self.addr = addr.to_string();
        self.fingerprint = if self.extra_args.iter().any(|a| a == "--plaintext") {
            None
        } else {
            let cert = self.extra_arg("--tls-cert").map(PathBuf::from);
            let key = self.extra_arg("--tls-key").map(PathBuf::from);
            let id =
                sharefs_server::tls::load(&self.data, cert.as_deref(), key.as_deref()).unwrap();
            Some(id.fingerprint)
        };
    }

    fn extra_arg(&self, name: &str) -> Option<String> {
        let i = self.extra_args.iter().position(|a| a == name)?;
        self.extra_args.get(i + 1).cloned()
    }

    #[cfg(feature = "client")]
    /// Trust settings that accept exactly this server (pinned fingerprint), or plaintext.
    pub fn trust(&self) -> Option<sharefs_client::tls::TrustOptions> {
        self.fingerprint
            .as_ref()
            .map(|fp| sharefs_client::tls::TrustOptions {
                fingerprint: Some(fp.clone()),
                ..Default::default()
            })
    }

    /// The server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_field("VmRSS:")
    }

    /// Threads of the server process.
    pub fn threads(&self) -> Option<u64> {
        self.status_field("Threads:")
    }

    /// Files the server process has open.
    pub fn open_fds(&self) -> Option<usize> {
        let dir = std::fs::read_dir(format!("/proc/{}/fd", self.pid()?)).ok()?;
        Some(dir.count())
    }

    fn status_field(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    /// Where the server's log goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`: no chance to clean up anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the server stalls, its connections open and nothing answered, until
    /// [`TestServer::resume`] (or `Drop`, which kills it stopped or not).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`TestServer::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGHUP, as `systemctl reload` sends it.
    pub fn hangup(&self) {
        self.signal(libc::SIGHUP);
    }

    fn signal(&self, sig: i32) {
        let pid = self.pid().expect("server running");
        // SAFETY: signalling our own child process.
        assert_eq!(
            unsafe { libc::kill(pid as i32, sig) },
            0,
            "kill({pid}, {sig})"
        );
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server running");
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }

    /// Starts the server again on the same address and data directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    #[cfg(feature = "client")]
    pub fn options(&self, user: &str) -> ConnectOptions {
        ConnectOptions {
            server: self.addr.clone(),
            user: user.into(),
            password: PASSWORD.into(),
            connect_timeout: Duration::from_secs(10),
            tls: self.trust(),
        }
    }

    #[cfg(feature = "client")]
    pub async fn connect(&self, user: &str) -> (RemoteClient, EventStream) {
        self.connect_with(user, PASSWORD).await
    }

    /// Connects as `user` with `password`.
    #[cfg(feature = "client")]
    pub async fn connect_with(&self, user: &str, password: &str) -> (RemoteClient, EventStream) {
        let mut options = self.options(user);
        options.password = password.into();
        within("connect", RemoteClient::connect(&options))
            .await
            .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"))
    }

    /// A `sharefs` command preset to talk to this server as `user`.
    pub fn cli(&self, user: &str) -> Command {
        let mut cmd = Command::new(bin("sharefs"));
        cmd.env("SHAREFS_SERVER", &self.addr)
            .env("SHAREFS_USER", user)
            .env("SHAREFS_PASSWORD", PASSWORD)
            .env("XDG_CONFIG_HOME", self.config_home());
        self.transport_env(&mut cmd);
        cmd
    }

    /// A configuration directory of this server's own for the commands run against it
    /// (nothing in it unless a test puts it there), so no user's configuration or stored
    /// login takes part in a test.
    pub fn config_home(&self) -> PathBuf {
        self._dir.path().join("config")
    }

    /// Sets the environment that makes a `sharefs` command trust (or not use) TLS here.
    pub fn transport_env(&self, cmd: &mut Command) {
        match &self.fingerprint {
            Some(fp) => cmd.env("SHAREFS_SERVER_FINGERPRINT", fp),
            None => cmd.env("SHAREFS_PLAINTEXT", "1"),
        };
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log_text());
        }
        self.kill9();
    }
}

/// Runs `cmd` (bounded, as [`output_within`]) and returns its standard output; fails the
/// test with both outputs unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = output_within(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` to its end, at most [`patience`] (then kills it and fails the test).
/// Its output goes through files, so a chatty command cannot fill a pipe and stall.
pub fn output_within(cmd: &mut Command) -> std::process::Output {
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap();
    let limit = patience();
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |mut f: std::fs::File| {
        use std::io::{Read, Seek};
        let mut v = Vec::new();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    std::process::Output {
        status,
        stdout: read(out),
        stderr: read(err),
    }
}

/// A runtime for blocking tests that call the client library now and then.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The file as the server has it, read with the client library (not through a mount).
#[cfg(feature = "client")]
pub fn server_content(server: &TestServer, owner: &str, name: &str) -> Option<Vec<u8>> {
    rt().block_on(async {
        let (c, _) = server.connect("carol").await;
        download(&c, owner, name).await.ok()
    })
}

/// Waits (bounded by `limit`) until `cond` holds; panics naming `what` otherwise.
pub fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Checks a folded pending list: at most `cap` + 1, the digest of `downloader`'s
/// downloads first and only it folded, and together they account for all `made`.
pub fn assert_digest_first(
    pending: &[sharefs_protocol::Notification],
    cap: usize,
    made: usize,
    downloader: &str,
) {
    assert!(pending.len() <= cap + 1, "{} pending", pending.len());
    let digest = &pending[0];
    assert!(digest.folded > 0, "no digest first: {pending:?}");
    assert!(pending[1..].iter().all(|n| n.folded == 0));
    assert_eq!(digest.folded as usize + pending.len() - 1, made);
    assert_eq!(digest.count, digest.folded);
    assert_eq!(digest.downloader, downloader);
}

/// Deterministic pseudo-random content.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

/// Uploads `data` to `path` of the client's own tree (its directory must exist) through the streaming path or the small-file path.
#[cfg(feature = "client")]
pub async fn upload(client: &RemoteClient, path: &str, data: &[u8]) -> sharefs_protocol::FileInfo {
    within("upload", async {
        let (dir, name) = sharefs_client::paths::split_last(path)?;
        let parent = client.resolve(client.user(), &dir).await?;
        let target = sharefs_client::remote::UploadTarget::at(parent.id, &name);
        sharefs_client::transfer::upload(client, &target, data, Some(data.len() as u64), |_| {})
            .await
    })
    .await
    .unwrap_or_else(|e| panic!("upload {path}: {e}"))
}
/// Downloads `owner`'s file at `path` into memory.
#[cfg(feature = "client")]
pub async fn download(
    client: &RemoteClient,
    owner: &str,
    path: &str,
) -> Result<Vec<u8>, sharefs_client::ClientError> {
    let mut out = Vec::new();
    within("download", async {
        let file = client.resolve(owner, path).await?;
        sharefs_client::transfer::download(client, owner, file.id, &mut out, |_, _| {}).await
    })
    .await?;
    Ok(out)
}

/// Where an upload of `name` into the root of the client's own folder goes.
#[cfg(feature = "client")]
pub fn at(name: &str) -> sharefs_client::remote::UploadTarget {
    sharefs_client::remote::UploadTarget::at(sharefs_protocol::ROOT_ID, name)
}

/// A rename of `from` to `to` within the root of the client's own folder.
#[cfg(feature = "client")]
pub fn mv(from: &str, to: &str) -> sharefs_client::remote::Move {
    sharefs_client::remote::Move {
        parent: sharefs_protocol::ROOT_ID,
        name: from.into(),
        new_parent: sharefs_protocol::ROOT_ID,
        new_name: to.into(),
        noreplace: false,
    }
}
pub use sharefs_protocol::ROOT_ID;
