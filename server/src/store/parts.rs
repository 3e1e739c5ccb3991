//! Uploads kept across lost connections and restarts.
//!
//! Each upload in progress is a part file `tmp/part-<id>` and a sidecar
//! `tmp/part-<id>.json` (whose it is, where it goes, its declared size and mode). An
//! upload is *attached* while a session feeds it, *committing* while its commit runs, and
//! *detached* when its session ended without committing or aborting it: then its part
//! stays on disk for the upload idle bound, for `upload_resume` to pick up, and is deleted
//! after. A server that starts finds the parts of the one before it detached (but for
//! those whose commit made it before the crash: see [`Parts::settle`]). Upload ids
//! are random, so they stay unique across restarts and a client cannot guess another
//! user's; a resume also checks the owner.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::lock;
use super::upload::UploadTarget;
use crate::error::{Result, ServerError};

/// Most detached uploads kept per owner: past it the oldest goes. A client that begins
/// uploads and drops its connections cannot fill the disk with parts (and their bytes
/// count against the owner's quota, see [`Parts::detached_bytes`]). As many as a user
/// may have attached by default, so one lost connection loses none.
pub const MAX_DETACHED_PER_OWNER: usize = 16;

/// What the sidecar of a part says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartMeta {
    pub owner: String,
    pub target: UploadTarget,
    #[serde(default)]
    pub mode: Option<u32>,
    #[serde(default)]
    pub size: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Attached,
    Committing,
    Detached(Instant),
}

#[derive(Debug)]
struct Part {
    owner: String,
    state: State,
}

/// The parts under `tmp/` and the state of each.
#[derive(Debug)]
pub struct Parts {
    tmp: PathBuf,
    entries: Mutex<HashMap<u64, Part>>,
}

fn part_name(id: u64) -> String {
    format!("part-{id}")
}

/// The id in a part's file name (`part-<id>`), if it is one.
fn part_id(name: &str) -> Option<u64> {
    name.strip_prefix("part-")?.parse().ok()
}

impl Parts {
    /// Takes stock of `tmp`: parts with a readable sidecar are kept, detached as of now;
    /// everything else (temp files of the server before, a part without its sidecar or
    /// the reverse) is removed.
    pub fn open(tmp: &Path) -> io::Result<Parts> {
        let mut parts = Parts {
            tmp: tmp.to_path_buf(),
            entries: Mutex::new(HashMap::new()),
        };
        let now = Instant::now();
        let mut found = HashMap::new();
        for entry in fs::read_dir(tmp)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let keep = part_id(&name).and_then(|id| {
                let meta = parts.meta(id).ok()?;
                Some((id, meta.owner))
            });
            match keep {
                Some((id, owner)) => {
                    found.insert(
                        id,
                        Part {
                            owner,
                            state: State::Detached(now),
                        },
                    );
                }
                None if name.ends_with(".json") && part_id(&name[..name.len() - 5]).is_some() => {
                    // A sidecar: kept with its part, removed below if that is gone.
                }
                None => remove_any(&entry.path())?,
            }
        }
        for entry in fs::read_dir(tmp)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".json").and_then(part_id) {
                if !found.contains_key(&id) {
                    remove_any(&tmp.join(&*name))?;
                }
            }
        }
        if !found.is_empty() {
            tracing::info!(
                count = found.len(),
                "unfinished uploads found; kept for their clients to resume"
            );
        }
        *parts
            .entries
            .get_mut()
            .map_err(|_| io::Error::other("poisoned"))? = found;
        Ok(parts)
    }

    pub fn path(&self, id: u64) -> PathBuf {
        self.tmp.join(part_name(id))
    }

    pub fn meta_path(&self, id: u64) -> PathBuf {
        self.tmp.join(format!("{}.json", part_name(id)))
    }

    /// The sidecar of part `id`.
    pub fn meta(&self, id: u64) -> Result<PartMeta> {
        if !self.path(id).is_file() {
            return Err(ServerError::NotFound(format!("upload {id}")));
        }
        let bytes = fs::read(self.meta_path(id))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ServerError::Internal(format!("sidecar of upload {id}: {e}")))
    }

    /// A fresh id for a new upload of `owner`, attached.
    pub fn create(&self, owner: &str) -> Result<u64> {
        let mut entries = lock(&self.entries)?;
        loop {
            // 53 bits: exact in any JSON implementation.
            let id = rand::random::<u64>() >> 11;
            if id != 0 && !entries.contains_key(&id) {
                entries.insert(
                    id,
                    Part {
                        owner: owner.to_string(),
                        state: State::Attached,
                    },
                );
                return Ok(id);
            }
        }
    }

    /// Attaches the detached upload `id` of `owner` to a session.
    pub fn attach(&self, owner: &str, id: u64) -> Result<()> {
        let mut entries = lock(&self.entries)?;
        match entries.get_mut(&id) {
            Some(part) if part.owner == owner => match part.state {
                State::Detached(_) => {
                    part.state = State::Attached;
                    Ok(())
                }
                State::Attached => Err(ServerError::InUse(
                    "the upload is still attached to an earlier connection",
                )),
                State::Committing => Err(ServerError::InUse("the upload is being committed")),
            },
            _ => Err(ServerError::NotFound(format!(
                "upload {id} (committed, aborted, failed or expired)"
            ))),
        }
    }

    pub fn committing(&self, id: u64) {
        if let Ok(mut entries) = lock(&self.entries) {
            if let Some(part) = entries.get_mut(&id) {
                part.state = State::Committing;
            }
        }
    }

    /// The session of upload `id` let it go without an outcome: it stays for a resume.
    /// Past [`MAX_DETACHED_PER_OWNER`] of its owner, the oldest detached one goes.
    pub fn detach(&self, id: u64) {
        let evict = {
            let Ok(mut entries) = lock(&self.entries) else {
                return;
            };
            let Some(part) = entries.get_mut(&id) else {
                return;
            };
            part.state = State::Detached(Instant::now());
            let owner = part.owner.clone();
            let mut detached: Vec<(Instant, u64)> = entries
                .iter()
                .filter_map(|(id, p)| match p.state {
                    State::Detached(at) if p.owner == owner => Some((at, *id)),
                    _ => None,
                })
                .collect();
            detached.sort_unstable();
            let over = detached.len().saturating_sub(MAX_DETACHED_PER_OWNER);
            let evict: Vec<u64> = detached.iter().take(over).map(|(_, id)| *id).collect();
            for id in &evict {
                entries.remove(id);
            }
            evict
        };
        for id in evict {
            tracing::info!(
                upload = id,
                "too many unfinished uploads of one user; the oldest is dropped"
            );
            self.remove_files(id);
        }
    }

    /// Upload `id` is over (committed, aborted or failed): forgets it and removes what is
    /// left of its files.
    pub fn finish(&self, id: u64) {
        if let Ok(mut entries) = lock(&self.entries) {
            entries.remove(&id);
        }
        self.remove_files(id);
    }

    /// Ends the detached uploads of `owner` that were committed before a crash: a commit
    /// links its part to the blob it becomes (see `Store::commit_upload`), so a part with
    /// a second link, once the owner's folder has loaded and removed the blobs of
    /// commits that did not reach its journal, is one whose commit did. Without this, a
    /// resume would commit it again (and bring back a file deleted meanwhile).
    pub fn settle(&self, owner: &str) {
        use std::os::unix::fs::MetadataExt;
        let ids: Vec<u64> = match lock(&self.entries) {
            Ok(entries) => entries
                .iter()
                .filter(|(_, p)| p.owner == owner && matches!(p.state, State::Detached(_)))
                .map(|(id, _)| *id)
                .collect(),
            Err(_) => return,
        };
        for id in ids {
            if fs::metadata(self.path(id)).is_ok_and(|m| m.nlink() > 1) {
                tracing::info!(
                    upload = id,
                    "the upload was committed before a restart; nothing to resume"
                );
                self.finish(id);
            }
        }
    }

    /// Removes the uploads detached for longer than `bound`; returns how many.
    pub fn expire(&self, bound: Duration) -> usize {
        let expired: Vec<u64> = {
            let Ok(mut entries) = lock(&self.entries) else {
                return 0;
            };
            let ids: Vec<u64> = entries
                .iter()
                .filter(|(_, p)| matches!(p.state, State::Detached(at) if at.elapsed() >= bound))
                .map(|(id, _)| *id)
                .collect();
            for id in &ids {
                entries.remove(id);
            }
            ids
        };
        for id in &expired {
            tracing::info!(
                upload = id,
                ?bound,
                "unfinished upload not resumed in time; dropped"
            );
            self.remove_files(*id);
        }
        expired.len()
    }

    /// Bytes the detached uploads of `owner` hold on disk, except `but` (one being
    /// resumed): they count against the owner's quota as uploads in progress do.
    pub fn detached_bytes(&self, owner: &str, but: Option<u64>) -> u64 {
        let ids: Vec<u64> = lock(&self.entries).map_or_else(
            |_| Vec::new(),
            |e| {
                e.iter()
                    .filter(|(id, p)| {
                        p.owner == owner
                            && matches!(p.state, State::Detached(_))
                            && Some(**id) != but
                    })
                    .map(|(id, _)| *id)
                    .collect()
            },
        );
        ids.iter()
            .filter_map(|id| fs::metadata(self.path(*id)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Uploads detached and waiting for a resume (tests, metrics).
    pub fn detached(&self) -> usize {
        lock(&self.entries).map_or(0, |e| {
            e.values()
                .filter(|p| matches!(p.state, State::Detached(_)))
                .count()
        })
    }

    fn remove_files(&self, id: u64) {
        for path in [self.path(id), self.meta_path(id)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an upload's file")
                }
            }
        }
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}
