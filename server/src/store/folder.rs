//! One user's folder, loaded: the tree, the journal it is appended to and the pack small
//! contents go to. Loading finishes or undoes what a crash left behind; every change is
//! one journal record, applied to the tree once durable; maintenance folds the journal
//! into a snapshot and compacts the pack, each amortised over as many changes as it copies.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::journal::{journal_name, read_records, read_snapshot, write_snapshot, Journal, Record};
use super::pack::{pack_name, Pack};
use super::tree::{Content, Node, Op, PackRef, Tree};
use super::{blob_name, migrate, packed_content_intact, remove_quietly};
use crate::error::{Result, ServerError};
use crate::fsutil;
use crate::space::DiskSpace;

/// A snapshot is written once the journal holds this many records and more than twice the
/// folder's entries.
pub const SNAPSHOT_MIN_RECORDS: u64 = 1024;
/// A pack is compacted once it holds this much garbage and more garbage than live bytes.
pub const PACK_MIN_GARBAGE: u64 = 8 << 20;
/// Room a snapshot is assumed to need per entry when claiming disk space for it.
const SNAPSHOT_ROOM_PER_ENTRY: u64 = 1024;

#[derive(Debug)]
pub struct Folder {
    pub dir: PathBuf,
    pub tree: Tree,
    pub(super) journal: Journal,
    pub(super) pack: Option<Pack>,
    /// Bytes of the current pack that no entry uses any more.
    pack_garbage: u64,
    /// The data directory's free space, which zeros ahead of the journal and the pack and
    /// maintenance copies must leave to the reserve.
    pub space: DiskSpace,
}

impl Folder {
    /// Reads `owner`'s folder in `dir`, migrating a flat one first. `next_version` is raised
    /// past every version found.
    pub fn load(
        dir: PathBuf,
        owner: &str,
        tmp: &Path,
        space: DiskSpace,
        next_version: &AtomicU64,
    ) -> Result<Folder> {
        fsutil::create_dir_durable(&dir)?;
        let now = fsutil::now_ns();
        let mut snapshot = read_snapshot(&dir)?;
        if migrate::is_flat(&dir, snapshot.as_ref().map(|s| s.format))? {
            migrate::migrate(&dir, tmp, owner, now)?;
            snapshot = read_snapshot(&dir)?;
        }
        let snapshot = match snapshot {
            Some(s) => s,
            None => {
                // A new folder: its root, in a snapshot, before anything else is written.
                let tree = Tree::empty(now);
                write_snapshot(&dir, tmp, 0, tree.next_id(), tree.nodes())?;
                read_snapshot(&dir)?
                    .ok_or_else(|| ServerError::Internal("snapshot vanished".into()))?
            }
        };

        let mut blobs = Vec::new();
        let mut packs = Vec::new();
        let mut stale = Vec::new();
        let journal_path = dir.join(journal_name(snapshot.journal));
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let fname = entry.file_name();
            let Some(fname) = fname.to_str() else {
                continue;
            };
            if let Some(v) = fname.strip_suffix(".blob") {
                if let Ok(v) = u64::from_str_radix(v, 16) {
                    blobs.push(v);
                }
            } else if let Some(n) = fname
                .strip_prefix("pack-")
                .and_then(|r| r.strip_suffix(".dat"))
            {
                if let Ok(n) = n.parse::<u64>() {
                    packs.push(n);
                }
            } else if fname.ends_with(".meta")
                || (fname.starts_with("journal-")
                    && fname.ends_with(".jsonl")
                    && entry.path() != journal_path)
            {
                // Flat metadata already migrated, journals of other snapshots (a crash
                // while switching): superseded.
                stale.push(entry.path());
            }
        }

        let mut tree = snapshot.entries.0;
        tree.raise_next_id(snapshot.next_id);
        // Replay the journal as it is read, each record once the next one is whole; cut
        // off a torn last record.
        let journal = fsutil::open_rw(&journal_path, false)?;
        let mut records = 0u64;
        let mut last: Option<(Record, usize)> = None;
        let mut valid = read_records::<Record>(
            std::io::BufReader::with_capacity(256 << 10, &journal),
            owner,
            |record, start| {
                if let Some((before, _)) = last.replace((record, start)) {
                    records += 1;
                    for op in before.ops {
                        tree.apply(op);
                    }
                }
            },
        )?;
        // The last record may have reached the disk while its packed content had not
        // (the two writes go out together; see `Journal::append`): it was never
        // acknowledged, so it goes if a content it names does not match its hash.
        if let Some((record, start)) = last {
            let intact = record.ops.iter().all(|op| match op {
                Op::Put(node) => packed_content_intact(&dir, node),
                Op::Remove { .. } => true,
            });
            if intact {
                records += 1;
                for op in record.ops {
                    tree.apply(op);
                }
            } else {
                tracing::warn!(
                    owner,
                    "dropping the last journal record: its content never reached the disk"
                );
                valid = start;
            }
        }
        let journal_len = journal.metadata()?.len();
        for node in tree.finish_load(now) {
            tracing::error!(owner, id = node.id, name = %node.name, "entry outside the tree; dropped");
        }
        if (valid as u64) < journal_len {
            journal.set_len(valid as u64)?;
            journal.sync_all()?;
        }
        for path in &stale {
            fs::remove_file(path)?;
        }
        fsutil::sync_dir(&dir)?;

        // Drop entries whose content is missing, and contents no entry names.
        let blob_set: HashSet<u64> = blobs.iter().copied().collect();
        let pack_set: HashSet<u64> = packs.iter().copied().collect();
        let missing: Vec<u64> = tree
            .nodes()
            .filter(|n| match n.content {
                Some(Content::Blob(b)) => !blob_set.contains(&b),
                Some(Content::Pack(p)) => !pack_set.contains(&p.pack),
                None => false,
            })
            .map(|n| n.id)
            .collect();
        for id in missing {
            if let Some(node) = tree.apply(Op::Remove { id }) {
                tracing::error!(owner, name = %node.name, "metadata names missing content; dropping entry");
            }
        }
        let mut used_blobs = HashSet::new();
        let mut used_packs = HashSet::new();
        for n in tree.nodes() {
            match n.content {
                Some(Content::Blob(b)) => used_blobs.insert(b),
                Some(Content::Pack(p)) => used_packs.insert(p.pack),
                None => false,
            };
        }
        let current_pack = used_packs.iter().copied().max();
        let mut removed = 0;
        for b in blobs.iter().filter(|b| !used_blobs.contains(b)) {
            fs::remove_file(dir.join(blob_name(*b)))?;
            removed += 1;
        }
        for p in packs.iter().filter(|p| Some(**p) != current_pack) {
            if used_packs.contains(p) {
                continue;
            }
            fs::remove_file(dir.join(pack_name(*p)))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(owner, removed, "removed contents of unfinished uploads");
            fsutil::sync_dir(&dir)?;
        }

        // New versions and blob names come from one counter: past every one in use.
        let max_version = tree
            .nodes()
            .map(|n| match n.content {
                Some(Content::Blob(b)) => n.version.max(b),
                _ => n.version,
            })
            .max()
            .unwrap_or(0);
        next_version.fetch_max(max_version + 1, Ordering::Relaxed);
        let journal = Journal::new(
            &dir,
            journal,
            snapshot.journal,
            valid as u64,
            records,
            space.clone(),
        );
        let mut folder = Folder {
            dir,
            tree,
            journal,
            pack: None,
            pack_garbage: 0,
            space,
        };
        if let Some(id) = current_pack {
            let in_pack = || {
                folder.tree.nodes().filter_map(move |n| match n.content {
                    Some(Content::Pack(p)) if p.pack == id => Some((p.offset, n.size)),
                    _ => None,
                })
            };
            // New contents go after the last one named; what follows it (preallocated
            // zeros, contents no record names) is overwritten.
            let end = in_pack()
                .map(|(offset, size)| offset + size)
                .max()
                .unwrap_or(0);
            let live: u64 = in_pack().map(|(_, size)| size).sum();
            let pack = Pack::open(&folder.dir, id, end)?;
            folder.pack_garbage = pack.len.saturating_sub(live);
            folder.pack = Some(pack);
        }
        Ok(folder)
    }

    fn pack_path(&self, id: u64) -> PathBuf {
        self.dir.join(pack_name(id))
    }

    /// Makes `ops` durable as one record (with the pack write `pending`, if any), then
    /// applies them and releases the contents they replace or remove. On failure nothing
    /// changed. With `lazy` (and no `pending`) the record is written but its fdatasync is
    /// left to the next durable change or [`Folder::sync`].
    pub fn commit(&mut self, ops: Vec<Op>, pending: Option<(u64, u64)>, lazy: bool) -> Result<()> {
        let record = Record { ops };
        let pending = match (pending, self.pack.as_ref()) {
            (Some((at, len)), Some(pack)) => Some((&pack.file, at, len)),
            _ => None,
        };
        self.journal.append(&record, pending, lazy)?;
        for op in record.ops {
            let new_content = match &op {
                Op::Put(n) => n.content,
                Op::Remove { .. } => None,
            };
            if let Some(old) = self.tree.apply(op) {
                if old.content.is_some() && old.content != new_content {
                    self.forget(&old);
                }
            }
        }
        Ok(())
    }

    /// Accounts for a content no longer being used (blobs are removed at once; a crash
    /// before that leaves an orphan the next load removes).
    fn forget(&mut self, old: &Node) {
        match old.content {
            Some(Content::Pack(p)) if self.pack.as_ref().is_some_and(|cur| cur.id == p.pack) => {
                self.pack_garbage += old.size;
            }
            Some(Content::Blob(b)) => remove_quietly(&self.dir.join(blob_name(b))),
            Some(Content::Pack(_)) | None => {}
        }
    }

    /// Makes the changes committed lazily durable.
    pub fn sync(&mut self) -> Result<()> {
        self.journal.sync()
    }

    /// Whether changes committed lazily are not durable yet.
    pub fn unsynced(&self) -> bool {
        self.journal.unsynced()
    }

    /// Counts `bytes` appended to the pack for a change that failed as garbage.
    pub fn wasted(&mut self, bytes: u64) {
        self.pack_garbage += bytes;
    }

    /// Snapshots and compacts when the journal or the pack carry enough garbage.
    pub fn maintain(&mut self, tmp: &Path) {
        let live_packed: u64 = self
            .pack
            .as_ref()
            .map_or(0, |p| p.len.saturating_sub(self.pack_garbage));
        // Each copy claims its size first (a snapshot's is estimated generously), so
        // maintenance never eats into the reserve; skipped, it is tried again later.
        let entries = self.tree.len() as u64;
        let snapshot_room = SNAPSHOT_ROOM_PER_ENTRY * (entries + 1);
        let result = if self.pack_garbage >= PACK_MIN_GARBAGE && self.pack_garbage > live_packed {
            self.space
                .claim(live_packed + snapshot_room)
                .and_then(|_room| self.compact(tmp))
        } else if self.journal.records >= SNAPSHOT_MIN_RECORDS && self.journal.records > 2 * entries
        {
            self.space
                .claim(snapshot_room)
                .and_then(|_room| self.snapshot(tmp))
        } else {
            Ok(())
        };
        if let Err(e) = result {
            // Nothing is lost: the journal and the old pack still hold everything.
            tracing::warn!(dir = %self.dir.display(), error = %e, "folder maintenance failed");
        }
    }

    fn snapshot(&mut self, tmp: &Path) -> Result<()> {
        let next_id = self.tree.next_id();
        self.journal.snapshot(tmp, next_id, self.tree.nodes())
    }

    /// Copies the live packed contents into a new pack, switches to it with a snapshot,
    /// and removes the old pack (open readers keep reading it).
    fn compact(&mut self, tmp: &Path) -> Result<()> {
        let Some(old) = self.pack.as_ref() else {
            return Ok(());
        };
        let old_id = old.id;
        let new_id = old_id + 1;
        let new_path = self.pack_path(new_id);
        let file = fsutil::create_new(&new_path)?;
        let mut len = 0u64;
        // (entry, where it was, where it goes)
        let mut moved = Vec::new();
        let copied: Result<()> = (|| {
            let mut sources: HashMap<u64, File> = HashMap::new();
            let mut buf = Vec::new();
            for node in self.tree.nodes() {
                if let Some(Content::Pack(p)) = node.content {
                    let source = match sources.entry(p.pack) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(self.pack_file_for(p.pack)?)
                        }
                    };
                    buf.resize(node.size as usize, 0);
                    source.read_exact_at(&mut buf, p.offset)?;
                    file.write_all_at(&buf, len)?;
                    let to = PackRef {
                        pack: new_id,
                        offset: len,
                    };
                    moved.push((node.id, p, to));
                    len += node.size;
                }
            }
            file.sync_all()?;
            fsutil::sync_dir(&self.dir)?;
            Ok(())
        })();
        if let Err(e) = copied {
            let _ = fs::remove_file(&new_path);
            return Err(e);
        }
        let set_refs = |tree: &mut Tree, to_new: bool| {
            for (id, from, to) in &moved {
                if let Some(mut n) = tree.get(*id).cloned() {
                    n.content = Some(Content::Pack(if to_new { *to } else { *from }));
                    tree.apply(Op::Put(n));
                }
            }
        };
        set_refs(&mut self.tree, true);
        if let Err(e) = self.snapshot(tmp) {
            set_refs(&mut self.tree, false);
            let _ = fs::remove_file(&new_path);
            return Err(e);
        }
        self.pack = Some(Pack {
            id: new_id,
            file,
            len,
            alloc: len,
            durable_alloc: len,
        });
        self.pack_garbage = 0;
        remove_quietly(&self.pack_path(old_id));
        Ok(())
    }

    pub fn pack_file_for(&self, id: u64) -> Result<File> {
        match &self.pack {
            Some(p) if p.id == id => Ok(p.file.try_clone()?),
            _ => Ok(fsutil::open_read(&self.pack_path(id))?),
        }
    }

    /// The pack to append to, created on first use.
    pub fn pack_mut(&mut self) -> Result<&mut Pack> {
        let pack = match self.pack.take() {
            Some(p) => p,
            None => {
                let p = Pack::open(&self.dir, 1, 0)?;
                fsutil::sync_dir(&self.dir)?;
                p
            }
        };
        Ok(self.pack.insert(pack))
    }

    /// The file holding `node`'s content and where the content starts in it.
    pub fn open_content(&self, node: &Node) -> Result<(File, u64)> {
        match node.content {
            Some(Content::Blob(b)) => Ok((fsutil::open_read(&self.dir.join(blob_name(b)))?, 0)),
            Some(Content::Pack(p)) => Ok((self.pack_file_for(p.pack)?, p.offset)),
            None => Err(ServerError::Internal(format!(
                "{}: a file without content",
                node.name
            ))),
        }
    }
}
