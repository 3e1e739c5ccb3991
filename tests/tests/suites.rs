//! The standard suites other network filesystems are judged by, against a real mount of a
//! real server: pjdfstest (POSIX semantics, in a user's own folder) and fsx (random I/O
//! with every read verified, with and without mmap).
//!
//! Both tools are installed by `.ci/run` (`cargo install pjdfstest fsx`); there
//! `SHAREFS_REQUIRE_SUITES` is set and a missing tool fails the test instead of skipping.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sharefs_tests::mount::{fuse_available, TestMount};
use sharefs_tests::*;

/// The tool on PATH or in `~/.cargo/bin`; `None` (and a loud skip) if missing outside CI.
fn tool(name: &str) -> Option<PathBuf> {
    sharefs_tests::tool(
        name,
        "SHAREFS_REQUIRE_SUITES",
        &format!("cargo install {name}"),
    )
}

/// Runs `cmd` to its end or kills it after `limit`; returns (success, stdout + stderr).
fn run_bounded(cmd: &mut Command, limit: Duration) -> (bool, String) {
    let out_path = tempfile::NamedTempFile::new().unwrap();
    let out = out_path.reopen().unwrap();
    let err = out.try_clone().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(out_path.path()).unwrap_or_default();
    match status {
        Some(s) => (s.success(), text),
        None => (false, format!("{text}\n*** killed after {limit:?} ***")),
    }
}

#[test]
fn pjdfstest_passes_in_a_users_own_folder() {
    if !fuse_available() {
        return;
    }
    let Some(pjdfstest) = tool("pjdfstest") else {
        return;
    };
    let server = TestServer::start();
    // Mounted as users mount it, without allow_other: the local users pjdfstest switches
    // to (nobody, daemon) are refused by the kernel, as on any such FUSE mount.
    let alice = TestMount::new(&server, "alice");
    let dir = alice.path("alice/pjdfstest");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("pjdfstest.toml");
    let (ok, out) = run_bounded(
        Command::new(pjdfstest)
            .arg("-c")
            .arg(&config)
            .arg("-p")
            .arg(&dir)
            .current_dir(&dir)
            .env("NO_COLOR", "1")
            .env("CLICOLOR", "0"),
        Duration::from_secs(900),
    );
    let summary = out
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| panic!("no summary from pjdfstest:\n{out}"))
        .to_string();
    let failed: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("FAILED") || l.contains("PASSED UNEXPECTEDLY"))
        .collect();
    eprintln!("pjdfstest: {summary}");
    assert!(
        ok && failed.is_empty() && summary.contains(" 0 failed"),
        "pjdfstest: {summary}\n{}\n\nfull output:\n{out}\n\nmount log:\n{}",
        failed.join("\n"),
        alice.log_text()
    );
}

/// fsx configuration: the default weights, without (`mmap` false) or with memory-mapped
/// reads and writes, plus close/open, fsync and truncate so uploads happen mid-run.
fn fsx_config(dir: &Path, mmap: bool) -> PathBuf {
    let map = if mmap { 10 } else { 0 };
    let path = dir.join(format!("fsx-{}.toml", if mmap { "mmap" } else { "plain" }));
    std::fs::write(
        &path,
        format!(
            "flen = 262144\n\
             [opsize]\nmax = 65536\nmin = 0\nalign = 1\n\
             [weights]\nclose_open = 2\nread = 10\nwrite = 10\nmapread = {map}\n\
             mapwrite = {map}\ninvalidate = {}\ntruncate = 2\nfsync = 1\nfdatasync = 1\n\
             posix_fallocate = 0\npunch_hole = 0\nsendfile = 0\n",
            if mmap { 1 } else { 0 }
        ),
    )
    .unwrap();
    path
}

#[test]
fn fsx_random_seeds_with_and_without_mmap() {
    if !fuse_available() {
        return;
    }
    let Some(fsx) = tool("fsx") else {
        return;
    };
    let seeds: Vec<u64> = std::env::var("SHAREFS_FSX_SEEDS")
        .unwrap_or_else(|_| "1,2,3,4,5,6,7,8,9,10".into())
        .split(',')
        .map(|s| s.trim().parse().expect("SHAREFS_FSX_SEEDS: numbers"))
        .collect();
    let ops_of = |var: &str, default: u64| -> u64 {
        std::env::var(var)
            .map(|s| s.parse().unwrap_or_else(|_| panic!("{var}: a number")))
            .unwrap_or(default)
    };
    // 100,000 operations a seed without mmap, 50,000 with: there every msync of a written
    // mapping uploads the whole file, so an operation costs twice as much (13 s against
    // 8 s for 20,000 on the test machine), and half as many keep the suite's share of
    // CI's time in bounds.
    let plain_ops = ops_of("SHAREFS_FSX_OPS", 100_000);
    let mmap_ops = ops_of("SHAREFS_FSX_MMAP_OPS", 50_000);
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    let work = tempfile::tempdir().unwrap();
    let dir = alice.path("alice/fsx");
    std::fs::create_dir(&dir).unwrap();

    // The slow (mmap) runs first, then the rest, each on its own file, taken from one
    // queue by RUNNERS workers: a run mostly waits for the mount, the server and the
    // disk's flushes, so more at once than cores keeps the total time down.
    const RUNNERS: usize = 5;
    let mut runs: Vec<(u64, bool)> = Vec::new();
    for mmap in [true, false] {
        for &seed in &seeds {
            runs.push((seed, mmap));
        }
    }
    let configs = [
        fsx_config(work.path(), false),
        fsx_config(work.path(), true),
    ];
    let queue = std::sync::Mutex::new(runs.into_iter());
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..RUNNERS {
            scope.spawn(|| loop {
                let Some((seed, mmap)) = queue.lock().unwrap().next() else {
                    break;
                };
                let config = &configs[usize::from(mmap)];
                let artifacts = work.path().join(format!("art-{seed}-{mmap}"));
                std::fs::create_dir_all(&artifacts).unwrap();
                let file = dir.join(format!(
                    "file-{seed}-{}",
                    if mmap { "mmap" } else { "plain" }
                ));
                let ops = if mmap { mmap_ops } else { plain_ops };
                let started = Instant::now();
                let (ok, out) = run_bounded(
                    Command::new(&fsx)
                        .arg("-q")
                        .arg("-N")
                        .arg(ops.to_string())
                        .arg("-S")
                        .arg(seed.to_string())
                        .arg("-f")
                        .arg(config)
                        .arg("-P")
                        .arg(&artifacts)
                        .arg(&file),
                    Duration::from_secs(1200),
                );
                eprintln!(
                    "fsx seed {seed} mmap {mmap}, {ops} operations: {} in {:.0?}",
                    if ok { "ok" } else { "FAILED" },
                    started.elapsed()
                );
                if !ok {
                    let tail: Vec<&str> = out.lines().rev().take(40).collect();
                    failures.lock().unwrap().push(format!(
                        "seed {seed} mmap {mmap}:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    ));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "fsx ({plain_ops} operations a seed, {mmap_ops} with mmap) failed:\n{}\n\nmount log (tail):\n{}",
        failures.join("\n\n"),
        alice
            .log_text()
            .lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
