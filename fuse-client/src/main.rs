//! `sharefs`: the command-line client (and, with `mount`, the FUSE client).

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sharefs_client::quoting::shell_escape;
use sharefs_client::settings::ConnectArgs;
use sharefs_client::{transfer, RemoteClient};
use sharefs_protocol::{Event, Notification};

#[derive(Parser)]
#[command(
    name = "sharefs",
    version,
    about = "sharefs client: list, upload, download, delete, notifications"
)]
struct Cli {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List users, or one user's files.
    Ls { owner: Option<String> },
    /// Upload FILE into my folder (as NAME, default its file name).
    Put { file: PathBuf, name: Option<String> },
    /// Download OWNER/NAME to DEST (default ./NAME; "-" writes to stdout).
    Get { path: String, dest: Option<PathBuf> },
    /// Delete one of my files.
    Rm { name: String },
    /// Mount the share: one folder per user; yours is writable.
    Mount(sharefs_client::mount::MountArgs),
    /// Show pending and recent notifications (and acknowledge the pending ones).
    Notifications {
        /// Keep running and print each notification as it arrives.
        #[arg(long)]
        follow: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Mount(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Command::Mount(args) = cli.command {
        // The mount runs its own runtime (the kernel session blocks this thread).
        let result = cli
            .connect
            .resolve()
            .map_err(anyhow::Error::msg)
            .and_then(|opts| sharefs_client::mount::run(opts, args));
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sharefs: {}", shell_escape(&format!("{e:#}")));
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sharefs: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Error messages may quote what the server sent.
            eprintln!("sharefs: {}", shell_escape(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

async fn connect(args: &ConnectArgs) -> Result<(RemoteClient, sharefs_client::EventStream)> {
    let opts = args.resolve().map_err(anyhow::Error::msg)?;
    Ok(RemoteClient::connect(&opts).await?)
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ls { owner } => ls(&cli.connect, owner).await,
        Command::Put { file, name } => put(&cli.connect, &file, name).await,
        Command::Get { path, dest } => get(&cli.connect, &path, dest).await,
        Command::Rm { name } => rm(&cli.connect, &name).await,
        Command::Notifications { follow } => notifications(&cli.connect, follow).await,
        Command::Mount(_) => bail!("mount runs outside the async runtime"),
    }
}

async fn ls(args: &ConnectArgs, owner: Option<String>) -> Result<()> {
    let (client, _events) = connect(args).await?;
    match owner {
        None => {
            for user in client.list_users().await? {
                println!("{}", shell_escape(&user));
            }
        }
        Some(owner) => {
            let owner = owner.trim_end_matches('/');
            for f in client.list_files(owner).await? {
                println!(
                    "{:>12}  {}  {}",
                    f.size,
                    format_time_ns(f.mtime_ns),
                    shell_escape(&f.name)
                );
            }
        }
    }
    Ok(())
}

fn progress_bar(len: Option<u64>, what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match len {
        Some(len) => ProgressBar::new(len),
        None => ProgressBar::new_spinner(),
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    Some(bar)
}

async fn put(args: &ConnectArgs, file: &Path, name: Option<String>) -> Result<()> {
    let name = match name {
        Some(n) => n,
        None => file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("{}: cannot derive a file name; give NAME", file.display()))?
            .to_string(),
    };
    sharefs_protocol::name::check_file_name(&name).map_err(|e| anyhow!("{name}: {e}"))?;
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| file.display().to_string())?;
    let size = f.metadata().await.ok().map(|m| m.len());
    let (client, _events) = connect(args).await?;
    let bar = progress_bar(size, &name);
    let reader = tokio::io::BufReader::with_capacity(1 << 20, f);
    let info = transfer::upload(&client, &name, reader, size, |n| {
        if let Some(b) = &bar {
            b.set_position(n)
        }
    })
    .await
    .map_err(|e| anyhow!("{name}: {e}"))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    eprintln!(
        "uploaded {}/{} ({} bytes)",
        shell_escape(&info.owner),
        shell_escape(&info.name),
        info.size
    );
    Ok(())
}

async fn get(args: &ConnectArgs, path: &str, dest: Option<PathBuf>) -> Result<()> {
    let Some((owner, name)) = path.split_once('/') else {
        bail!("{path}: expected OWNER/NAME");
    };
    let (client, _events) = connect(args).await?;
    if dest.as_deref() == Some(Path::new("-")) {
        let mut out = tokio::io::stdout();
        transfer::download(&client, owner, name, &mut out, |_, _| {}).await?;
        return Ok(());
    }
    let dest = match dest {
        Some(d) if d.is_dir() => d.join(name),
        Some(d) => d,
        None => PathBuf::from(name),
    };
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Download into a temp file next to the destination and rename at the end, so an
    // interrupted download never leaves a partial file under the final name.
    let tmp = tempfile::Builder::new()
        .prefix(".sharefs-get-")
        .tempfile_in(&dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let (std_file, tmp_path) = tmp.into_parts();
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(std_file));
    let bar = progress_bar(None, name);
    transfer::download(&client, owner, name, &mut out, |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    })
    .await?;
    out.into_inner().sync_all().await?;
    tmp_path
        .persist(&dest)
        .map_err(|e| anyhow!("{}: {}", dest.display(), e.error))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}

async fn rm(args: &ConnectArgs, name: &str) -> Result<()> {
    let (client, _events) = connect(args).await?;
    let (owner, name) = match name.split_once('/') {
        Some((o, n)) => (o.to_string(), n),
        None => (client.user().to_string(), name),
    };
    client.delete(&owner, name).await?;
    Ok(())
}

fn format_time_ns(ns: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn format_notification(n: &Notification) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(n.last_ms.max(0) as u64);
    let times = if n.count > 1 {
        format!(" ({} times)", n.count)
    } else {
        String::new()
    };
    format!(
        "{}  {} downloaded {} ({} bytes){}",
        humantime::format_rfc3339_seconds(t),
        shell_escape(&n.downloader),
        shell_escape(&n.file),
        n.size,
        times
    )
}

async fn notifications(args: &ConnectArgs, follow: bool) -> Result<()> {
    let (client, mut events) = connect(args).await?;
    let (pending, recent) = client.notifications(50).await?;
    let pending_ids: HashSet<u64> = pending.iter().map(|n| n.id).collect();
    let mut shown: HashSet<u64> = HashSet::new();
    for n in &recent {
        let mark = if pending_ids.contains(&n.id) {
            "*"
        } else {
            " "
        };
        println!("{mark} {}", format_notification(n));
        shown.insert(n.id);
    }
    for n in &pending {
        if shown.insert(n.id) {
            println!("* {}", format_notification(n));
        }
    }
    if !pending_ids.is_empty() {
        client.ack(pending_ids.into_iter().collect()).await?;
    }
    if !follow {
        return Ok(());
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Notification { notification }) => {
                    if shown.insert(notification.id) {
                        println!("{}", format_notification(&notification));
                        let _ = std::io::stdout().flush();
                    }
                    client.ack(vec![notification.id]).await?;
                }
                Some(_) => {}
                None => bail!("connection to the server lost"),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
