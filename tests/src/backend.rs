//! The cluster backend for tests: a private PostgreSQL cluster (initdb in a temp
//! directory, as an unprivileged user when the tests run as root) and a real S3 server
//! (`s3s-fs`, an S3 API over a directory) on 127.0.0.1, each stopped in `Drop`.
//!
//! Setting `SHAREFS_TEST_BACKEND=cluster` makes every [`crate::TestServer`] a cluster
//! node over a backend of its own, so the end-to-end suites run against it unchanged;
//! [`Backend`] also gives several nodes one backend to share.
//!
//! With `SHAREFS_TEST_S3_ENDPOINT` set, the S3 server is that one instead of an `s3s-fs`
//! of the tests' own (`tests/garage.sh` runs the suites so against a Garage cluster):
//! `SHAREFS_TEST_S3_KEY` and `SHAREFS_TEST_S3_SECRET` are its credentials, and
//! `SHAREFS_TEST_S3_MAKE_BUCKET` a shell command that makes the bucket named by `$1`
//! and lets the key read and write it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key the test S3 server accepts.
pub const S3_KEY: &str = "sharefs-test";
/// Its secret.
pub const S3_SECRET: &str = "sharefs-test-secret";

/// Whether the suites run against the cluster backend (`SHAREFS_TEST_BACKEND=cluster`).
pub fn cluster_selected() -> bool {
    std::env::var("SHAREFS_TEST_BACKEND").is_ok_and(|b| b == "cluster")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// PostgreSQL's programs: on PATH, or in Debian's versioned directory.
fn pg_program(name: &str) -> PathBuf {
    if crate::runs(name) {
        return PathBuf::from(name);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.into_iter()
        .rev()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found: apt-get install postgresql"))
}

/// `program args`, as the unprivileged `nobody` when running as root (PostgreSQL refuses
/// to run as root).
fn as_db_user(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "nobody", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Runs `cmd`, which must succeed; its standard output.
fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A private PostgreSQL server.
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Postgres {
    pub fn start() -> Postgres {
        let dir = tempfile::tempdir().expect("temp dir");
        if is_root() {
            // SAFETY: chown of a path we own, to nobody's ids.
            let path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes())
                .expect("a path without NUL");
            let rc = unsafe { libc::chown(path.as_ptr(), 65534, 65534) };
            assert_eq!(rc, 0, "chown of the database directory");
        }
        let data = dir.path().join("data");
        run_ok(
            as_db_user(&pg_program("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "sharefs", "--auth=trust", "-E", "UTF8", "--no-sync"]),
            "initdb",
        );
        let port = free_port();
        let options = format!(
            "-k {} -p {port} -c listen_addresses=127.0.0.1 -c max_connections=200",
            dir.path().display()
        );
        run_ok(
            as_db_user(&pg_program("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-w", "-t", "60", "-o", &options, "-l"])
                .arg(dir.path().join("log"))
                .arg("start"),
            "pg_ctl start",
        );
        Postgres { dir, port }
    }

    /// Creates database `name`; returns its URL.
    pub fn database(&self, name: &str) -> String {
        run_ok(
            Command::new(pg_program("psql"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", "sharefs", "-d", "postgres", "-q", "-c"])
                .arg(format!("CREATE DATABASE {name}")),
            "CREATE DATABASE",
        );
        format!("postgres://sharefs@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs `sql` in the database of `url` (from [`Postgres::database`]); its output,
    /// unaligned and without headers.
    pub fn sql(&self, url: &str, sql: &str) -> String {
        run_ok(
            Command::new(pg_program("psql")).args([
                "-d",
                url,
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ]),
            "psql",
        )
    }

    /// Stops the server at once (as a crash would) or, with `clean`, cleanly.
    pub fn stop(&self, clean: bool) {
        let _ = as_db_user(&pg_program("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", if clean { "fast" } else { "immediate" }, "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Starts it again after [`Postgres::stop`], on the same port.
    pub fn restart(&self) {
        let options = format!(
            "-k {} -p {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.dir.path().display(),
            self.port
        );
        run_ok(
            as_db_user(&pg_program("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-w", "-t", "60", "-o", &options, "-l"])
                .arg(self.dir.path().join("log"))
                .arg("start"),
            "pg_ctl start",
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop(false);
    }
}

/// A real S3 server: `s3s-fs` over a temp directory, or the one the environment names.
pub struct S3Server {
    /// The `s3s-fs` started here and its directory; `None` for an outside server.
    own: Option<(Child, tempfile::TempDir)>,
    pub endpoint: String,
    pub key: String,
    pub secret: String,
}

impl S3Server {
    pub fn start() -> S3Server {
        if let Ok(endpoint) = std::env::var("SHAREFS_TEST_S3_ENDPOINT") {
            let var = |name: &str| {
                std::env::var(name)
                    .unwrap_or_else(|_| panic!("{name} goes with SHAREFS_TEST_S3_ENDPOINT"))
            };
            return S3Server {
                own: None,
                endpoint,
                key: var("SHAREFS_TEST_S3_KEY"),
                secret: var("SHAREFS_TEST_S3_SECRET"),
            };
        }
        let program = crate::tool("s3s-fs", "SHAREFS_REQUIRE_TOOLS", "cargo install s3s-fs@0.14.1 --features binary")
            .expect("s3s-fs is needed for the cluster backend: cargo install s3s-fs@0.14.1 --features binary");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let child = Command::new(program)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_KEY, "--secret-key", S3_SECRET])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        S3Server {
            own: Some((child, dir)),
            endpoint: format!("http://127.0.0.1:{port}"),
            key: S3_KEY.into(),
            secret: S3_SECRET.into(),
        }
    }

    /// Creates bucket `name`: a directory of our `s3s-fs`'s root, or through
    /// `SHAREFS_TEST_S3_MAKE_BUCKET`.
    pub fn bucket(&self, name: &str) {
        match &self.own {
            Some((_, dir)) => std::fs::create_dir(dir.path().join(name)).expect("bucket directory"),
            None => {
                let make = std::env::var("SHAREFS_TEST_S3_MAKE_BUCKET")
                    .expect("SHAREFS_TEST_S3_MAKE_BUCKET goes with SHAREFS_TEST_S3_ENDPOINT");
                run_ok(
                    Command::new("sh").args(["-c", &make, "make-bucket", name]),
                    "making a bucket",
                );
            }
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some((child, _)) = &mut self.own {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A database and a bucket that cluster nodes share.
pub struct Backend {
    pub postgres: Postgres,
    pub s3: S3Server,
    pub url: String,
    pub bucket: String,
    /// Whether the default users are in the database yet (the first node adds them).
    users_added: std::sync::atomic::AtomicBool,
}

impl Backend {
    pub fn start() -> Backend {
        let postgres = Postgres::start();
        let s3 = S3Server::start();
        let url = postgres.database("sharefs");
        // An outside server's buckets outlive this run: each backend's is its own.
        static BACKENDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let bucket = match s3.own {
            Some(_) => "sharefs".to_string(),
            None => format!(
                "sharefs-{}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                BACKENDS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ),
        };
        s3.bucket(&bucket);
        Backend {
            postgres,
            s3,
            url,
            bucket,
            users_added: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// True the first time only: the default users go into the database once, for
    /// every node.
    pub fn first_to_add_users(&self) -> bool {
        !self
            .users_added
            .swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    /// The `serve` arguments of a node over this backend.
    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--metadata".into(),
            self.url.clone(),
            "--blobs".into(),
            format!("s3://{}", self.bucket),
            "--s3-endpoint".into(),
            self.s3.endpoint.clone(),
        ]
    }

    /// The environment a node needs (the object store's credentials).
    pub fn server_env(&self) -> [(&'static str, String); 2] {
        [
            ("AWS_ACCESS_KEY_ID", self.s3.key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.s3.secret.clone()),
        ]
    }
}
