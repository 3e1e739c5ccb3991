//! The mount point before mounting: what is mounted there already, from
//! `/proc/self/mountinfo`.
//!
//! A sharefs mount whose process died (`kill -9`, a crash) stays in the mount table with
//! no one serving it: every access fails with ENOTCONN until someone unmounts it. `sharefs
//! mount` on such a mount point detaches the dead mount (`fusermount3 -u -z`: lazily, so a
//! process still holding a descriptor there does not block it) and mounts anew. Only a
//! dead mount that is sharefs's own, at exactly that path, is cleared; any live mount
//! there is refused (mounts do not stack), as is anything else that answers ENOTCONN,
//! and so is a directory that is not empty (the mount would hide its content).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted filesystem.
    pub dev: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    /// Whether a sharefs mount made this entry (`fuse.sharefs`, or plain `fuse` with a
    /// `sharefs:` source where the subtype was not recorded).
    pub fn is_sharefs(&self) -> bool {
        self.fstype == "fuse.sharefs"
            || (self.fstype == "fuse" && self.source.starts_with("sharefs:"))
    }
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo's path fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses one mountinfo line: `id parent major:minor root mountpoint options
/// [optional fields] - fstype source super-options`.
fn parse_line(line: &str) -> Option<MountEntry> {
    let (head, tail) = line.split_once(" - ")?;
    let head: Vec<&str> = head.split(' ').collect();
    let mut tail = tail.split(' ');
    Some(MountEntry {
        dev: head.get(2)?.to_string(),
        mountpoint: PathBuf::from(unescape(head.get(4)?)),
        fstype: tail.next()?.to_string(),
        source: unescape(tail.next()?),
    })
}

/// The entry mounted last (the one visible) at exactly `path`, which must be absolute and
/// free of symlinks.
pub fn mounted_at(path: &Path) -> Option<MountEntry> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .rev()
        .filter_map(parse_line)
        .find(|e| e.mountpoint == path)
}

/// `path` as mountinfo spells it: absolute, with the symlinks of its parent resolved. The
/// last component is not followed, since following it means asking the (maybe dead)
/// mount itself.
fn resolved(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).with_context(|| path.display().to_string())?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(std::fs::canonicalize(parent)
            .with_context(|| parent.display().to_string())?
            .join(name)),
        _ => std::fs::canonicalize(&abs).with_context(|| abs.display().to_string()),
    }
}

/// Makes `mountpoint` ready to be mounted on: clears a dead sharefs mount there; refuses
/// a live one.
pub fn prepare(mountpoint: &Path) -> Result<()> {
    match std::fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            let target = resolved(mountpoint)?;
            match mounted_at(&target) {
                Some(entry) if entry.is_sharefs() => {
                    tracing::warn!(
                        mountpoint = %target.display(),
                        source = %entry.source,
                        "the mount point is a sharefs mount whose process ended; unmounting it"
                    );
                    detach(&target)
                }
                _ => Err(e).with_context(|| format!("mount point {}", mountpoint.display())),
            }
        }
        Err(e) => Err(e).with_context(|| format!("mount point {}", mountpoint.display())),
        Ok(_) => {
            // A path that cannot be resolved is no mount point we know of: the mount
            // itself will say what is wrong with it.
            let mounted = resolved(mountpoint)
                .ok()
                .and_then(|target| mounted_at(&target));
            if let Some(entry) = mounted {
                let how = if entry.is_sharefs() {
                    format!(
                        "; unmount it first with fusermount3 -u {}",
                        mountpoint.display()
                    )
                } else {
                    String::new()
                };
                bail!(
                    "{} is already mounted ({} {}){how}",
                    mountpoint.display(),
                    entry.fstype,
                    entry.source,
                );
            }
            // Like fusermount: the mount would hide what the directory holds.
            let mut entries = std::fs::read_dir(mountpoint)
                .with_context(|| format!("mount point {}", mountpoint.display()))?;
            if entries.next().is_some() {
                bail!(
                    "{} is not empty: mounting there would hide its content",
                    mountpoint.display()
                );
            }
            Ok(())
        }
    }
}

/// `fusermount3 -u -z`: detaches the mount now, however busy.
fn detach(target: &Path) -> Result<()> {
    let out = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(target)
        .stdin(Stdio::null())
        .output()
        .context("running fusermount3")?;
    if !out.status.success() {
        bail!(
            "cannot unmount the dead mount at {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let line = "57 29 0:52 / /tmp/my\\040share rw,nosuid,nodev,noatime shared:1 - \
                    fuse.sharefs sharefs:alice@host:7000 rw,user_id=0,group_id=0";
        let e = parse_line(line).unwrap();
        assert_eq!(e.dev, "0:52");
        assert_eq!(e.mountpoint, Path::new("/tmp/my share"));
        assert_eq!(e.fstype, "fuse.sharefs");
        assert_eq!(e.source, "sharefs:alice@host:7000");
        assert!(e.is_sharefs());
        let other = parse_line("1 0 8:1 / / rw - ext4 /dev/sda1 rw").unwrap();
        assert!(!other.is_sharefs());
        let fuse = parse_line("2 1 0:9 / /m rw - fuse sshfs#x: rw").unwrap();
        assert!(!fuse.is_sharefs());
        assert_eq!(parse_line("garbage"), None);
        assert_eq!(unescape("a\\134b\\0"), "a\\b\\0");
    }
}
