//! Cached directory listings, one per directory of any user's tree, keyed by
//! (owner, directory id), and the root's list of users.
//!
//! A listing is trusted until the server says a directory changed (pushed events update
//! it in place), until a reconnect or resync drops them all, or for at most
//! [`LISTING_MAX_AGE`]. A listing fetch can take a while and the server may have listed
//! the directory before a change it then reports: every change seen while a fetch of the
//! directory is in flight is logged and replayed onto what the fetch brings. A directory
//! looked up repeatedly without a listing (`cat a b c ...`, creates) gets its listing
//! fetched in the background, so later lookups, negative ones too, need no round trip.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sharefs_protocol::FileInfo;

use super::error::FsResult;
use super::remote::Remote;

/// Oldest a cached listing may be, as a backstop for lost events.
pub const LISTING_MAX_AGE: Duration = Duration::from_secs(60);
/// After this many lookups in one directory answered by the server, its listing is
/// fetched in the background. A single `stat` in a huge directory stays one request.
pub const LISTING_AFTER_MISSES: u32 = 8;

/// A directory of a user's tree: (owner, directory id).
pub type DirKey = (String, u64);
/// A directory's entries by name.
pub type DirListing = BTreeMap<String, FileInfo>;

#[derive(Debug)]
pub struct Listing<T> {
    pub items: T,
    fetched: Instant,
}

impl<T> Listing<T> {
    pub fn new(items: T) -> Self {
        Listing {
            items,
            fetched: Instant::now(),
        }
    }
    pub fn fresh(&self) -> bool {
        self.fetched.elapsed() < LISTING_MAX_AGE
    }
}

/// Changes to a directory with a listing fetch in flight, replayed onto what it brings.
#[derive(Debug, Default)]
struct DirLog {
    /// Fetches in flight; the log goes when the last one ends.
    fetches: u32,
    changes: Vec<(String, Option<FileInfo>)>,
}

#[derive(Debug, Default)]
pub struct Listings {
    pub users: Option<Listing<Vec<String>>>,
    /// Shared with the callers that took one, so taking a listing of 10,000 entries
    /// copies none of them; a change copies it only while another holds it.
    dirs: HashMap<DirKey, Listing<Arc<DirListing>>>,
    /// A directory is here exactly while a fetch of it is in flight.
    logs: HashMap<DirKey, DirLog>,
    /// Bumped when every listing is dropped (reconnect, resync): fetches in flight then
    /// are not cached.
    epoch: u64,
    /// Lookups that had to ask the server since the directory's listing went away.
    misses: HashMap<DirKey, u32>,
}

fn apply(items: &mut DirListing, name: &str, file: Option<&FileInfo>) {
    match file {
        Some(info) => {
            items.insert(name.to_string(), info.clone());
        }
        None => {
            items.remove(name);
        }
    }
}

/// What a cached listing says of a name.
pub enum Cached {
    /// The entry, or `None`: the directory has no such name.
    Known(Option<FileInfo>),
    /// No fresh listing.
    Unknown,
}

impl Listings {
    /// Records that `name` in directory `dir` is now `file` (`None`: gone), in the cached
    /// listing and for the fetches of it in flight.
    pub fn changed(&mut self, dir: &DirKey, name: &str, file: Option<&FileInfo>) {
        if let Some(l) = self.dirs.get_mut(dir) {
            apply(Arc::make_mut(&mut l.items), name, file);
        }
        if let Some(log) = self.logs.get_mut(dir) {
            log.changes.push((name.to_string(), file.cloned()));
        }
    }

    /// The fresh cached listing of `dir`.
    pub fn get(&self, dir: &DirKey) -> Option<&Arc<DirListing>> {
        self.dirs.get(dir).filter(|l| l.fresh()).map(|l| &l.items)
    }

    /// What the cached listing of `dir` says of `name`; a miss counts towards fetching
    /// the listing, and the fetch is returned once due.
    pub fn lookup(
        &mut self,
        shared: &Arc<Mutex<Listings>>,
        dir: &DirKey,
        name: &str,
    ) -> (Cached, Option<Fetching>) {
        if let Some(items) = self.get(dir) {
            return (Cached::Known(items.get(name).cloned()), None);
        }
        let misses = self.misses.entry(dir.clone()).or_default();
        *misses += 1;
        // Not while a fetch of it is in flight: that one will be cached.
        let due = *misses >= LISTING_AFTER_MISSES && !self.logs.contains_key(dir);
        let fetch = due.then(|| Fetching::begin(shared, self, dir));
        (Cached::Unknown, fetch)
    }

    /// Caches what is known to be the whole of `dir` (a directory just made).
    pub fn set(&mut self, dir: &DirKey, items: DirListing) {
        self.dirs.insert(dir.clone(), Listing::new(Arc::new(items)));
        self.misses.remove(dir);
    }

    /// Drops the listing of a directory that is gone.
    pub fn forget(&mut self, dir: &DirKey) {
        self.dirs.remove(dir);
        self.misses.remove(dir);
    }

    /// Directories with a listing fetch in flight.
    pub fn in_flight(&self) -> usize {
        self.logs.len()
    }

    /// Drops every listing: all may be stale.
    pub fn clear(&mut self) {
        self.users = None;
        self.dirs.clear();
        self.epoch += 1;
    }
}

pub fn lock(l: &Mutex<Listings>) -> MutexGuard<'_, Listings> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// A listing fetch in flight, registered in the directory's change log from the moment it
/// is decided; ends its share of the log when dropped, also when abandoned.
pub struct Fetching {
    shared: Arc<Mutex<Listings>>,
    pub dir: DirKey,
    /// `Listings::epoch` when it began.
    epoch: u64,
    /// Where the changes made since it began start in the log.
    start: usize,
}

impl Fetching {
    pub fn begin(shared: &Arc<Mutex<Listings>>, l: &mut Listings, dir: &DirKey) -> Fetching {
        let log = l.logs.entry(dir.clone()).or_default();
        log.fetches += 1;
        Fetching {
            shared: shared.clone(),
            dir: dir.clone(),
            epoch: l.epoch,
            start: log.changes.len(),
        }
    }

    /// Fetches the listing and caches it, with the changes seen while it was in flight
    /// replayed onto it: the server may have listed the directory before them.
    pub async fn run<R: Remote>(self, remote: &R) -> FsResult<Arc<DirListing>> {
        let listed = remote.list(&self.dir.0, self.dir.1).await;
        let mut l = lock(&self.shared);
        let mut files: DirListing = listed?.into_iter().map(|f| (f.name.clone(), f)).collect();
        if let Some(log) = l.logs.get(&self.dir) {
            for (name, file) in log.changes.get(self.start..).unwrap_or_default() {
                apply(&mut files, name, file.as_ref());
            }
        }
        let files = Arc::new(files);
        if l.epoch == self.epoch {
            l.dirs.insert(self.dir.clone(), Listing::new(files.clone()));
            l.misses.remove(&self.dir);
        }
        Ok(files)
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        let mut l = lock(&self.shared);
        if let Some(log) = l.logs.get_mut(&self.dir) {
            log.fetches = log.fetches.saturating_sub(1);
            if log.fetches == 0 {
                l.logs.remove(&self.dir);
            }
        }
    }
}
