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
use sharefs_client::{transfer, RemoteClient, UploadTarget};
use sharefs_protocol::{EntryKind, Event, FileInfo, Notification};

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
    /// List users, or a directory of a user's tree (OWNER or OWNER/PATH).
    Ls { path: Option<String> },
    /// Upload FILE into my tree as PATH (default its file name in my folder; a PATH that
    /// is a directory, or ends with '/', receives it under its own name).
    Put { file: PathBuf, path: Option<String> },
    /// Download OWNER/PATH to DEST (default ./NAME; "-" writes to stdout).
    Get { path: String, dest: Option<PathBuf> },
    /// Delete a file, link or empty directory of my tree (PATH inside my folder).
    Rm { path: String },
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
        Command::Ls { path } => ls(&cli.connect, path).await,
        Command::Put { file, path } => put(&cli.connect, &file, path).await,
        Command::Get { path, dest } => get(&cli.connect, &path, dest).await,
        Command::Rm { path } => rm(&cli.connect, &path).await,
        Command::Notifications { follow } => notifications(&cli.connect, follow).await,
        Command::Mount(_) => bail!("mount runs outside the async runtime"),
    }
}

/// Splits "OWNER/PATH" (or "OWNER") into its owner and the path inside their tree.
fn owner_path(path: &str) -> (&str, &str) {
    let path = path.trim_start_matches('/');
    match path.split_once('/') {
        Some((owner, rest)) => (owner, rest),
        None => (path, ""),
    }
}

/// `ls -l`-like permission bits of an entry.
fn mode_string(f: &FileInfo) -> String {
    let kind = match f.kind {
        EntryKind::Dir => 'd',
        EntryKind::File => '-',
        EntryKind::Symlink => 'l',
    };
    let mut s = String::from(kind);
    for shift in [6, 3, 0] {
        let bits = (f.mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn print_entry(f: &FileInfo) {
    let suffix = match (&f.kind, &f.target) {
        (EntryKind::Dir, _) => "/".to_string(),
        (EntryKind::Symlink, Some(t)) => format!(" -> {}", shell_escape(t)),
        _ => String::new(),
    };
    println!(
        "{}  {:>12}  {}  {}{}",
        mode_string(f),
        f.size,
        format_time_ns(f.mtime_ns),
        shell_escape(&f.name),
        suffix
    );
}

async fn ls(args: &ConnectArgs, path: Option<String>) -> Result<()> {
    let (client, _events) = connect(args).await?;
    let Some(path) = path else {
        for user in client.list_users().await? {
            println!("{}", shell_escape(&user));
        }
        return Ok(());
    };
    let (owner, inside) = owner_path(&path);
    let entry = client
        .resolve(owner, inside)
        .await
        .map_err(|e| anyhow!("{path}: {e}"))?;
    if entry.kind != EntryKind::Dir {
        print_entry(&entry);
        return Ok(());
    }
    for f in client
        .list(owner, entry.id)
        .await
        .map_err(|e| anyhow!("{path}: {e}"))?
    {
        print_entry(&f);
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

async fn put(args: &ConnectArgs, file: &Path, path: Option<String>) -> Result<()> {
    let file_name = file
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string);
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| file.display().to_string())?;
    let meta = f.metadata().await.ok();
    let size = meta.as_ref().map(|m| m.len());
    let mode = meta.as_ref().map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o7777
    });
    let (client, _events) = connect(args).await?;
    let me = client.user().to_string();
    let path = path.unwrap_or_default();
    // Where it goes: into PATH if that is a directory (or ends with '/'), else as PATH.
    let into_dir = path.is_empty() || path.ends_with('/');
    let existing = if into_dir {
        None
    } else {
        client.resolve(&me, &path).await.ok()
    };
    let (parent_path, name) = match existing {
        Some(e) if e.kind == EntryKind::Dir => (path.as_str(), None),
        _ if into_dir => (path.as_str(), None),
        _ => match path.trim_end_matches('/').rsplit_once('/') {
            Some((dir, name)) => (dir, Some(name.to_string())),
            None => ("", Some(path.clone())),
        },
    };
    let name = match name.or(file_name) {
        Some(n) => n,
        None => bail!("{}: cannot derive a file name; give PATH", file.display()),
    };
    sharefs_protocol::name::check_file_name(&name).map_err(|e| anyhow!("{name}: {e}"))?;
    let parent = client
        .resolve(&me, parent_path)
        .await
        .map_err(|e| anyhow!("{parent_path}: {e}"))?;
    if parent.kind != EntryKind::Dir {
        bail!("{parent_path}: not a directory");
    }
    let target = UploadTarget {
        mode,
        ..UploadTarget::at(parent.id, &name)
    };
    let bar = progress_bar(size, &name);
    let reader = tokio::io::BufReader::with_capacity(1 << 20, f);
    let info = transfer::upload(&client, &target, reader, size, |n| {
        if let Some(b) = &bar {
            b.set_position(n)
        }
    })
    .await
    .map_err(|e| anyhow!("{name}: {e}"))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let shown = if parent_path.trim_matches('/').is_empty() {
        info.name.clone()
    } else {
        format!("{}/{}", parent_path.trim_matches('/'), info.name)
    };
    eprintln!(
        "uploaded {}/{} ({} bytes)",
        shell_escape(&info.owner),
        shell_escape(&shown),
        info.size
    );
    Ok(())
}

async fn get(args: &ConnectArgs, path: &str, dest: Option<PathBuf>) -> Result<()> {
    let (owner, inside) = owner_path(path);
    if inside.is_empty() {
        bail!("{path}: expected OWNER/PATH");
    }
    let (client, _events) = connect(args).await?;
    let entry = client
        .resolve(owner, inside)
        .await
        .map_err(|e| anyhow!("{path}: {e}"))?;
    if entry.kind != EntryKind::File {
        bail!("{path}: not a regular file");
    }
    let name = entry.name.as_str();
    if dest.as_deref() == Some(Path::new("-")) {
        let mut out = tokio::io::stdout();
        transfer::download(&client, owner, entry.id, &mut out, |_, _| {}).await?;
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
    transfer::download(&client, owner, entry.id, &mut out, |done, total| {
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

async fn rm(args: &ConnectArgs, path: &str) -> Result<()> {
    let (client, _events) = connect(args).await?;
    let me = client.user().to_string();
    let trimmed = path.trim_matches('/');
    let name = trimmed.rsplit_once('/').map_or(trimmed, |(_, n)| n);
    if name.is_empty() {
        bail!("{path}: expected a PATH inside my folder");
    }
    let entry = client
        .resolve(&me, trimmed)
        .await
        .map_err(|e| anyhow!("{path}: {e}"))?;
    client
        .remove(&me, entry.parent, name, entry.kind == EntryKind::Dir)
        .await
        .map_err(|e| anyhow!("{path}: {e}"))?;
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
