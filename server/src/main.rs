//! `sharefs-server`: serve a data directory, manage its users. `systemd` (beside this file)
//! tells the service manager when it is ready and stopping.

use std::io::{BufRead, IsTerminal};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use sharefs_protocol::manual;
use sharefs_protocol::{MAX_FRAME_LIMIT, MIN_FRAME};
use sharefs_server::cluster::accounts::PgAccounts;
use sharefs_server::cluster::Db;
use sharefs_server::units::{format_size, parse_size};
use sharefs_server::users::{UserDb, UserStore};
use sharefs_server::ServerConfig;
use tokio::sync::Notify;

mod systemd;
use systemd::NotifyState;

#[derive(Parser)]
#[command(
    name = "sharefs-server",
    version,
    about = "sharefs file-sharing server"
)]
struct Cli {
    /// Data directory: users, files and notifications live here.
    #[arg(
        long,
        global = true,
        env = "SHAREFS_DATA",
        default_value = "./sharefs-data"
    )]
    data: PathBuf,
    /// Keep users' trees, accounts and notifications in this PostgreSQL database
    /// (postgres://USER@HOST/DB; the password from PGPASSWORD) instead of DATA: a node of a
    /// cluster, with `serve --blobs`; for `user`, the cluster's accounts.
    #[arg(long, global = true, value_name = "URL", env = "SHAREFS_METADATA")]
    metadata: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the data directory until SIGINT or SIGTERM; SIGHUP re-reads the accounts.
    Serve(Box<ServeArgs>),
    /// Manage user accounts (works while the server runs: a removed user's or changed
    /// password's sessions end within a second; quotas apply from the next upload).
    #[command(subcommand)]
    User(UserCommand),
    #[command(flatten)]
    Manual(manual::Manual),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Largest frame accepted, in bytes (at least a 64 KiB chunk and its header).
    #[arg(long, default_value_t = sharefs_protocol::DEFAULT_MAX_FRAME,
          value_parser = in_range::<u32>(MIN_FRAME.into(), MAX_FRAME_LIMIT.into()))]
    max_frame: u32,
    /// Serve without TLS (trusted networks and benchmarks only: passwords travel in the clear).
    #[arg(long)]
    plaintext: bool,
    /// TLS certificate chain (PEM); default: a self-signed one generated in DATA/tls.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Connections served at once.
    #[arg(long, default_value_t = 1024, value_parser = in_range::<usize>(1, 1_000_000))]
    max_connections: usize,
    /// Connections served at once from one IP address.
    #[arg(long, default_value_t = 64, value_parser = in_range::<usize>(1, 1_000_000))]
    max_connections_per_addr: usize,
    /// Seconds a new connection has to finish its TLS handshake and login.
    #[arg(long, default_value_t = 10, value_parser = in_range::<u64>(1, 3600))]
    handshake_timeout: u64,
    /// Seconds of silence after which a logged-in connection is closed.
    #[arg(long, default_value_t = 900, value_parser = in_range::<u64>(1, 31_536_000))]
    idle_timeout: u64,
    /// Requests one connection may have in flight.
    #[arg(long, default_value_t = 64, value_parser = in_range::<usize>(1, 65_536))]
    max_in_flight: usize,
    /// Threads connections are spread over (a connection stays on one); 0: one per core.
    #[arg(long, default_value_t = 0, value_parser = in_range::<usize>(0, 1024))]
    session_threads: usize,
    /// Uploads one user may have in progress at once.
    #[arg(long, default_value_t = 16, value_parser = in_range::<usize>(1, 65_536))]
    max_uploads_per_user: usize,
    /// Seconds an upload may go without receiving data before it is dropped.
    #[arg(long, default_value_t = 120, value_parser = in_range::<u64>(1, 86_400))]
    upload_idle_timeout: u64,
    /// Pending (unacknowledged) download notifications kept per user; older ones are
    /// folded into one digest notification.
    #[arg(long, default_value_t = 256, value_parser = in_range::<usize>(1, 1_000_000))]
    max_pending_notifications: usize,
    /// Failed logins (per address or user name) before refusing it for --login-lockout.
    #[arg(long, default_value_t = 10, value_parser = in_range::<u32>(1, 1_000_000))]
    login_lockout_after: u32,
    /// Seconds a locked-out address or user name is refused.
    #[arg(long, default_value_t = 60, value_parser = in_range::<u64>(1, 86_400))]
    login_lockout: u64,
    /// Delay after the 4th failed login, in ms; doubles with each further failure (max 4 s).
    #[arg(long, default_value_t = 250, value_parser = in_range::<u64>(0, 60_000))]
    login_delay_ms: u64,
    /// Let unknown user names log in, creating their account with the password given.
    /// Only for trusted networks.
    #[arg(long)]
    open_registration: bool,
    /// Free disk space uploads must leave, e.g. 64M or 1G.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    disk_reserve: u64,
    /// Bytes of replies queued for one connection before its requests wait, e.g. 8M.
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    reply_buffer: u64,
    /// Bytes of replies queued for all of one user's connections together, e.g. 32M.
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    user_reply_buffer: u64,
    /// Seconds a client may take no byte of its replies before it is disconnected.
    #[arg(long, default_value_t = 20, value_parser = in_range::<u64>(1, 3600))]
    reply_timeout: u64,
    /// Files one connection may have open at once.
    #[arg(long, default_value_t = 1024, value_parser = in_range::<usize>(1, 1_000_000))]
    max_open_per_connection: usize,
    /// Files one user may have open at once, across connections.
    #[arg(long, default_value_t = 4096, value_parser = in_range::<usize>(1, 10_000_000))]
    max_open_per_user: usize,
    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics (e.g. 127.0.0.1:9470).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Keep file contents in this S3 bucket (s3://BUCKET; credentials from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), with --metadata.
    #[arg(long, value_name = "URL")]
    blobs: Option<String>,
    /// The S3 endpoint for --blobs (http://HOST:PORT); AWS's when absent.
    #[arg(long, value_name = "URL", requires = "blobs")]
    s3_endpoint: Option<String>,
    /// The S3 region for --blobs.
    #[arg(long, default_value = "us-east-1")]
    s3_region: String,
    /// The MiB a node fetches from S3 ahead of sequential readers, in whole blocks,
    /// all readers together (0: none). Mounts already keep 8 MiB of each file's
    /// reads in flight; this pays when the object store is tens of ms away.
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    s3_read_ahead: u64,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user; the password comes from a prompt or --password-stdin.
    Add {
        name: String,
        #[arg(long)]
        password_stdin: bool,
        /// Storage quota, e.g. 10G.
        #[arg(long, value_parser = parse_size)]
        quota: Option<u64>,
    },
    /// List users with their quotas and the disk space their files take.
    List,
    /// Remove a user's account (their files stay unless --purge).
    Remove {
        name: String,
        /// Also delete the user's files and notifications.
        #[arg(long)]
        purge: bool,
    },
    /// Change a user's password.
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set a user's quota ("none" removes it).
    Quota { name: String, size: String },
}

/// A parser for an integer option that must lie in `min..=max`; clap names the option in
/// the error and exits with status 2.
fn in_range<T>(min: u64, max: u64) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync
where
    T: TryFrom<u64>,
{
    move |s: &str| {
        let valid = format!("valid values: {min} to {max}");
        let n: u64 = s
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not a whole number ({valid})"))?;
        if !(min..=max).contains(&n) {
            return Err(format!("{n} is out of range ({valid})"));
        }
        T::try_from(n).map_err(|_| format!("{n} is out of range ({valid})"))
    }
}

fn read_password(stdin: bool, what: &str) -> Result<String> {
    let password = if stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password(format!("{what}: "))?;
        let b = rpassword::prompt_password("Repeat: ")?;
        if a != b {
            bail!("passwords do not match");
        }
        a
    } else {
        bail!("no terminal to ask for a password; use --password-stdin");
    };
    if password.is_empty() {
        bail!("empty password");
    }
    Ok(password)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sharefs-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where `user` commands find the accounts.
enum AccountsAt {
    Files(UserDb),
    Cluster(Box<PgAccounts>),
}

impl AccountsAt {
    fn users(&self) -> &dyn UserStore {
        match self {
            AccountsAt::Files(db) => db,
            AccountsAt::Cluster(db) => db.as_ref(),
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let at = match (&cli.command, &cli.metadata) {
        (Command::User(_), Some(url)) => AccountsAt::Cluster(Box::new(PgAccounts::new(
            Db::open(url).context("opening the cluster's database")?,
        ))),
        _ => AccountsAt::Files(UserDb::new(&cli.data)),
    };
    let db = at.users();
    match cli.command {
        Command::Manual(manual) => Ok(manual.write(Cli::command())?),
        Command::Serve(args) => serve(cli.data, cli.metadata, *args),
        Command::User(UserCommand::Add {
            name,
            password_stdin,
            quota,
        }) => {
            sharefs_protocol::name::check_user_name(&name).map_err(anyhow::Error::msg)?;
            let password = read_password(password_stdin, &format!("Password for {name}"))?;
            db.add(&name, &password, quota)?;
            eprintln!("user {name} added");
            Ok(())
        }
        Command::User(UserCommand::List) => {
            let stored = match &at {
                AccountsAt::Cluster(pg) => Some(pg.stored()?),
                AccountsAt::Files(_) => None,
            };
            let rows: Vec<[String; 3]> = db
                .list()?
                .into_iter()
                .map(|(name, rec)| {
                    let quota = rec.quota.map_or_else(|| "none".into(), format_size);
                    let bytes = match &stored {
                        Some(stored) => stored.get(&name).copied().unwrap_or(0),
                        None => stored_bytes(&cli.data.join("files").join(&name)),
                    };
                    [name, quota, format_size(bytes)]
                })
                .collect();
            let stored = if matches!(at, AccountsAt::Cluster(_)) {
                "STORED"
            } else {
                "ON DISK"
            };
            print_table(["USER", "QUOTA", stored], &rows);
            Ok(())
        }
        Command::User(UserCommand::Remove { name, purge }) => {
            db.remove(&name)?;
            if purge {
                sharefs_protocol::name::check_user_name(&name).map_err(anyhow::Error::msg)?;
                match &at {
                    AccountsAt::Cluster(pg) => pg.purge(&name)?,
                    AccountsAt::Files(_) => {
                        for sub in ["files", "notifications"] {
                            let dir = cli.data.join(sub).join(&name);
                            if dir.exists() {
                                std::fs::remove_dir_all(&dir)
                                    .with_context(|| format!("removing {}", dir.display()))?;
                            }
                        }
                    }
                }
            }
            eprintln!("user {name} removed");
            Ok(())
        }
        Command::User(UserCommand::Passwd {
            name,
            password_stdin,
        }) => {
            if db.get(&name)?.is_none() {
                bail!("{name}: no such user");
            }
            let password = read_password(password_stdin, &format!("New password for {name}"))?;
            db.set_password(&name, &password)?;
            eprintln!("password of {name} changed");
            Ok(())
        }
        Command::User(UserCommand::Quota { name, size }) => {
            let quota = if size == "none" {
                None
            } else {
                Some(parse_size(&size).map_err(anyhow::Error::msg)?)
            };
            db.set_quota(&name, quota)?;
            Ok(())
        }
    }
}

/// Bytes the files under `dir` take (the user's contents, packs and metadata), without
/// opening the store: `user list` runs beside a live server, which owns the store.
fn stored_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => stored_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Prints rows under a header, each column as wide as its widest cell.
fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{out}");
    };
    line(header);
    for row in rows {
        line(std::array::from_fn(|i| row[i].as_str()));
    }
}

/// Lets 1 MiB file-data buffers be reused from the heap instead of being mapped and
/// zero-filled by the kernel for every chunk (page faults were a large share of a
/// transfer's CPU), while two arenas and a 16 MiB trim threshold keep the RSS flat instead
/// of growing with every worker thread that ever touched a buffer.
fn bound_allocator_caching() {
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

fn serve(data: PathBuf, metadata: Option<String>, args: ServeArgs) -> Result<()> {
    bound_allocator_caching();
    sharefs_server::server::raise_fd_limit();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person watching; journald and log files get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // This runtime only accepts connections; they are served on the session threads.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let mut config = ServerConfig::new(&data);
        config.max_frame = args.max_frame;
        config.max_connections = args.max_connections;
        config.max_connections_per_addr = args.max_connections_per_addr;
        config.handshake_timeout = Duration::from_secs(args.handshake_timeout);
        config.idle_timeout = Duration::from_secs(args.idle_timeout);
        config.max_in_flight = args.max_in_flight;
        config.session_threads = args.session_threads;
        config.max_uploads_per_user = args.max_uploads_per_user;
        config.upload_idle_timeout = Duration::from_secs(args.upload_idle_timeout.max(1));
        config.max_pending_notifications = args.max_pending_notifications.max(1);
        config.disk_reserve = args.disk_reserve;
        config.reply_buffer = usize::try_from(args.reply_buffer).unwrap_or(usize::MAX);
        config.user_reply_buffer = usize::try_from(args.user_reply_buffer).unwrap_or(usize::MAX);
        config.reply_timeout = Duration::from_secs(args.reply_timeout.max(1));
        config.max_handles_per_connection = args.max_open_per_connection.max(1);
        config.max_handles_per_user = args.max_open_per_user.max(1);
        config.open_registration = args.open_registration;
        config.login.lockout_after = args.login_lockout_after;
        config.login.lockout = Duration::from_secs(args.login_lockout);
        config.login.delay_base = Duration::from_millis(args.login_delay_ms);
        config.metrics = args.metrics;
        if metadata.is_some() != args.blobs.is_some()
            || (args.s3_endpoint.is_some() && args.blobs.is_none())
        {
            anyhow::bail!(
                "a cluster node needs both --metadata and --blobs (--s3-endpoint goes with them)"
            );
        }
        if let (Some(metadata), Some(blobs)) = (&metadata, &args.blobs) {
            let Some(bucket) = blobs.strip_prefix("s3://").filter(|b| !b.is_empty()) else {
                anyhow::bail!("--blobs: expected s3://BUCKET, got {blobs}");
            };
            config.cluster = Some(sharefs_server::cluster::ClusterConfig {
                metadata: metadata.clone(),
                bucket: bucket.trim_end_matches('/').to_string(),
                endpoint: args.s3_endpoint.clone(),
                region: args.s3_region.clone(),
                access_key: std::env::var("AWS_ACCESS_KEY_ID").ok(),
                secret_key: std::env::var("AWS_SECRET_ACCESS_KEY").ok(),
                read_ahead: args.s3_read_ahead.saturating_mul(1 << 20),
            });
        }
        if args.open_registration {
            tracing::warn!("open registration: any unknown user name can create an account");
        }
        if !args.plaintext {
            sharefs_server::fsutil::create_dir_private(&data)
                .with_context(|| format!("data directory {}", data.display()))?;
            let identity = sharefs_server::tls::load(
                &data,
                args.tls_cert.as_deref(),
                args.tls_key.as_deref(),
            )?;
            config.tls = Some(identity);
        }
        let addr = listener.local_addr()?;
        let reload = Arc::new(Notify::new());
        let hangups = reload_on_sighup(reload.clone())?;
        let signalled = shutdown_signal()?;
        let shutdown = async {
            signalled.await;
            systemd::notify(&[NotifyState::Stopping]);
        };
        sharefs_server::server::run_controlled(listener, config, shutdown, reload, || {
            // One line on stdout once serving, for scripts and test harnesses.
            println!("sharefs-server listening on {addr}");
            systemd::notify(&[NotifyState::Ready]);
        })
        .await?;
        hangups.abort();
        Ok(())
    })
}

/// Notifies `reload` on every SIGHUP (`systemctl reload`), logging it.
fn reload_on_sighup(reload: Arc<Notify>) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the accounts");
            reload.notify_one();
        }
    }))
}

/// Resolves at the first SIGINT or SIGTERM. The handlers are installed at once, before
/// the server says it is ready: a SIGTERM right after READY stops it cleanly instead of
/// killing it.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
