//! `sharefs mount`: connect, mount, serve the kernel until unmounted.
//!
//! Foreground mode runs here until `umount`/`fusermount3 -u` or SIGINT/SIGTERM (which
//! unmount cleanly). Background mode re-runs the binary in foreground mode as a detached
//! child (new session, log file) and returns once the child reports the mount is up, or
//! fails with the child's error, so `sharefs mount` behaves like `mount`. A mount point
//! left dead by a sharefs mount whose process was killed is cleared first (see
//! [`crate::mountpoint`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use fuser::{MountOption, SessionACL};
use sharefs_protocol::Event;
use tokio::sync::mpsc;

use crate::config::MountDefaults;
use crate::connection::{Connection, ConnectionEvent};
use crate::desktop;
use crate::fs::FsCore;
use crate::fuse::{FuseAdapter, Invalidator};
use crate::mountpoint;
use crate::remote::ConnectOptions;

/// Environment variable that tells a background child to report readiness on stdout.
const READY_ENV: &str = "SHAREFS_MOUNT_READY";

#[derive(Debug, Clone, clap::Args)]
pub struct MountArgs {
    /// Where to mount: an existing empty directory (default: the profile's mountpoint).
    pub mountpoint: Option<PathBuf>,
    /// Stay in the foreground (for tests, systemd, and seeing the log).
    #[arg(long)]
    pub foreground: bool,
    /// Let other local users use the mount (needs user_allow_other in /etc/fuse.conf).
    #[arg(long)]
    pub allow_other: bool,
    /// Seconds an operation waits for an unreachable server before failing with EIO
    /// [default: 30].
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Where writes are staged before upload and failed uploads are kept.
    #[arg(long, env = "SHAREFS_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Threads serving kernel requests [default: 8].
    #[arg(long)]
    pub threads: Option<usize>,
}

/// A mount's settings: the flags over the profile's mount defaults.
#[derive(Debug, Clone)]
pub struct MountSettings {
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub allow_other: bool,
    pub timeout: u64,
    pub cache_dir: Option<PathBuf>,
    pub threads: usize,
}

impl MountArgs {
    pub fn settle(self, defaults: &MountDefaults) -> Result<MountSettings> {
        let mountpoint = self
            .mountpoint
            .or_else(|| defaults.mountpoint.clone())
            .ok_or_else(|| {
                anyhow!("no mount point: give one, or set mount.mountpoint in the profile")
            })?;
        Ok(MountSettings {
            mountpoint,
            foreground: self.foreground,
            allow_other: self.allow_other || defaults.allow_other.unwrap_or(false),
            timeout: self.timeout.or(defaults.timeout).unwrap_or(30),
            cache_dir: self.cache_dir.or_else(|| defaults.cache_dir.clone()),
            threads: self.threads.or(defaults.threads).unwrap_or(8),
        })
    }
}

/// `~/.cache/sharefs/<user>@<server>` (or under `$XDG_CACHE_HOME`).
pub fn default_cache_dir(user: &str, server: &str) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let server: String = server
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    base.join("sharefs").join(format!("{user}@{server}"))
}

pub fn run(opts: ConnectOptions, args: MountSettings) -> Result<()> {
    mountpoint::prepare(&args.mountpoint)?;
    let meta = std::fs::metadata(&args.mountpoint)
        .with_context(|| format!("mount point {}", args.mountpoint.display()))?;
    if !meta.is_dir() {
        bail!("{}: not a directory", args.mountpoint.display());
    }
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| default_cache_dir(&opts.user, &opts.server));
    std::fs::create_dir_all(&cache_dir)
        .with_context(|| format!("cache directory {}", cache_dir.display()))?;
    if args.foreground {
        foreground(opts, args, cache_dir)
    } else {
        background(opts, &args, &cache_dir)
    }
}

fn background(opts: ConnectOptions, args: &MountSettings, cache_dir: &Path) -> Result<()> {
    let log_path = cache_dir.join("mount.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| log_path.display().to_string())?;
    let exe = std::env::current_exe().context("locating the sharefs binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--server")
        .arg(&opts.server)
        .arg("--user")
        .arg(&opts.user)
        .arg("mount")
        .arg(&args.mountpoint)
        .arg("--foreground")
        .arg("--timeout")
        .arg(args.timeout.to_string())
        .arg("--threads")
        .arg(args.threads.to_string())
        .arg("--cache-dir")
        .arg(cache_dir);
    if args.allow_other {
        cmd.arg("--allow-other");
    }
    match &opts.tls {
        None => {
            cmd.arg("--plaintext");
        }
        Some(trust) => {
            if let Some(fp) = &trust.fingerprint {
                cmd.arg("--server-fingerprint").arg(fp);
            }
            if let Some(ca) = &trust.ca {
                cmd.arg("--ca").arg(ca);
            }
            if let Some(k) = &trust.known_servers {
                cmd.arg("--known-servers").arg(k);
            }
        }
    }
    cmd.env("SHAREFS_PASSWORD", &opts.password)
        .env(READY_ENV, "1")
        .env(crate::logging::LOG_FILE_ENV, &log_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid in the child between fork and exec touches no shared state.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount process")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no pipe to the mount process"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() == "ready" {
        eprintln!(
            "mounted {} at {} (log: {})",
            opts.server,
            args.mountpoint.display(),
            log_path.display()
        );
        return Ok(());
    }
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let last = log
        .lines()
        .rev()
        .find(|l| l.starts_with("sharefs:"))
        .map(|l| l.trim_start_matches("sharefs:").trim().to_string())
        .unwrap_or_else(|| format!("mount failed; see {}", log_path.display()));
    bail!("{last}")
}

fn foreground(opts: ConnectOptions, args: MountSettings, cache_dir: PathBuf) -> Result<()> {
    // 1 MiB data buffers are reused from the heap instead of being mapped and zero-filled
    // by the kernel for every chunk (page faults were a large share of a transfer's CPU);
    // two arenas and a 16 MiB trim threshold bound what stays resident across threads.
    // SAFETY: mallopt only tunes the allocator; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sharefs-rt")
        .build()
        .context("starting the runtime")?;
    let timeout = Duration::from_secs(args.timeout.max(1));
    let (conn, events) = runtime
        .block_on(Connection::start(opts.clone(), timeout))
        .map_err(|e| anyhow!("{e}"))?;
    let core = Arc::new(FsCore::new(conn.clone(), cache_dir.clone()).map_err(|e| anyhow!("{e}"))?);
    let notifier = Arc::new(std::sync::OnceLock::new());
    let invalidator = Arc::new(std::sync::OnceLock::new());
    let adapter = FuseAdapter::new(
        core.clone(),
        runtime.handle().clone(),
        notifier.clone(),
        invalidator.clone(),
    );

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!(
            "sharefs:{}@{}",
            opts.user,
            // Mount options are comma separated: a list of servers is joined with `+`.
            opts.server.replace(',', "+")
        )),
        MountOption::Subtype("sharefs".into()),
        MountOption::NoAtime,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    // As root, fuser mounts with mount(2) itself and gives the subtype to fusermount3
    // only; the kernel takes it as a mount option too, so /proc/mounts says fuse.sharefs
    // however the mount is made (mount(8) and fstab mounts run as root).
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } == 0 {
        config
            .mount_options
            .push(MountOption::CUSTOM("subtype=sharefs".into()));
    }
    if args.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(args.threads.max(1));
    config.clone_fd = true;
    // Resolved before mounting: afterwards resolving it would ask this very filesystem.
    let folders =
        std::fs::canonicalize(&args.mountpoint).unwrap_or_else(|_| args.mountpoint.clone());
    let mut session = fuser::Session::new(adapter, &args.mountpoint, &config)
        .with_context(|| format!("cannot mount at {}", args.mountpoint.display()))?;
    raise_readahead(&args.mountpoint);
    let _ = notifier.set(session.notifier());
    let invalidate = Invalidator::spawn(session.notifier());
    let _ = invalidator.set(invalidate.clone());
    let sink = invalidate.clone();
    core.on_invalidation(move |inv| {
        sink.send(inv);
    });
    runtime.spawn(crate::status::keep(
        cache_dir.clone(),
        folders.clone(),
        conn.clone(),
        core.clone(),
    ));
    runtime.spawn(event_loop(conn, core, events, invalidate, folders));

    let mut unmounter = session.unmount_callable();
    let mountpoint = args.mountpoint.clone();
    // Installed before we report ready, so an early Ctrl-C unmounts instead of killing.
    let (mut int, mut term) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _rt = runtime.enter();
        (
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        )
    };
    runtime.spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!(mountpoint = %mountpoint.display(), "signal received; unmounting");
        if let Err(e) = unmounter.unmount() {
            tracing::error!(error = %e, "unmount failed");
        }
    });

    tracing::info!(mountpoint = %args.mountpoint.display(), server = %opts.server, user = %opts.user, "mounted");
    if std::env::var_os(READY_ENV).is_some() {
        println!("ready");
        // The parent stops reading after this line.
    }
    let result = session.run();
    crate::status::remove(&cache_dir);
    tracing::info!("unmounted");
    runtime.shutdown_timeout(Duration::from_secs(2));
    result.context("FUSE session failed")
}

/// The kernel offers FUSE only 128 KiB of readahead at INIT; the mount's backing device
/// accepts more through sysfs. Larger readahead means fewer, larger read requests for
/// sequential reads (our prefetch keeps the data coming). Needs root; harmless without.
fn raise_readahead(mountpoint: &Path) {
    let Ok(target) = std::fs::canonicalize(mountpoint) else {
        return;
    };
    if let Some(dev) = mountpoint::mounted_at(&target).map(|e| e.dev) {
        let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
        match std::fs::write(&knob, "1024") {
            Ok(()) => tracing::debug!(knob, "readahead raised to 1 MiB"),
            Err(e) => tracing::debug!(knob, error = %e, "readahead left at the kernel's default"),
        }
    }
}

/// Applies server events to the caches and the kernel; shows notifications.
async fn event_loop(
    conn: Connection,
    core: Arc<FsCore<Connection>>,
    mut events: mpsc::UnboundedReceiver<ConnectionEvent>,
    invalidate: Invalidator,
    mountpoint: PathBuf,
) {
    // Notifications wait on the desktop's daemon; they get their own task so file
    // changes are never delayed behind them.
    let (notes_tx, notes_rx) = mpsc::unbounded_channel();
    let notes_conn = conn.clone();
    tokio::spawn(desktop::Notifier::new(Some(mountpoint)).run(notes_conn, notes_rx));
    while let Some(ev) = events.recv().await {
        let invalidations = match ev {
            ConnectionEvent::Server(Event::Notification { notification }) => {
                let _ = notes_tx.send(notification);
                continue;
            }
            ConnectionEvent::Server(ev) => core.handle_event(&ev),
            ConnectionEvent::Reconnected => core.reconnected(),
            ConnectionEvent::Lost(_) => continue,
        };
        for inv in invalidations {
            if !invalidate.send(inv) {
                return;
            }
        }
    }
}
