//! `sharefs`: the command-line client (and, with `mount`, the FUSE client).

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sharefs_client::quoting::shell_escape;
use sharefs_client::settings::ConnectArgs;
use sharefs_client::{display, fstab, login, settings};
use sharefs_client::{paths, transfer, ClientError, RemoteClient};
use sharefs_protocol::{EntryKind, ErrorCode, Event, FileInfo, Notification};

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
    // -h is ls's human-readable sizes, so help is --help alone.
    #[command(disable_help_flag = true)]
    Ls {
        /// Print help.
        #[arg(long, action = clap::ArgAction::Help)]
        help: Option<bool>,
        /// Long format: kind and mode, size, modification time (local), link target.
        #[arg(short = 'l')]
        long: bool,
        /// With -l, sizes in powers of 1024 (1.5K, 23M, 4.0G) instead of bytes.
        #[arg(short = 'h', long = "human-readable")]
        human: bool,
        /// OWNER or OWNER/PATH to list (default: the list of users).
        path: Option<String>,
    },
    /// Upload SRC into my tree as PATH (default its name in my folder; a PATH that is a
    /// directory, or ends with '/', receives it under its own name).
    Put {
        /// Upload a directory and everything in it (modes, times and links kept).
        #[arg(short = 'r', long)]
        recursive: bool,
        /// Local file (or, with -r, directory) to upload.
        src: PathBuf,
        /// Where in my tree (default: SRC's name in my folder).
        path: Option<String>,
    },
    /// Download OWNER/PATH to DEST (default ./NAME; "-" writes a file to stdout).
    Get {
        /// Download a directory and everything in it (modes, times and links kept).
        #[arg(short = 'r', long)]
        recursive: bool,
        /// Replace local files that exist already (without it, get refuses to).
        #[arg(short = 'f', long)]
        force: bool,
        /// OWNER/PATH to download.
        path: String,
        /// Local file or directory to write to ("-": stdout).
        dest: Option<PathBuf>,
    },
    /// Delete a file, link or empty directory of my tree (PATH inside my folder).
    Rm {
        /// Delete a directory and everything in it.
        #[arg(short = 'r', long)]
        recursive: bool,
        /// Path inside my folder (or OWNER/PATH with my name as OWNER).
        path: String,
    },
    /// Make a directory in my tree.
    Mkdir {
        /// Make missing parents too, and succeed if the directory exists.
        #[arg(short = 'p', long)]
        parents: bool,
        /// The directory to make, inside my folder.
        path: String,
    },
    /// Move or rename FROM to TO within my tree (into TO if it is a directory).
    Mv {
        /// What to move, inside my folder.
        from: String,
        /// The new name, or a directory to move it into.
        to: String,
    },
    /// Mount the share: one folder per user; yours is writable.
    Mount(sharefs_client::mount::MountArgs),
    /// Store the password of PROFILE's user@server (asked for, then checked with the
    /// server) in the desktop's Secret Service, or a 0600 file where there is none.
    Login {
        /// The configuration profile whose login this is (default: --profile or [default]).
        profile: Option<String>,
    },
    /// Forget the stored password of PROFILE's user@server.
    Logout {
        /// The configuration profile whose login to forget (default: --profile or [default]).
        profile: Option<String>,
    },
    /// Uploads a mount could not make, whose data it kept locally: list, retry, discard.
    Failed {
        /// The mount's cache directory (default: the profile's, else
        /// ~/.cache/sharefs/USER@SERVER).
        #[arg(long, env = "SHAREFS_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        #[command(subcommand)]
        action: FailedAction,
    },
    /// Show whether the mount is connected (and since when), its uploads in progress and
    /// the failed uploads it kept locally.
    Status {
        /// The mount's cache directory (default: the profile's, else
        /// ~/.cache/sharefs/USER@SERVER).
        #[arg(long, env = "SHAREFS_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Show pending and recent notifications (and acknowledge the pending ones).
    Notifications {
        /// Keep running and print each notification as it arrives.
        #[arg(long)]
        follow: bool,
    },
    #[command(flatten)]
    Manual(sharefs_protocol::manual::Manual),
}

#[derive(Subcommand)]
enum FailedAction {
    /// List them: id, size, when, and the name each was to have.
    List,
    /// Upload one again (to PATH in my tree, default its name in my folder); on
    /// success its local copy goes.
    Retry {
        /// Its id, as `failed list` shows it.
        id: String,
        /// Where in my tree (default: its name in my folder).
        path: Option<String>,
    },
    /// Delete local copies for good.
    Discard {
        /// Their ids, as `failed list` shows them.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

fn main() -> ExitCode {
    // mount(8) and mount.fuse3 run us as `mount.fuse.sharefs SOURCE DIR -o OPTIONS`.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match fstab::translate(&argv) {
        Ok(fstab::Invocation::Plain) => Cli::parse_from(argv),
        Ok(fstab::Invocation::Mount(args)) => Cli::parse_from(args),
        Ok(fstab::Invocation::Fake) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sharefs: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Manual(manual) = &cli.command {
        return match manual.write(<Cli as clap::CommandFactory>::command()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sharefs: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let default_level = if matches!(cli.command, Command::Mount(_)) {
        "info"
    } else {
        "warn"
    };
    sharefs_client::logging::init(default_level);
    if let Command::Mount(args) = cli.command {
        // The mount runs its own runtime (the kernel session blocks this thread).
        let result = cli
            .connect
            .resolve_with_profile()
            .map_err(anyhow::Error::msg)
            .and_then(|(opts, profile)| {
                sharefs_client::mount::run(opts, args.settle(&profile.mount)?)
            });
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
        Command::Ls {
            long, human, path, ..
        } => ls(&cli.connect, long, human, path).await,
        Command::Put {
            recursive,
            src,
            path,
        } => put(&cli.connect, &src, path, recursive).await,
        Command::Get {
            recursive,
            force,
            path,
            dest,
        } => get(&cli.connect, &path, dest, recursive, force).await,
        Command::Rm { recursive, path } => rm(&cli.connect, &path, recursive).await,
        Command::Mkdir { parents, path } => mkdir(&cli.connect, &path, parents).await,
        Command::Mv { from, to } => mv(&cli.connect, &from, &to).await,
        Command::Notifications { follow } => notifications(&cli.connect, follow).await,
        Command::Failed { cache_dir, action } => failed(&cli.connect, cache_dir, action).await,
        Command::Status { cache_dir } => status(&cli.connect, cache_dir),
        Command::Login { profile } => login(cli.connect, profile).await,
        Command::Logout { profile } => logout(cli.connect, profile),
        Command::Mount(_) => bail!("mount runs outside the async runtime"),
        Command::Manual(_) => bail!("written without a server"),
    }
}

async fn ls(args: &ConnectArgs, long: bool, human: bool, path: Option<String>) -> Result<()> {
    let (client, _events) = connect(args).await?;
    let Some(path) = path else {
        for user in client.list_users().await? {
            println!("{}", shell_escape(&user));
        }
        return Ok(());
    };
    let (owner, inside) = paths::split_owner(&path);
    let entry = client
        .resolve(owner, inside)
        .await
        .map_err(|e| anyhow!("{path}: {e}"))?;
    let show = |f: &FileInfo| {
        if long {
            println!("{}", display::long_line(f, human));
        } else {
            println!("{}", shell_escape(&f.name));
        }
    };
    if entry.kind != EntryKind::Dir {
        show(&entry);
        return Ok(());
    }
    for f in client
        .list(owner, entry.id)
        .await
        .map_err(|e| anyhow!("{path}: {e}"))?
    {
        show(&f);
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

/// A progress line for a walk over a tree (stderr, when it is a terminal).
fn tree_progress(what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

fn show_progress(bar: &Option<ProgressBar>, what: &str, p: paths::Progress) {
    if let Some(b) = bar {
        b.set_message(format!(
            "{what}: {} files, {} directories, {} links, {} bytes",
            p.files, p.dirs, p.links, p.bytes
        ));
    }
}

async fn put(args: &ConnectArgs, src: &Path, path: Option<String>, recursive: bool) -> Result<()> {
    let src_name = src.file_name().and_then(|n| n.to_str()).map(str::to_string);
    let (client, _events) = connect(args).await?;
    let me = client.user().to_string();
    let path = path.unwrap_or_default();
    // Into PATH when it is a directory (or ends with '/'), else as PATH.
    let into = path.is_empty()
        || path.ends_with('/')
        || client
            .resolve(&me, &path)
            .await
            .is_ok_and(|e| e.kind == EntryKind::Dir);
    let dest = if into {
        let Some(name) = src_name else {
            bail!("{}: cannot derive a name; give PATH", src.display());
        };
        format!("{}/{name}", path.trim_end_matches('/'))
    } else {
        path
    };
    let bar = if recursive {
        tree_progress("uploading")
    } else {
        let size = std::fs::metadata(src).ok().map(|m| m.len());
        progress_bar(size, &dest)
    };
    let done = paths::put(&client, src, &dest, recursive, |p| {
        if recursive {
            show_progress(&bar, "uploading", p)
        } else if let Some(b) = &bar {
            b.set_position(p.bytes)
        }
    })
    .await
    .map_err(|e| anyhow!("{}: {e}", src.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let dest = dest.trim_matches('/');
    if recursive {
        eprintln!(
            "uploaded {} to {}/{} ({} files, {} directories, {} links, {} bytes)",
            src.display(),
            shell_escape(&me),
            shell_escape(dest),
            done.files,
            done.dirs,
            done.links,
            done.bytes
        );
    } else {
        eprintln!(
            "uploaded {}/{} ({} bytes)",
            shell_escape(&me),
            shell_escape(dest),
            done.bytes
        );
    }
    Ok(())
}

async fn get(
    args: &ConnectArgs,
    path: &str,
    dest: Option<PathBuf>,
    recursive: bool,
    force: bool,
) -> Result<()> {
    let (owner, inside) = paths::split_owner(path);
    if inside.is_empty() && !recursive {
        bail!("{path}: expected OWNER/PATH");
    }
    let (client, _events) = connect(args).await?;
    if dest.as_deref() == Some(Path::new("-")) {
        let entry = client
            .resolve(owner, inside)
            .await
            .map_err(|e| named(path, e))?;
        if entry.kind != EntryKind::File {
            bail!("{path}: not a regular file");
        }
        let mut out = tokio::io::stdout();
        transfer::download(&client, owner, entry.id, &mut out, |_, _| {}).await?;
        return Ok(());
    }
    let name = inside
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or(owner)
        .to_string();
    let dest = match dest {
        Some(d) if d.is_dir() => d.join(&name),
        Some(d) => d,
        None => PathBuf::from(&name),
    };
    let bar = if recursive {
        tree_progress("downloading")
    } else {
        progress_bar(None, &name)
    };
    paths::get(&client, owner, inside, &dest, recursive, force, |p| {
        if recursive {
            show_progress(&bar, "downloading", p)
        } else if let Some(b) = &bar {
            b.set_position(p.bytes)
        }
    })
    .await
    .map_err(|e| named(path, e))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}

/// The mount's cache directory: `given`, else the profile's, else the default one.
fn cache_dir_of(args: &ConnectArgs, given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir);
    }
    let who = args.identity().map_err(anyhow::Error::msg)?;
    Ok(who
        .profile
        .mount
        .cache_dir
        .clone()
        .unwrap_or_else(|| sharefs_client::mount::default_cache_dir(&who.user, &who.server)))
}

fn status(args: &ConnectArgs, cache_dir: Option<PathBuf>) -> Result<()> {
    let cache_dir = cache_dir_of(args, cache_dir)?;
    match sharefs_client::status::read(&cache_dir) {
        Some(s) => {
            println!(
                "mounted: {}@{} at {} (pid {})",
                s.user,
                s.server,
                shell_escape(&s.mountpoint.to_string_lossy()),
                s.pid
            );
            let since = UNIX_EPOCH + Duration::from_millis(s.since_ms.max(0) as u64);
            println!(
                "connection: {} since {}",
                if s.connected {
                    "up"
                } else {
                    "DOWN, reconnecting"
                },
                display::local_time(since)
            );
            println!("uploads in progress: {}", s.uploads);
            for u in &s.uploading {
                println!(
                    "  {:>6}  {}",
                    display::human_size(u.size),
                    shell_escape(&u.name)
                );
            }
        }
        None => println!(
            "not mounted (no running mount uses {})",
            shell_escape(&cache_dir.to_string_lossy())
        ),
    }
    let kept = sharefs_client::failed::list(&sharefs_client::failed::failed_dir(&cache_dir))?;
    let bytes: u64 = kept.iter().map(|k| k.size).sum();
    println!(
        "failed uploads kept here: {}{}",
        kept.len(),
        if kept.is_empty() {
            String::new()
        } else {
            format!(
                " ({} in all; see `sharefs failed list`)",
                display::human_size(bytes)
            )
        }
    );
    for k in &kept {
        println!(
            "  {:>6}  {}  {}",
            display::human_size(k.size),
            display::local_time(k.when),
            shell_escape(&k.name)
        );
    }
    Ok(())
}

async fn failed(
    args: &ConnectArgs,
    cache_dir: Option<PathBuf>,
    action: FailedAction,
) -> Result<()> {
    let cache_dir = cache_dir_of(args, cache_dir)?;
    let dir = sharefs_client::failed::failed_dir(&cache_dir);
    match action {
        FailedAction::List => {
            for k in sharefs_client::failed::list(&dir)? {
                println!(
                    "{}  {:>6}  {}  {}",
                    shell_escape(&k.id),
                    display::human_size(k.size),
                    display::local_time(k.when),
                    shell_escape(&k.name)
                );
            }
        }
        FailedAction::Retry { id, path } => {
            let kept = sharefs_client::failed::find(&dir, &id).map_err(anyhow::Error::msg)?;
            put(args, &kept.path, Some(path.unwrap_or(kept.name)), false).await?;
            std::fs::remove_file(&kept.path)?;
        }
        FailedAction::Discard { ids } => {
            for id in ids {
                let kept = sharefs_client::failed::find(&dir, &id).map_err(anyhow::Error::msg)?;
                std::fs::remove_file(&kept.path)?;
                eprintln!(
                    "discarded {} ({} bytes)",
                    shell_escape(&kept.name),
                    kept.size
                );
            }
        }
    }
    Ok(())
}

/// `connect` with the positional PROFILE of login/logout, which wins over --profile.
fn with_profile(mut args: ConnectArgs, profile: Option<String>) -> ConnectArgs {
    if profile.is_some() {
        args.profile = profile;
    }
    args
}

async fn login(args: ConnectArgs, profile: Option<String>) -> Result<()> {
    let args = with_profile(args, profile);
    let who = args.identity().map_err(anyhow::Error::msg)?;
    let password = match &args.password_file {
        Some(path) => settings::read_password_file(path).map_err(anyhow::Error::msg)?,
        None if std::io::stdin().is_terminal() => {
            rpassword::prompt_password(format!("Password for {}@{}: ", who.user, who.server))?
        }
        None => {
            // Piped in (`... | sharefs login`), never on the command line.
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    // Checked before it is stored: a typo is caught now, not at the next mount.
    let opts = args
        .options(&who, password.clone())
        .map_err(anyhow::Error::msg)?;
    RemoteClient::connect(&opts).await?;
    let store = tokio::task::spawn_blocking(move || {
        login::store(&who.server, &who.user, &password).map(|s| (s, who))
    })
    .await??;
    let (store, who) = store;
    eprintln!(
        "stored the password of {}@{} in {store}",
        who.user, who.server
    );
    Ok(())
}

fn logout(args: ConnectArgs, profile: Option<String>) -> Result<()> {
    let args = with_profile(args, profile);
    let who = args.identity().map_err(anyhow::Error::msg)?;
    let removed = login::remove(&who.server, &who.user)?;
    if removed.is_empty() {
        eprintln!("no stored password for {}@{}", who.user, who.server);
    }
    for store in removed {
        eprintln!(
            "removed the password of {}@{} from {store}",
            who.user, who.server
        );
    }
    Ok(())
}

/// An error about `path`, which the server's own message may name already.
fn named(path: &str, e: ClientError) -> anyhow::Error {
    let text = e.to_string();
    let (owner, inside) = paths::split_owner(path);
    if !inside.is_empty() && text.starts_with(&format!("{owner}/{inside}")) {
        anyhow!("{text}")
    } else {
        anyhow!("{path}: {text}")
    }
}

/// An error about `path` of my tree; when nothing is there and the path starts with
/// another user's name, says that their trees cannot be changed.
async fn mine_or_refused(client: &RemoteClient, path: &str, e: ClientError) -> anyhow::Error {
    let (first, _) = paths::split_owner(path);
    if e.code() == Some(ErrorCode::NotFound) && first != client.user() {
        if let Ok(users) = client.list_users().await {
            if users.iter().any(|u| u == first) {
                return anyhow!("{path}: permission denied: only your own folder can be changed");
            }
        }
    }
    anyhow!("{path}: {e}")
}

async fn rm(args: &ConnectArgs, path: &str, recursive: bool) -> Result<()> {
    let (client, _events) = connect(args).await?;
    let bar = if recursive {
        tree_progress("removing")
    } else {
        None
    };
    let result = paths::remove(&client, path, recursive, |p| {
        show_progress(&bar, "removing", p)
    })
    .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    match result {
        Ok(_) => Ok(()),
        Err(e) => Err(mine_or_refused(&client, path, e).await),
    }
}

async fn mkdir(args: &ConnectArgs, path: &str, parents: bool) -> Result<()> {
    let (client, _events) = connect(args).await?;
    let made = if parents {
        paths::mkdir_p(&client, path).await
    } else {
        paths::mkdir(&client, path).await
    };
    match made {
        Ok(_) => Ok(()),
        Err(e) => Err(mine_or_refused(&client, path, e).await),
    }
}

async fn mv(args: &ConnectArgs, from: &str, to: &str) -> Result<()> {
    let (client, _events) = connect(args).await?;
    match paths::rename(&client, from, to).await {
        Ok(_) => Ok(()),
        Err(e) => Err(mine_or_refused(&client, from, e).await),
    }
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
        display::local_time(t),
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
