//! Folders written by the flat layout of protocol 1 become trees on first load: every file
//! becomes an entry of the root, with a fresh id, mode 0644 and its content where it was
//! (blobs and packs are not touched). Two flat layouts exist: a `snapshot.json` with
//! `files` and a journal of `put`/`delete`/`rename` records, and the older one metadata
//! file per user file (`<hash>.meta`).
//!
//! The migration writes one new-format snapshot naming a new journal (created and made
//! durable first), by temp file, fsync and rename. Until that rename the flat files are
//! what a load reads, untouched, so a crash at any moment leaves either the flat folder
//! (migrated again at the next start) or the migrated one (whose load removes the flat
//! journals and metadata files left behind).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sharefs_protocol::{EntryKind, DEFAULT_FILE_MODE, ROOT_ID};

use super::digest::Digest;
use super::journal::{journal_name, parse_records, write_snapshot, SNAPSHOT};
use super::packed_content_intact;
use super::tree::{Content, Node, PackRef};
use crate::error::{Result, ServerError};

/// A file of the flat layout, as its snapshots, journal records and `.meta` files hold it.
#[derive(Debug, Clone, Deserialize)]
struct FlatFile {
    name: String,
    size: u64,
    mtime_ns: i64,
    version: u64,
    blake3: String,
    /// The blob holding the content, when not `version` (after a rename).
    #[serde(default)]
    blob: Option<u64>,
    #[serde(default)]
    pack: Option<PackRef>,
}

impl FlatFile {
    fn content(&self) -> Content {
        match self.pack {
            Some(p) => Content::Pack(p),
            None => Content::Blob(self.blob.unwrap_or(self.version)),
        }
    }

    /// Its hash; none where the old layout held something else (a packed content without
    /// one then fails the intact check, as it would have).
    fn digest(&self) -> Digest {
        Digest::from_hex(&self.blake3).unwrap_or_default()
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FlatRecord {
    Put(FlatFile),
    Delete { name: String },
    Rename { from: String, file: FlatFile },
}

#[derive(Debug, Deserialize)]
struct FlatSnapshot {
    #[serde(default)]
    journal: u64,
    files: Vec<FlatFile>,
}

/// Whether `dir` holds a flat folder: a snapshot without a format, or no snapshot but
/// files of the flat layout (`.meta` files, journals, contents).
pub fn is_flat(dir: &Path, snapshot_format: Option<u32>) -> Result<bool> {
    if let Some(format) = snapshot_format {
        return Ok(format < super::journal::FORMAT);
    }
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".meta")
            || name.ends_with(".blob")
            || name.ends_with(".jsonl")
            || name.ends_with(".dat")
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Migrates the flat folder `dir` of `owner`: writes a snapshot of its files as entries of
/// the root. The flat files are left for the load that follows to remove.
pub fn migrate(dir: &Path, tmp: &Path, owner: &str, now: i64) -> Result<()> {
    let mut journals = Vec::new();
    let mut legacy = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let fname = entry.file_name();
        let fname = fname.to_string_lossy();
        if let Some(n) = fname
            .strip_prefix("journal-")
            .and_then(|r| r.strip_suffix(".jsonl"))
        {
            if let Ok(n) = n.parse::<u64>() {
                journals.push(n);
            }
        } else if fname.ends_with(".meta") {
            legacy.push(entry.path());
        }
    }
    let mut files: BTreeMap<String, FlatFile> = BTreeMap::new();
    let snapshot_path = dir.join(SNAPSHOT);
    let epoch = match fs::read(&snapshot_path) {
        Ok(bytes) => {
            let snap: FlatSnapshot =
                serde_json::from_slice(&bytes).map_err(|source| ServerError::Corrupt {
                    path: snapshot_path.display().to_string(),
                    source,
                })?;
            for f in snap.files {
                files.insert(f.name.clone(), f);
            }
            snap.journal
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            for path in &legacy {
                let f: FlatFile = read_json(path)?;
                files.insert(f.name.clone(), f);
            }
            0
        }
        Err(e) => return Err(e.into()),
    };
    replay(dir, epoch, owner, &mut files)?;

    let mut entries = Vec::with_capacity(files.len() + 1);
    let mut root = Node::new(ROOT_ID, 0, "", EntryKind::Dir, 0o755, now);
    root.version = 1;
    entries.push(root);
    let mut next_id = ROOT_ID + 1;
    for f in files.into_values() {
        let mut node = Node::new(
            next_id,
            ROOT_ID,
            &f.name,
            EntryKind::File,
            DEFAULT_FILE_MODE,
            f.mtime_ns,
        );
        next_id += 1;
        node.size = f.size;
        node.version = f.version;
        node.content = Some(f.content());
        node.blake3 = f.digest();
        entries.push(node);
    }
    // A journal number no file uses yet: a leftover of a crashed migration is replaced.
    let new_epoch = journals.iter().copied().max().unwrap_or(0).max(epoch) + 1;
    write_snapshot(dir, tmp, new_epoch, next_id, entries.iter())?;
    tracing::info!(
        owner,
        files = entries.len() - 1,
        "folder of the flat layout migrated to a tree"
    );
    Ok(())
}

/// Replays the flat journal `epoch` over `files`, as the flat layout's load did: whole
/// records only, and a last record whose packed content never reached the disk dropped.
fn replay(
    dir: &Path,
    epoch: u64,
    owner: &str,
    files: &mut BTreeMap<String, FlatFile>,
) -> Result<()> {
    let path = dir.join(journal_name(epoch));
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let (mut parsed, _) = parse_records::<FlatRecord>(&bytes, owner);
    if let Some((FlatRecord::Put(f), _)) = parsed.last() {
        let node_like = FlatProbe(f);
        if !node_like.intact(dir) {
            tracing::warn!(owner, file = %f.name, "dropping the last flat journal record: its content never reached the disk");
            parsed.pop();
        }
    }
    for (record, _) in parsed {
        match record {
            FlatRecord::Put(f) => {
                files.insert(f.name.clone(), f);
            }
            FlatRecord::Delete { name } => {
                files.remove(&name);
            }
            FlatRecord::Rename { from, file } => {
                files.remove(&from);
                files.insert(file.name.clone(), file);
            }
        }
    }
    Ok(())
}

struct FlatProbe<'a>(&'a FlatFile);

impl FlatProbe<'_> {
    fn intact(&self, dir: &Path) -> bool {
        let f = self.0;
        let mut node = Node::new(0, 0, &f.name, EntryKind::File, 0, 0);
        node.size = f.size;
        node.content = Some(f.content());
        node.blake3 = f.digest();
        packed_content_intact(dir, &node)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &PathBuf) -> Result<T> {
    let bytes = fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|source| ServerError::Corrupt {
        path: path.display().to_string(),
        source,
    })
}
