//! The journal: one JSON line per change, each line one atomic transaction of [`Op`]s (a
//! rename that replaces its target is a move and a removal in one line), fdatasynced
//! before the change is acknowledged; and the snapshot it continues.
//!
//! A snapshot names the journal that continues it, and a new snapshot always names a new,
//! empty journal created (and made durable) before the snapshot is renamed into place: a
//! crash between the steps leaves the old snapshot with its journal, never old records
//! replayed over a newer snapshot. The journal runs ahead of its records with zeros
//! ([`preallocate`]), so an append overwrites allocated space; a load takes its end from
//! its last whole record.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::pack::{preallocate, sync_range, JOURNAL_PREALLOC};
use super::tree::{Entries, Node, Op};
use crate::error::{Result, ServerError};
use crate::fsutil;
use crate::space::DiskSpace;

/// The snapshot's file name.
pub const SNAPSHOT: &str = "snapshot.json";
/// The format of snapshots and journals written by this version: entries of a tree by
/// id. Snapshots without a format are the flat layout of protocol 1 (see `migrate`).
pub const FORMAT: u32 = 2;

pub fn journal_name(epoch: u64) -> String {
    format!("journal-{epoch}.jsonl")
}

/// One line of the journal: one change, applied whole or not at all.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub ops: Vec<Op>,
}

/// A folder's entries at one point, and the journal that continues from there.
#[derive(Debug, Deserialize)]
pub struct Snapshot {
    /// Absent (0) in the flat layout's snapshots.
    #[serde(default)]
    pub format: u32,
    #[serde(default)]
    pub journal: u64,
    #[serde(default)]
    pub next_id: u64,
    #[serde(default)]
    pub entries: Entries,
}

/// A snapshot as written, borrowing the entries.
#[derive(Serialize)]
struct SnapshotOut<'a> {
    format: u32,
    journal: u64,
    next_id: u64,
    entries: Vec<&'a Node>,
}

/// Writes a snapshot of `entries` that continues with journal `epoch`, which is created
/// empty (replacing any leftover of that number) and made durable first. Returns the new
/// journal, open for appending.
pub fn write_snapshot<'a>(
    dir: &Path,
    tmp: &Path,
    epoch: u64,
    next_id: u64,
    entries: impl Iterator<Item = &'a Node>,
) -> Result<File> {
    let path = dir.join(journal_name(epoch));
    let journal = fsutil::open_rw(&path, true)?;
    let written: Result<()> = (|| {
        journal.sync_all()?;
        fsutil::sync_dir(dir)?;
        let snap = SnapshotOut {
            format: FORMAT,
            journal: epoch,
            next_id,
            entries: entries.collect(),
        };
        let bytes = serde_json::to_vec(&snap)
            .map_err(|e| ServerError::Internal(format!("cannot encode a snapshot: {e}")))?;
        fsutil::write_atomic(tmp, &dir.join(SNAPSHOT), &bytes)?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(journal)
}

/// Reads the snapshot of `dir`, if there is one.
pub fn read_snapshot(dir: &Path) -> Result<Option<Snapshot>> {
    fsutil::read_json(&dir.join(SNAPSHOT))
}

/// The whole records of a journal's bytes, each with where it starts, and where the last
/// one ends (see [`read_records`]).
pub fn parse_records<R: DeserializeOwned>(bytes: &[u8], owner: &str) -> (Vec<(R, usize)>, usize) {
    let mut parsed = Vec::new();
    // Reading from a slice cannot fail.
    let valid = read_records(bytes, owner, |record, start| parsed.push((record, start)))
        .unwrap_or_default();
    (parsed, valid)
}

/// Hands each whole record of a journal to `each`, with where it starts, one line at a
/// time (a large journal is never all in memory), and returns where the last one ends.
/// Past it: preallocated zeros, or a record cut short by a crash (logged). Unreadable
/// whole lines are logged and skipped.
pub fn read_records<R: DeserializeOwned>(
    mut journal: impl std::io::BufRead,
    owner: &str,
    mut each: impl FnMut(R, usize),
) -> std::io::Result<usize> {
    let mut valid = 0usize;
    let mut line = Vec::new();
    loop {
        line.clear();
        if journal.read_until(b'\n', &mut line)? == 0 {
            return Ok(valid);
        }
        if !line.ends_with(b"\n") {
            if line.iter().any(|b| *b != 0) {
                tracing::warn!(owner, "cutting off a torn journal record");
            }
            return Ok(valid);
        }
        let start = valid;
        valid += line.len();
        match serde_json::from_slice::<R>(&line) {
            Ok(record) => each(record, start),
            Err(e) => tracing::error!(owner, error = %e, "skipping an unreadable journal record"),
        }
    }
}

/// The journal being appended to.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    file: File,
    /// Its number, named by the snapshot.
    pub epoch: u64,
    /// Where the next record goes.
    len: u64,
    /// Size of the file: zeros from `len` on.
    alloc: u64,
    /// Records in it (changes since the snapshot).
    pub records: u64,
    /// Records written without an fdatasync since the last one (see [`Journal::append`]).
    unsynced: bool,
    /// Zeros ahead leave the disk reserve alone.
    space: DiskSpace,
}

impl Journal {
    /// The journal `epoch` of `dir`, open in `file`, whose records end at `len`.
    pub fn new(
        dir: &Path,
        file: File,
        epoch: u64,
        len: u64,
        records: u64,
        space: DiskSpace,
    ) -> Journal {
        Journal {
            dir: dir.to_path_buf(),
            file,
            epoch,
            len,
            alloc: len,
            records,
            unsynced: false,
            space,
        }
    }

    /// Appends one record and makes it durable, with every record written before it.
    /// `pending` is a content write to a pack still under way (see `Pack::write`): both
    /// writes go to the device together, the content's is waited for, then the journal's
    /// fdatasync flushes the device cache for both. If the record reaches the disk without
    /// its content (a crash before the flush: neither was acknowledged), the next load
    /// drops it. With `lazy` (and no `pending`) the record is only written: the next
    /// durable append or [`Journal::sync`] makes it durable. On failure the journal is cut
    /// back so the next record does not follow a torn one.
    pub fn append(
        &mut self,
        record: &Record,
        pending: Option<(&File, u64, u64)>,
        lazy: bool,
    ) -> Result<()> {
        let lazy = lazy && pending.is_none();
        let mut line = serde_json::to_vec(record)
            .map_err(|e| ServerError::Internal(format!("cannot encode a journal record: {e}")))?;
        line.push(b'\n');
        let end = self.len + line.len() as u64;
        preallocate(
            &self.file,
            &mut self.alloc,
            end,
            JOURNAL_PREALLOC,
            &self.space,
        );
        let result = self
            .file
            .write_all_at(&line, self.len)
            .and_then(|()| match pending {
                Some((pack, at, len)) => {
                    sync_range(&self.file, self.len, line.len() as u64, false)?;
                    sync_range(pack, at, len, true)
                }
                None => Ok(()),
            })
            .and_then(|()| if lazy { Ok(()) } else { self.file.sync_data() });
        match result {
            Ok(()) => {
                self.len = end;
                // Without zeros ahead (no room for them) the record itself grew the file.
                self.alloc = self.alloc.max(end);
                self.records += 1;
                self.unsynced = lazy;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                self.alloc = self.len;
                tracing::warn!(dir = %self.dir.display(), error = %e, "journal append failed; change refused");
                Err(e.into())
            }
        }
    }

    /// Whether records were written since the last fdatasync.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Makes the records written without an fdatasync durable.
    pub fn sync(&mut self) -> Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Writes a snapshot of `entries` continued by a new, empty journal, switches to it
    /// and removes the old one.
    pub fn snapshot<'a>(
        &mut self,
        tmp: &Path,
        next_id: u64,
        entries: impl Iterator<Item = &'a Node>,
    ) -> Result<()> {
        let next = self.epoch + 1;
        let file = write_snapshot(&self.dir, tmp, next, next_id, entries)?;
        let old = self.dir.join(journal_name(self.epoch));
        if let Err(e) = std::fs::remove_file(&old) {
            tracing::warn!(path = %old.display(), error = %e, "cannot remove an old journal");
        }
        self.file = file;
        self.epoch = next;
        self.len = 0;
        self.alloc = 0;
        self.records = 0;
        // The snapshot holds every record, durably.
        self.unsynced = false;
        Ok(())
    }

    #[cfg(test)]
    pub fn path(&self) -> PathBuf {
        self.dir.join(journal_name(self.epoch))
    }
}

impl Drop for Journal {
    /// A folder let go (the server stopping) leaves nothing answered and not durable.
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot make the last changes durable");
        }
    }
}
