//! `sharefs failed list|retry|discard`: the uploads a mount could not make, whose data
//! it kept in its cache's `failed/` folder (see `fs/staging.rs`), each as
//! `<unix time>-<n>-<name>`. The file name is the id the commands take; the name is
//! what the file was to be called (its folder is not recorded, so a retry goes to my
//! folder's top unless told where).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One kept upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// Its file name in `failed/`.
    pub id: String,
    /// The name it was to be uploaded as.
    pub name: String,
    pub size: u64,
    /// When it was kept.
    pub when: SystemTime,
    pub path: PathBuf,
}

/// `failed/` of a mount's cache directory.
pub fn failed_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("failed")
}

/// Splits `<time>-<n>-<name>`; other names are kept as they are.
fn parse(id: &str) -> (Option<u64>, &str) {
    let mut parts = id.splitn(3, '-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(t), Some(n), Some(name)) if n.parse::<u32>().is_ok() => match t.parse() {
            Ok(secs) => (Some(secs), name),
            Err(_) => (None, id),
        },
        _ => (None, id),
    }
}

/// The kept uploads in `dir`, oldest first (none if it does not exist).
pub fn list(dir: &Path) -> std::io::Result<Vec<Kept>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        let id = entry.file_name().to_string_lossy().into_owned();
        let (secs, name) = parse(&id);
        let when = secs
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
            .or_else(|| meta.modified().ok())
            .unwrap_or(UNIX_EPOCH);
        out.push(Kept {
            name: name.to_string(),
            id,
            size: meta.len(),
            when,
            path: entry.path(),
        });
    }
    out.sort_by(|a, b| (a.when, &a.id).cmp(&(b.when, &b.id)));
    Ok(out)
}

/// The kept upload `id` in `dir`.
pub fn find(dir: &Path, id: &str) -> Result<Kept, String> {
    list(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .into_iter()
        .find(|k| k.id == id)
        .ok_or_else(|| format!("{id}: no such failed upload in {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_files_are_listed_with_their_names_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        assert!(list(&dir.path().join("none")).unwrap().is_empty());
        std::fs::write(dir.path().join("1700000100-0-b-c.txt"), b"12345").unwrap();
        std::fs::write(dir.path().join("1700000000-1-a.txt"), b"1").unwrap();
        std::fs::write(dir.path().join("odd"), b"").unwrap();
        let kept = list(dir.path()).unwrap();
        let names: Vec<&str> = kept.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names[..2], ["a.txt", "b-c.txt"]);
        assert_eq!(kept[1].size, 5);
        assert!(names.contains(&"odd"));
        assert_eq!(find(dir.path(), "1700000000-1-a.txt").unwrap().size, 1);
        assert!(find(dir.path(), "nope").is_err());
    }
}
