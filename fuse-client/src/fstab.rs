//! How mount(8) and /etc/fstab run sharefs: `mount -t fuse.sharefs alice@host:7070 DIR
//! -o OPTIONS` runs `/sbin/mount.fuse.sharefs alice@host:7070 DIR -o OPTIONS` (a link to
//! the `sharefs` binary), and fuse3's `mount.fuse3` runs `sharefs alice@host:7070 DIR -o
//! OPTIONS`. Both are translated here into the ordinary command line, `sharefs --server
//! host:7070 --user alice ... mount DIR ...`, which clap then parses like any other: one
//! parser, one set of checks, and the mount daemonises as `sharefs mount` does (mount(8)
//! waits for the helper to exit with the mount in place).
//!
//! Options that mount(8), systemd and fstab conventions add for themselves (`_netdev`,
//! `x-systemd.automount`, `user`, `noauto`, `nofail`, `rw`, `nosuid`, ...) are ignored;
//! sharefs's own are `allow_other`, `password_file=`, `profile=`, `server_fingerprint=`,
//! `ca=`, `known_servers=`, `plaintext`, `cache_dir=`, `timeout=`, `connect_timeout=`,
//! `threads=`, `foreground`; anything else is an error, so a misspelt option is not
//! silently dropped.

use std::ffi::{OsStr, OsString};

/// Names under which the binary is the mount(8) helper.
const HELPER_NAMES: [&str; 2] = ["mount.fuse.sharefs", "mount.sharefs"];

/// What a mount(8)-style invocation asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Not the mount(8) convention: the command line as it is.
    Plain,
    /// The ordinary command line that does the same mount.
    Mount(Vec<OsString>),
    /// `-f` (fake): mount(8) asks for everything but the mount itself.
    Fake,
}

/// Options mount(8), systemd or fstab add that mean nothing to sharefs (or that a FUSE
/// mount has anyway: sharefs mounts are always nodev and nosuid).
fn ignored(opt: &str) -> bool {
    const IGNORED: [&str; 22] = [
        "_netdev",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "auto",
        "noauto",
        "nofail",
        "rw",
        "defaults",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "noexec",
        "atime",
        "noatime",
        "relatime",
        "async",
        "default_permissions",
    ];
    IGNORED.contains(&opt)
        || opt.starts_with("x-")
        || opt.starts_with("comment=")
        || opt == "nodiratime"
        || opt == "strictatime"
}

/// Classifies `argv`, translating a mount(8)-style one.
pub fn translate(argv: &[OsString]) -> Result<Invocation, String> {
    let name = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(OsStr::to_str)
        .unwrap_or("");
    let as_helper = HELPER_NAMES.contains(&name);
    // mount.fuse3 runs `sharefs SOURCE DIR -o OPTIONS`: a first argument that is no
    // subcommand or flag but names a user at a server.
    let as_fuse_type = argv
        .get(1)
        .and_then(|a| a.to_str())
        .is_some_and(|a| !a.starts_with('-') && a.contains('@') && argv.len() >= 3);
    if !as_helper && !as_fuse_type {
        return Ok(Invocation::Plain);
    }
    let mut positional: Vec<&OsString> = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let mut fake = false;
    let mut rest = argv.iter().skip(1);
    while let Some(arg) = rest.next() {
        let text = arg.to_str();
        match text {
            Some("-o") => {
                let value = rest.next().ok_or("-o needs a value")?;
                let value = value.to_str().ok_or("mount options must be UTF-8")?;
                options.extend(value.split(',').map(str::to_string));
            }
            Some(o) if o.starts_with("-o") => {
                options.extend(o[2..].split(',').map(str::to_string));
            }
            // -t TYPE: we know our type.
            Some("-t") => {
                rest.next();
            }
            Some("-f" | "-fn" | "-nf") => fake = true,
            // No mtab to skip writing, nothing more to say, sloppy is ignored anyway.
            Some("-n" | "-s" | "-v") => {}
            Some(o) if o.starts_with('-') => {
                return Err(format!("unsupported mount helper flag {o}"));
            }
            _ => positional.push(arg),
        }
    }
    let [source, dir] = positional[..] else {
        return Err(format!(
            "usage: {name} [USER@]HOST:PORT MOUNTPOINT [-o OPTIONS] (got {} arguments)",
            positional.len()
        ));
    };
    if fake {
        return Ok(Invocation::Fake);
    }
    let source = source.to_str().ok_or("the source must be UTF-8")?;
    let source = source.strip_prefix("sharefs#").unwrap_or(source);
    let source = source.strip_prefix("sharefs:").unwrap_or(source);
    let mut global: Vec<OsString> = vec!["sharefs".into()];
    let mut mount: Vec<OsString> = vec!["mount".into(), dir.clone()];
    match source.split_once('@') {
        Some((user, server)) => global.extend([
            "--user".into(),
            user.into(),
            "--server".into(),
            server.into(),
        ]),
        None if !source.is_empty() => global.extend(["--server".into(), source.into()]),
        None => {}
    }
    for opt in options.iter().filter(|o| !o.is_empty()) {
        if ignored(opt) {
            continue;
        }
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt.as_str(), None),
        };
        let valued = |flag: &str, into: &mut Vec<OsString>| -> Result<(), String> {
            let v = value.ok_or_else(|| format!("mount option {key} needs a value ({key}=...)"))?;
            into.extend([flag.into(), v.into()]);
            Ok(())
        };
        match key {
            "allow_other" => mount.push("--allow-other".into()),
            "foreground" => mount.push("--foreground".into()),
            "plaintext" => global.push("--plaintext".into()),
            "password_file" => valued("--password-file", &mut global)?,
            "profile" => valued("--profile", &mut global)?,
            "server_fingerprint" => valued("--server-fingerprint", &mut global)?,
            "ca" => valued("--ca", &mut global)?,
            "known_servers" => valued("--known-servers", &mut global)?,
            "connect_timeout" => valued("--connect-timeout", &mut global)?,
            "cache_dir" => valued("--cache-dir", &mut mount)?,
            "timeout" => valued("--timeout", &mut mount)?,
            "threads" => valued("--threads", &mut mount)?,
            "ro" => return Err("read-only sharefs mounts are not supported (ro)".into()),
            _ => return Err(format!("unknown mount option {opt}")),
        }
    }
    global.extend(mount);
    Ok(Invocation::Mount(global))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn plain_command_lines_are_left_alone() {
        for argv in [
            &["sharefs", "ls", "alice"][..],
            &["sharefs", "--user", "a@b", "ls"],
            &["/usr/bin/sharefs", "mount", "/mnt"],
            &["sharefs"],
        ] {
            assert_eq!(translate(&args(argv)), Ok(Invocation::Plain), "{argv:?}");
        }
    }

    #[test]
    fn the_helper_convention_becomes_a_mount_command() {
        let argv = args(&[
            "/sbin/mount.fuse.sharefs",
            "alice@files.example:7070",
            "/home/alice/Share",
            "-o",
            "rw,nosuid,nodev,_netdev,x-systemd.automount,user,noauto,allow_other,password_file=/etc/pw",
        ]);
        assert_eq!(
            translate(&argv),
            Ok(Invocation::Mount(args(&[
                "sharefs",
                "--user",
                "alice",
                "--server",
                "files.example:7070",
                "--password-file",
                "/etc/pw",
                "mount",
                "/home/alice/Share",
                "--allow-other",
            ])))
        );
        // mount.fuse3's form, with the options glued to -o and a fake run.
        let argv = args(&["sharefs", "bob@h:1", "/m", "-otimeout=5,threads=2"]);
        assert_eq!(
            translate(&argv),
            Ok(Invocation::Mount(args(&[
                "sharefs",
                "--user",
                "bob",
                "--server",
                "h:1",
                "mount",
                "/m",
                "--timeout",
                "5",
                "--threads",
                "2",
            ])))
        );
        let argv = args(&["mount.sharefs", "bob@h:1", "/m", "-f", "-o", "rw"]);
        assert_eq!(translate(&argv), Ok(Invocation::Fake));
    }

    #[test]
    fn unknown_or_incomplete_options_are_errors() {
        let run = |opts: &str| translate(&args(&["mount.fuse.sharefs", "a@h:1", "/m", "-o", opts]));
        assert!(run("allow_otter").unwrap_err().contains("allow_otter"));
        assert!(run("password_file").unwrap_err().contains("needs a value"));
        assert!(run("ro").is_err());
        assert!(translate(&args(&["mount.fuse.sharefs", "a@h:1"])).is_err());
        assert!(translate(&args(&["mount.fuse.sharefs", "a@h:1", "/m", "-N", "x"])).is_err());
    }
}
