//! Lazy changes made durable in time. A change the client let be answered before it reached
//! the disk (`lazy`: a `mkdir`, a `chmod`, an empty file's create) is written to its
//! folder's journal without an fdatasync; the owner's next durable change covers it (one
//! fdatasync makes every record before it durable), and so does a `sync` request. When
//! neither comes, this thread syncs the folder [`LAZY_SYNC_MS`] after the change, so a
//! lazy change is never left to the page cache for longer than that.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use sharefs_protocol::LAZY_SYNC_MS;

use super::{lock, StoreInner};

/// Folders with lazy changes not yet durable, by owner.
#[derive(Debug, Default)]
pub struct FlushQueue {
    state: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    owners: BTreeSet<String>,
    /// The store is gone: the thread ends.
    closed: bool,
}

impl FlushQueue {
    /// Asks for `owner`'s folder to be synced soon.
    pub fn queue(&self, owner: &str) {
        let mut q = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !q.owners.contains(owner) {
            q.owners.insert(owner.to_string());
            self.wake.notify_one();
        }
    }

    /// Ends the thread (the store is being dropped; its folders sync as they drop).
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.wake.notify_one();
    }

    /// Waits for owners to sync: false once closed.
    fn wait(&self) -> bool {
        let mut q = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while !q.closed && q.owners.is_empty() {
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        !q.closed
    }

    fn take(&self) -> BTreeSet<String> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()).owners)
    }
}

/// Starts the thread that syncs the folders of `store`'s lazy changes.
pub fn start(queue: Arc<FlushQueue>, store: Weak<StoreInner>) {
    let spawned = std::thread::Builder::new()
        .name("sharefs-flush".into())
        .spawn(move || run(&queue, &store));
    if let Err(e) = spawned {
        // Lazy changes are then made durable by the next durable change or `sync` only.
        tracing::error!(error = %e, "cannot start the thread that syncs lazy changes");
    }
}

fn run(queue: &FlushQueue, store: &Weak<StoreInner>) {
    while queue.wait() {
        // Changes coming meanwhile share the fdatasync, or a durable change makes them
        // durable first and leaves nothing to do.
        std::thread::sleep(Duration::from_millis(LAZY_SYNC_MS));
        let Some(store) = store.upgrade() else {
            return;
        };
        for owner in queue.take() {
            let folder = match lock(&store.folders) {
                Ok(folders) => folders.get(&owner).cloned(),
                Err(_) => return,
            };
            let Some(folder) = folder else { continue };
            let synced = lock(&folder).and_then(|mut f| f.sync());
            if let Err(e) = synced {
                tracing::error!(owner, error = %e, "cannot make lazy changes durable; a crash may lose them");
            }
        }
    }
}
