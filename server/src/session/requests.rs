//! Requests other than uploads: each runs as its own task with a [`Context`] (what it
//! needs of its session), and ends in one reply whose largest size was reserved in the
//! reply queue before the request was read ([`reply_room`]). Reads of another user's tree
//! are checked against its modes by the store; writes are refused outside one's own tree
//! here, whatever the client sends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use sharefs_protocol::{Reply, Request, CHUNK_SIZE, FRAME_ROOM, LIST_PAGE, LIST_PAGE_BYTES};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::cutoff::Cutoff;
use crate::error::ServerError;
use crate::shared::{Shared, Slot};
use crate::storage::{Caller, ContentReader, Published, UploadTarget};

/// What a request task needs of its session.
pub(super) struct Context {
    pub session: u64,
    pub user: String,
    pub shared: Shared,
    pub handles: Handles,
    pub open_handles: Arc<Semaphore>,
    pub max_frame: usize,
    pub next_id: Arc<AtomicU64>,
}

/// A reply and its payload (file data); the payload's memory is counted in the room the
/// reply takes in the queue.
pub(super) type Handled = Result<(Reply, Bytes), ServerError>;

/// Room in the reply queue for replies without file data or long lists.
pub(super) const SMALL_REPLY: usize = 8 * 1024;
/// Room for a reply carrying one entry: a link's target may take 4095 bytes, six each as
/// JSON escapes, beside a 255-byte name.
pub(super) const ENTRY_REPLY: usize = 32 * 1024;

/// The most room `op`'s reply can take in the reply queue.
pub(super) fn reply_room(op: &Request) -> usize {
    match op {
        Request::Read { len, .. } => (*len).min(CHUNK_SIZE) as usize + SMALL_REPLY,
        Request::Open { head, .. } => (*head).min(CHUNK_SIZE) as usize + ENTRY_REPLY,
        Request::List { .. } => LIST_PAGE_BYTES + ENTRY_REPLY,
        Request::Notifications { .. } => NOTIFICATIONS_BYTES + SMALL_REPLY,
        // Waits for more room if the list of users is long.
        Request::ListUsers => 64 * 1024,
        Request::Lookup { .. }
        | Request::Stat { .. }
        | Request::Resolve { .. }
        | Request::Put { .. }
        | Request::Mkdir { .. }
        | Request::Symlink { .. }
        | Request::Rename { .. }
        | Request::SetAttr { .. }
        | Request::UploadCommit { .. } => ENTRY_REPLY,
        Request::UploadRead { len, .. } => (*len).min(CHUNK_SIZE) as usize + SMALL_REPLY,
        Request::Close { .. }
        | Request::Remove { .. }
        | Request::Ack { .. }
        | Request::Ping
        | Request::Sync
        | Request::StatFs
        | Request::UploadBegin { .. }
        | Request::UploadAbort { .. }
        | Request::UploadSync { .. }
        | Request::UploadResume { .. }
        | Request::ContentHash { .. } => SMALL_REPLY,
    }
}

/// Most bytes of JSON the notifications of one `notifications` reply may take; the
/// oldest of the recent ones are left out past it.
pub(super) const NOTIFICATIONS_BYTES: usize = 512 * 1024;

/// A connection's open handles: the file, and its place under the handle limits.
pub(super) type HandleTable = HashMap<u64, (Arc<dyn ContentReader>, HandleTicket)>;
pub(super) type Handles = Arc<Mutex<HandleTable>>;

/// An open handle's place under the per-connection, per-user and server-wide limits;
/// given back when the handle is closed or its connection ends.
pub struct HandleTicket {
    _connection: OwnedSemaphorePermit,
    _user: Slot<String>,
    _fd: OwnedSemaphorePermit,
}

impl Context {
    /// Runs blocking storage work off the async threads.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, ServerError>
    where
        F: FnOnce(&Shared) -> Result<T, ServerError> + Send + 'static,
        T: Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| ServerError::Internal(format!("storage task failed: {e}")))?
    }

    /// Pushes the events of a change of `owner`'s tree to the other sessions.
    pub fn publish(&self, owner: &str, events: &[Published]) {
        self.shared.hub.publish(owner, self.session, events);
    }

    /// Writes are allowed in the caller's own tree only, whatever the client sends.
    pub fn own(&self, owner: &str) -> Result<(), ServerError> {
        if owner == self.user {
            Ok(())
        } else {
            Err(ServerError::PermissionDenied(format!(
                "{owner}: only {owner} writes there"
            )))
        }
    }

    fn caller(&self, owner: &str) -> Caller {
        Caller::of(owner, &self.user)
    }

    pub fn handles(&self) -> Result<std::sync::MutexGuard<'_, HandleTable>, ServerError> {
        self.handles
            .lock()
            .map_err(|_| ServerError::Internal("handle table poisoned".into()))
    }

    /// Most bytes of JSON a list in one reply may take: `bytes`, or less if the agreed
    /// frame is smaller.
    fn list_bytes(&self, bytes: usize) -> usize {
        let room = self.max_frame.saturating_sub(FRAME_ROOM as usize);
        bytes.min(room)
    }

    /// Most file data one reply carries: the negotiated frame less room for the header.
    fn chunk_size(&self) -> u32 {
        sharefs_protocol::chunk_size(u32::try_from(self.max_frame).unwrap_or(u32::MAX))
    }

    async fn require_user(&self, owner: String) -> Result<String, ServerError> {
        self.blocking(move |shared| match shared.users.get(&owner)? {
            Some(_) => Ok(owner),
            None => Err(ServerError::NoSuchUser(owner)),
        })
        .await
    }

    pub async fn handle(self, op: Request, payload: Bytes, cutoff: Cutoff) -> Handled {
        let reply = match op {
            Request::ListUsers => {
                let users = self
                    .blocking(|shared| Ok(shared.users.list()?.into_keys().collect()))
                    .await?;
                Reply::Users { users }
            }
            Request::List {
                owner,
                dir,
                after,
                limit,
            } => {
                let owner = self.require_user(owner).await?;
                let caller = self.caller(&owner);
                let limit = limit.unwrap_or(LIST_PAGE).clamp(1, LIST_PAGE) as usize;
                let max_bytes = self.list_bytes(LIST_PAGE_BYTES);
                let (files, more) = self
                    .blocking(move |s| {
                        s.store
                            .list_page(&owner, dir, after.as_deref(), limit, max_bytes, caller)
                    })
                    .await?;
                Reply::Files { files, more }
            }
            Request::Lookup {
                owner,
                parent,
                name,
            } => {
                let owner = self.require_user(owner).await?;
                let caller = self.caller(&owner);
                let file = self
                    .blocking(move |s| s.store.lookup(&owner, parent, &name, caller))
                    .await?;
                Reply::File { file }
            }
            Request::Stat { owner, id } => {
                let owner = self.require_user(owner).await?;
                let caller = self.caller(&owner);
                let file = self
                    .blocking(move |s| s.store.stat(&owner, id, caller))
                    .await?;
                Reply::File { file }
            }
            Request::Resolve { owner, path } => {
                let owner = self.require_user(owner).await?;
                let caller = self.caller(&owner);
                let file = self
                    .blocking(move |s| s.store.resolve(&owner, &path, caller))
                    .await?;
                Reply::File { file }
            }
            Request::Open { owner, id, head } => return self.open(owner, id, head, cutoff).await,
            Request::Read {
                handle,
                offset,
                len,
            } => return self.read(handle, offset, len).await,
            Request::Close { handle } => {
                // Dropped outside the lock: closing the file is a system call.
                let closed = self.handles()?.remove(&handle);
                drop(closed);
                Reply::Ok
            }
            Request::Put {
                owner,
                parent,
                name,
                replace,
                blake3,
                mode,
                mtime_ns,
            } => {
                self.own(&owner)?;
                let size = payload.len() as u64;
                let target = match replace {
                    Some(id) => UploadTarget::Replace(id),
                    None => UploadTarget::At { parent, name },
                };
                let o = owner.clone();
                let (file, events) = self
                    .blocking(move |s| {
                        let quota = s.users.fresh(&o)?.and_then(|u| u.quota);
                        s.store.put(
                            &o, target, &payload, &blake3, mode, mtime_ns, quota, &cutoff,
                        )
                    })
                    .await?;
                tracing::info!(id = file.id, name = %file.name, size, "upload committed");
                self.publish(&owner, &events);
                Reply::File { file }
            }
            Request::Mkdir {
                owner,
                parent,
                name,
                mode,
            } => {
                self.own(&owner)?;
                let o = owner.clone();
                let (file, events) = self
                    .blocking(move |s| s.store.mkdir(&o, parent, &name, mode, &cutoff))
                    .await?;
                tracing::info!(id = file.id, name = %file.name, "directory made");
                self.publish(&owner, &events);
                Reply::File { file }
            }
            Request::Symlink {
                owner,
                parent,
                name,
                target,
            } => {
                self.own(&owner)?;
                let o = owner.clone();
                let (file, events) = self
                    .blocking(move |s| s.store.symlink(&o, parent, &name, &target, &cutoff))
                    .await?;
                tracing::info!(id = file.id, name = %file.name, "symbolic link made");
                self.publish(&owner, &events);
                Reply::File { file }
            }
            Request::Remove {
                owner,
                parent,
                name,
                dir,
            } => {
                self.own(&owner)?;
                let o = owner.clone();
                let n = name.clone();
                let events = self
                    .blocking(move |s| s.store.remove(&o, parent, &n, dir, &cutoff))
                    .await?;
                tracing::info!(parent, name = %name, "removed");
                self.publish(&owner, &events);
                Reply::Ok
            }
            Request::Rename {
                owner,
                parent,
                name,
                new_parent,
                new_name,
                noreplace,
            } => {
                self.own(&owner)?;
                let o = owner.clone();
                let (file, events) = self
                    .blocking(move |s| {
                        s.store
                            .rename(&o, parent, &name, new_parent, &new_name, noreplace, &cutoff)
                    })
                    .await?;
                tracing::info!(id = file.id, parent = file.parent, name = %file.name, "renamed");
                self.publish(&owner, &events);
                Reply::File { file }
            }
            Request::SetAttr {
                owner,
                id,
                mode,
                atime_ns,
                mtime_ns,
            } => {
                self.own(&owner)?;
                let o = owner.clone();
                let (file, events) = self
                    .blocking(move |s| s.store.set_attr(&o, id, mode, atime_ns, mtime_ns, &cutoff))
                    .await?;
                self.publish(&owner, &events);
                Reply::File { file }
            }
            Request::Ack { ids } => {
                let user = self.user.clone();
                self.blocking(move |s| s.hub.ack(&user, &ids)).await?;
                Reply::Ok
            }
            Request::Notifications { recent } => {
                let user = self.user.clone();
                let (mut pending, mut recent) = self
                    .blocking(move |s| {
                        Ok((s.hub.pending(&user)?, s.hub.recent(&user, recent as usize)?))
                    })
                    .await?;
                // Whatever fits: the pending first (the newest of them if they cannot all),
                // then the newest of the recent.
                pending.reverse();
                let budget = self.list_bytes(NOTIFICATIONS_BYTES);
                pending.truncate(fitting(&pending, budget));
                pending.reverse();
                let left = budget.saturating_sub(json_len(&pending));
                recent.reverse();
                recent.truncate(fitting(&recent, left));
                recent.reverse();
                Reply::Notifications { pending, recent }
            }
            Request::Ping => Reply::Ok,
            Request::Sync => {
                let user = self.user.clone();
                self.blocking(move |s| s.store.sync(&user)).await?;
                Reply::Ok
            }
            Request::StatFs => {
                let user = self.user.clone();
                let space = self
                    .blocking(move |s| {
                        let quota = s.users.fresh(&user)?.and_then(|u| u.quota);
                        s.store.usage(&user, quota)
                    })
                    .await?;
                Reply::Space(space)
            }
            Request::ContentHash { owner, id } => {
                self.own(&owner)?;
                let (version, size, blake3) = self
                    .blocking(move |shared| shared.store.content_hash(&owner, id))
                    .await?;
                Reply::ContentHash {
                    version,
                    size,
                    blake3,
                }
            }
            Request::UploadBegin { .. }
            | Request::UploadCommit { .. }
            | Request::UploadAbort { .. }
            | Request::UploadSync { .. }
            | Request::UploadResume { .. }
            | Request::UploadRead { .. } => {
                return Err(ServerError::Internal("upload request misrouted".into()))
            }
        };
        Ok((reply, Bytes::new()))
    }

    async fn open(self, owner: String, id: u64, head: u32, cutoff: Cutoff) -> Handled {
        // Its place under the handle limits is taken before a file is opened, so a client
        // cannot hold more descriptors than its share even for a moment.
        let ticket = self.ticket()?;
        // One's own small files open without a trip to the blocking pool (no disk access:
        // the folder is loaded and the pack is open); everything else takes the slow path.
        let quick = if owner == self.user {
            self.shared.store.try_open_own(&owner, id)
        } else {
            None
        };
        let open = match quick {
            Some(open) => open,
            None => self.open_slow(owner, id, cutoff).await?,
        };
        self.opened(open, head, ticket).await
    }

    /// A place for one more open handle, or the limit that is reached.
    fn ticket(&self) -> Result<HandleTicket, ServerError> {
        let config = &self.shared.config;
        let connection = self.open_handles.clone().try_acquire_owned().map_err(|_| {
            ServerError::TooManyOpen(format!(
                "{} open on this connection, the most it may have",
                config.max_handles_per_connection
            ))
        })?;
        let user = self.shared.handle_slot(&self.user).ok_or_else(|| {
            ServerError::TooManyOpen(format!(
                "{} open by {}, the most one user may have",
                config.max_handles_per_user, self.user
            ))
        })?;
        // The server's descriptors are shared fairly: a user may take one more only while
        // more than they hold is free, so however many users open all they may, one who
        // holds few still finds some.
        let short = || {
            tracing::debug!("the server's open-file budget is short; refusing an open");
            ServerError::TooManyOpen("the server is short of open files; close some".into())
        };
        if self.shared.fds.available_permits() < self.shared.handles_held(&self.user) {
            return Err(short());
        }
        let fd = self
            .shared
            .fds
            .clone()
            .try_acquire_owned()
            .map_err(|_| short())?;
        Ok(HandleTicket {
            _connection: connection,
            _user: user,
            _fd: fd,
        })
    }

    async fn open_slow(
        &self,
        owner: String,
        id: u64,
        cutoff: Cutoff,
    ) -> Result<Box<dyn ContentReader>, ServerError> {
        let owner = self.require_user(owner).await?;
        let downloader = self.user.clone();
        let caller = self.caller(&owner);
        self.blocking(move |s| {
            let (open, path) = s.store.open_read(&owner, id, caller)?;
            if owner != downloader {
                // A download the client gave up on must not notify anyone.
                cutoff.check()?;
                // Recorded durably before the reader gets a byte, under the file's path.
                s.hub
                    .record_download(&owner, &downloader, &path, open.info().size)?;
            }
            Ok(open)
        })
        .await
    }

    async fn opened(
        self,
        open: Box<dyn ContentReader>,
        head: u32,
        ticket: HandleTicket,
    ) -> Handled {
        // Each download is logged once by the hub when it records its notification
        // (repeats within the coalescing window are counted there, not logged again).
        let file = open.info().clone();
        if file.owner != self.user {
            tracing::debug!(owner = %file.owner, file = %file.name, size = file.size, "download");
        }
        let head = (head.min(self.chunk_size()) as u64).min(file.size) as usize;
        let open: Arc<dyn ContentReader> = Arc::from(open);
        let data = if head == 0 {
            Bytes::new()
        } else {
            let data = self.read_budgeted(open.clone(), 0, head).await?;
            if data.len() != head {
                // The content ended early: a broken blob or pack, not a short file.
                return Err(ServerError::Internal(format!(
                    "{}/{}: read {} of {head} bytes",
                    file.owner,
                    file.name,
                    data.len()
                )));
            }
            data
        };
        // Registered only once the head is read, so a failed open leaves no handle; a file
        // that came whole with the reply needs none (handle 0): nothing to read later, no
        // close to wait for.
        let handle = if head as u64 == file.size {
            0
        } else {
            let handle = self.next_id.fetch_add(1, Ordering::Relaxed);
            self.handles()?.insert(handle, (open, ticket));
            handle
        };
        Ok((Reply::Opened { handle, file }, data))
    }

    async fn read(self, handle: u64, offset: u64, len: u32) -> Handled {
        let open = self
            .handles()?
            .get(&handle)
            .map(|(open, _)| open.clone())
            .ok_or_else(|| ServerError::Protocol(format!("no open handle {handle}")))?;
        let len = len.min(self.chunk_size()) as usize;
        let len = len.min(open.info().size.saturating_sub(offset) as usize);
        let data = self.read_budgeted(open, offset, len).await?;
        Ok((Reply::Data, data))
    }

    /// Reads under the server-wide read-buffer budget, which bounds the data being read
    /// at once; once read, the data is counted in its reply's room in the queue.
    async fn read_budgeted(
        &self,
        open: Arc<dyn ContentReader>,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ServerError> {
        let kib = len.div_ceil(1024).max(1) as u32;
        let permit = self
            .shared
            .read_budget
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(|_| ServerError::Internal("read budget closed".into()))?;
        if let Some(data) = open.read_cached(offset, len) {
            drop(permit);
            return Ok(data);
        }
        let misses = self.shared.misses.clone();
        let read = move || {
            let started = Instant::now();
            let data = open.read(offset, len);
            misses.record(started.elapsed());
            data
        };
        let data = if self.shared.misses.in_place(len) {
            read()?
        } else {
            tokio::task::spawn_blocking(read)
                .await
                .map_err(|e| ServerError::Internal(format!("read task failed: {e}")))??
        };
        drop(permit);
        Ok(data)
    }
}

/// How many of `items`, from the first, take at most `limit` bytes of JSON.
fn fitting<T: serde::Serialize>(items: &[T], limit: usize) -> usize {
    let mut total = 0;
    for (i, item) in items.iter().enumerate() {
        // The comma (or bracket) before each.
        total += json_len(item) + 1;
        if total > limit {
            return i;
        }
    }
    items.len()
}

fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX / 2, |v| v.len())
}
