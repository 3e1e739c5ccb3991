//! Paths of the command line (`OWNER/a/b/c`) and the operations on whole trees the
//! protocol's one-entry requests are combined into: `mkdir -p`, `put -r`, `get -r`,
//! `rm -r` and `mv`. Every walk keeps an explicit stack (no recursion, so any depth is
//! fine) and reports its progress as counts.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use sharefs_protocol::name::split_path;
use sharefs_protocol::{EntryKind, ErrorBody, ErrorCode, FileInfo, DEFAULT_DIR_MODE, ROOT_ID};

use crate::error::{ClientError, Result};
use crate::remote::{AttrChange, Move, RemoteClient, UploadTarget};
use crate::transfer;

fn refused(code: ErrorCode, message: impl Into<String>) -> ClientError {
    ClientError::Remote(ErrorBody::new(code, message))
}

/// Splits `OWNER/a/b` into the owner and the path inside their tree (`""`: the folder).
pub fn split_owner(path: &str) -> (&str, &str) {
    let path = path.trim_start_matches('/');
    path.split_once('/').unwrap_or((path, ""))
}

/// The parent's path and the last name of a path inside a tree: `a/b/c` -> (`a/b`, `c`).
pub fn split_last(path: &str) -> Result<(String, String)> {
    let names = split_path(path).map_err(|e| refused(ErrorCode::InvalidName, e))?;
    let Some((last, dirs)) = names.split_last() else {
        return Err(refused(
            ErrorCode::InvalidArgument,
            "the folder itself has no name here",
        ));
    };
    Ok((dirs.join("/"), (*last).to_string()))
}

/// What a walk over a tree has done so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
}

/// The directory at `path` of the caller's tree, made with its missing parents (0755).
pub async fn mkdir_p(client: &RemoteClient, path: &str) -> Result<FileInfo> {
    let names = split_path(path).map_err(|e| refused(ErrorCode::InvalidName, e))?;
    let user = client.user().to_string();
    let mut dir = client.stat(&user, ROOT_ID).await?;
    for name in names {
        dir = child_dir(client, &user, dir.id, name).await?;
    }
    Ok(dir)
}

/// The directory `name` in `parent`, made if missing.
async fn child_dir(client: &RemoteClient, user: &str, parent: u64, name: &str) -> Result<FileInfo> {
    match client.lookup(user, parent, name).await {
        Ok(e) if e.kind == EntryKind::Dir => Ok(e),
        Ok(_) => Err(refused(
            ErrorCode::NotADirectory,
            format!("{name}: exists and is not a directory"),
        )),
        Err(e) if e.code() == Some(ErrorCode::NotFound) => {
            match client.mkdir(parent, name, DEFAULT_DIR_MODE).await {
                Ok(e) => Ok(e),
                // Made meanwhile by someone else: fine, as `mkdir -p` says.
                Err(e) if e.code() == Some(ErrorCode::Exists) => {
                    client.lookup(user, parent, name).await
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Makes the directory `path` of the caller's tree; its parent must exist.
pub async fn mkdir(client: &RemoteClient, path: &str) -> Result<FileInfo> {
    let (parent, name) = split_last(path)?;
    let parent = client.resolve(client.user(), &parent).await?;
    client.mkdir(parent.id, &name, DEFAULT_DIR_MODE).await
}

/// Removes `path` from the caller's tree: a file or link, or with `recursive` a
/// directory and everything below it, deepest first.
pub async fn remove(
    client: &RemoteClient,
    path: &str,
    recursive: bool,
    mut progress: impl FnMut(Progress),
) -> Result<Progress> {
    let user = client.user().to_string();
    let entry = client.resolve(&user, path).await?;
    let mut done = Progress::default();
    if entry.id == ROOT_ID {
        return Err(refused(
            ErrorCode::InvalidArgument,
            "refusing to remove your whole folder",
        ));
    }
    if entry.kind != EntryKind::Dir {
        client
            .remove(&user, entry.parent, &entry.name, false)
            .await?;
        done.files += 1;
        return Ok(done);
    }
    if !recursive {
        return Err(refused(
            ErrorCode::IsADirectory,
            format!("{path}: is a directory (remove it with -r)"),
        ));
    }
    // (directory, its parent, its name, whether its entries are gone already)
    let mut stack = vec![(entry.id, entry.parent, entry.name.clone(), false)];
    while let Some((id, parent, name, emptied)) = stack.pop() {
        if emptied {
            client.remove(&user, parent, &name, true).await?;
            done.dirs += 1;
            progress(done);
            continue;
        }
        stack.push((id, parent, name, true));
        for child in client.list(&user, id).await? {
            if child.kind == EntryKind::Dir {
                stack.push((child.id, id, child.name, false));
            } else {
                client.remove(&user, id, &child.name, false).await?;
                if child.kind == EntryKind::Symlink {
                    done.links += 1;
                } else {
                    done.files += 1;
                    done.bytes += child.size;
                }
                progress(done);
            }
        }
    }
    Ok(done)
}

/// Moves `from` to `to` within the caller's tree, as `mv` does: into `to` when it is an
/// existing directory, else to that path (replacing a file there).
pub async fn rename(client: &RemoteClient, from: &str, to: &str) -> Result<FileInfo> {
    let user = client.user().to_string();
    let entry = client.resolve(&user, from).await?;
    if entry.id == ROOT_ID {
        return Err(refused(
            ErrorCode::InvalidArgument,
            "your folder itself cannot move",
        ));
    }
    let (new_parent, new_name) = match client.resolve(&user, to).await {
        Ok(dir) if dir.kind == EntryKind::Dir && dir.id != entry.id => (dir.id, entry.name.clone()),
        Ok(_) | Err(_) => {
            let (parent, name) = split_last(to)?;
            (client.resolve(&user, &parent).await?.id, name)
        }
    };
    client
        .rename(&Move {
            parent: entry.parent,
            name: entry.name,
            new_parent,
            new_name,
            noreplace: false,
        })
        .await
}

fn mtime_ns(meta: &std::fs::Metadata) -> Option<i64> {
    use std::os::unix::fs::MetadataExt;
    Some(meta.mtime().checked_mul(1_000_000_000)? + meta.mtime_nsec())
}

fn local_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| {
            refused(
                ErrorCode::InvalidName,
                format!("{}: not a UTF-8 file name", path.display()),
            )
        })
}

/// Uploads the local file `src` as `name` in directory `parent`, with its mode and mtime.
async fn put_file(
    client: &RemoteClient,
    src: &Path,
    parent: u64,
    name: &str,
    mut progress: impl FnMut(u64),
) -> Result<FileInfo> {
    let f = tokio::fs::File::open(src).await?;
    let meta = f.metadata().await?;
    let target = UploadTarget {
        parent,
        name: name.to_string(),
        replace: None,
        mode: Some(meta.permissions().mode() & 0o7777),
        mtime_ns: mtime_ns(&meta),
    };
    let reader = tokio::io::BufReader::with_capacity(1 << 20, f);
    transfer::upload(client, &target, reader, Some(meta.len()), &mut progress).await
}

/// Uploads `src` (a file, or with `recursive` a directory and all below it) to `dest`, a
/// path in the caller's tree: the new entry's own path. Modes, mtimes and symbolic links
/// are kept; what is there already is replaced file by file.
pub async fn put(
    client: &RemoteClient,
    src: &Path,
    dest: &str,
    recursive: bool,
    mut progress: impl FnMut(Progress),
) -> Result<Progress> {
    let user = client.user().to_string();
    let (parent_path, name) = split_last(dest)?;
    let parent = client.resolve(&user, &parent_path).await?;
    let meta = tokio::fs::symlink_metadata(src).await?;
    let mut done = Progress::default();
    if !meta.is_dir() {
        put_one(client, &user, src, &meta, parent.id, &name, &mut done).await?;
        progress(done);
        return Ok(done);
    }
    if !recursive {
        return Err(refused(
            ErrorCode::IsADirectory,
            format!("{}: is a directory (upload it with -r)", src.display()),
        ));
    }
    let top = child_dir(client, &user, parent.id, &name).await?;
    // Directories are finished (mode, mtime) after their content, deepest first.
    let mut finish: Vec<(u64, std::fs::Metadata)> = vec![(top.id, meta)];
    let mut stack: Vec<(PathBuf, u64)> = vec![(src.to_path_buf(), top.id)];
    done.dirs += 1;
    while let Some((dir, id)) = stack.pop() {
        let mut entries = tokio::fs::read_dir(&dir).await?;
        while let Some(e) = entries.next_entry().await? {
            let path = e.path();
            let name = local_name(&path)?;
            let meta = tokio::fs::symlink_metadata(&path).await?;
            if meta.is_dir() {
                let sub = child_dir(client, &user, id, &name).await?;
                done.dirs += 1;
                finish.push((sub.id, meta));
                stack.push((path, sub.id));
            } else {
                put_one(client, &user, &path, &meta, id, &name, &mut done).await?;
            }
            progress(done);
        }
    }
    for (id, meta) in finish.into_iter().rev() {
        let change = AttrChange {
            mode: Some(meta.permissions().mode() & 0o7777),
            atime_ns: None,
            mtime_ns: mtime_ns(&meta),
        };
        client.setattr(id, &change).await?;
    }
    Ok(done)
}

/// Uploads one file or symbolic link (other kinds are skipped with a warning).
async fn put_one(
    client: &RemoteClient,
    user: &str,
    path: &Path,
    meta: &std::fs::Metadata,
    parent: u64,
    name: &str,
    done: &mut Progress,
) -> Result<()> {
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = tokio::fs::read_link(path).await?;
        let target = target.to_str().ok_or_else(|| {
            refused(
                ErrorCode::InvalidName,
                format!("{}: link target is not UTF-8", path.display()),
            )
        })?;
        match client.symlink(parent, name, target).await {
            Err(e) if e.code() == Some(ErrorCode::Exists) => {
                client.remove(user, parent, name, false).await?;
                client.symlink(parent, name, target).await?;
            }
            other => {
                other?;
            }
        }
        done.links += 1;
    } else if kind.is_file() {
        let before = done.bytes;
        let info = put_file(client, path, parent, name, |n| done.bytes = before + n).await?;
        done.bytes = before + info.size;
        done.files += 1;
    } else {
        tracing::warn!(path = %path.display(), "skipped: not a file, directory or link");
    }
    Ok(())
}

/// Downloads `owner`'s entry at `path` to the local `dest` (a file, or with `recursive` a
/// directory and all below it), keeping modes, mtimes and symbolic links. Files are
/// written to a temp file and renamed into place, so an interruption leaves no partial
/// file under a final name. An existing local file or link is replaced only with
/// `overwrite`; without it the download stops there with `AlreadyExists`.
pub async fn get(
    client: &RemoteClient,
    owner: &str,
    path: &str,
    dest: &Path,
    recursive: bool,
    overwrite: bool,
    mut progress: impl FnMut(Progress),
) -> Result<Progress> {
    let entry = client.resolve(owner, path).await?;
    let mut done = Progress::default();
    if entry.kind != EntryKind::Dir {
        get_one(client, owner, &entry, dest, overwrite, &mut done).await?;
        progress(done);
        return Ok(done);
    }
    if !recursive {
        return Err(refused(
            ErrorCode::IsADirectory,
            format!("{owner}/{path}: is a directory (download it with -r)"),
        ));
    }
    let mut finish: Vec<(PathBuf, FileInfo)> = Vec::new();
    let mut stack = vec![(entry, dest.to_path_buf())];
    while let Some((dir, local)) = stack.pop() {
        match tokio::fs::create_dir(&local).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && local.is_dir() => {}
            Err(e) => return Err(e.into()),
        }
        done.dirs += 1;
        for child in client.list(owner, dir.id).await? {
            let to = local.join(&child.name);
            if child.kind == EntryKind::Dir {
                stack.push((child, to));
            } else {
                get_one(client, owner, &child, &to, overwrite, &mut done).await?;
                progress(done);
            }
        }
        finish.push((local, dir));
    }
    for (local, dir) in finish.into_iter().rev() {
        set_local_attrs(&local, &dir)?;
    }
    Ok(done)
}

async fn get_one(
    client: &RemoteClient,
    owner: &str,
    entry: &FileInfo,
    dest: &Path,
    overwrite: bool,
    done: &mut Progress,
) -> Result<()> {
    if !overwrite && tokio::fs::symlink_metadata(dest).await.is_ok() {
        return Err(exists(dest));
    }
    if entry.kind == EntryKind::Symlink {
        let target = entry.target.clone().unwrap_or_default();
        if overwrite {
            let _ = tokio::fs::remove_file(dest).await;
        }
        tokio::fs::symlink(&target, dest).await?;
        done.links += 1;
        return Ok(());
    }
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".sharefs-get-")
        .tempfile_in(&dir)?;
    let (std_file, tmp_path) = tmp.into_parts();
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(std_file));
    let before = done.bytes;
    let info = transfer::download(client, owner, entry.id, &mut out, |n, _| {
        done.bytes = before + n;
    })
    .await?;
    let file = out.into_inner();
    file.sync_all().await?;
    drop(file);
    // Without `overwrite`, a file that appeared during the download is not replaced.
    let persisted = if overwrite {
        tmp_path.persist(dest)
    } else {
        tmp_path.persist_noclobber(dest)
    };
    persisted.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            exists(dest)
        } else {
            ClientError::Io(format!("{}: {}", dest.display(), e.error))
        }
    })?;
    set_local_attrs(dest, &info)?;
    done.files += 1;
    Ok(())
}

/// The refusal to replace an existing local file.
fn exists(dest: &Path) -> ClientError {
    ClientError::Io(format!(
        "{}: already exists (use --force to overwrite)",
        dest.display()
    ))
}

/// Gives a downloaded file or directory its mode (permission bits) and mtime.
fn set_local_attrs(local: &Path, entry: &FileInfo) -> Result<()> {
    // Times first: a mode without read permission would keep the file from opening.
    let mtime = UNIX_EPOCH + Duration::from_nanos(entry.mtime_ns.max(0) as u64);
    let f = std::fs::File::open(local)?;
    f.set_times(std::fs::FileTimes::new().set_modified(mtime))?;
    drop(f);
    std::fs::set_permissions(local, std::fs::Permissions::from_mode(entry.mode & 0o777))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_and_last_names() {
        assert_eq!(split_owner("bob/a/b.txt"), ("bob", "a/b.txt"));
        assert_eq!(split_owner("/bob"), ("bob", ""));
        assert_eq!(
            split_last("a/b/c").unwrap(),
            ("a/b".to_string(), "c".to_string())
        );
        assert_eq!(split_last("c").unwrap(), (String::new(), "c".to_string()));
        assert!(split_last("").is_err());
        assert!(split_last("a/../b").is_err());
    }
}
