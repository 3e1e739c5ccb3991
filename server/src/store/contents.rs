//! File contents: uploads received in pieces and committed into a blob, small files put
//! whole into the pack, each the new version of its file in one journal record, within
//! the owner's quota and the disk reserve.

use std::fs;

use sharefs_protocol::{EntryKind, FileInfo, DEFAULT_FILE_MODE, MODE_MASK};

use super::digest::Digest;
use super::tree::{Content, Node, Op, PackRef, Tree};
use std::os::unix::fs::FileExt;

use super::parts::PartMeta;
use super::upload::{self, StagedUpload, UploadTarget};
use super::{blob_name, check_new_name, lock, Published, Store, PACK_MAX};
use crate::cutoff::Cutoff;
use crate::error::{Result, ServerError};
use crate::fsutil;
use crate::reservations::Reservation;
use crate::space::{Claim, RECORD_ROOM};

/// What an upload holds of its owner's quota and of the disk.
struct Held {
    allowance: u64,
    held: Option<Reservation>,
    quota: Option<u64>,
    room: Claim,
}

impl Store {
    /// The ops that make `content` the new version of `target`, and the index of the
    /// file's op in them.
    #[allow(clippy::too_many_arguments)]
    fn content_ops(
        &self,
        tree: &mut Tree,
        owner: &str,
        target: &UploadTarget,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        size: u64,
        blake3: &str,
        content: Content,
    ) -> Result<(Vec<Op>, u64)> {
        let version = self.next_version();
        content_ops(
            tree, owner, target, mode, mtime_ns, size, blake3, content, version,
        )
    }

    /// Starts an upload into `owner`'s tree. `quota` is the owner's quota.
    pub fn begin_upload(
        &self,
        owner: &str,
        target: UploadTarget,
        size: Option<u64>,
        mode: Option<u32>,
        quota: Option<u64>,
    ) -> Result<StagedUpload> {
        if let UploadTarget::At { name, .. } = &target {
            check_new_name(name)?;
        }
        let (allowance, held) = self.hold_quota(owner, &target, size.unwrap_or(0), quota, None)?;
        let room = self.inner.space.claim(size.unwrap_or(0))?;
        let parts = self.inner.parts.clone();
        let id = parts.create(owner)?;
        let meta = PartMeta {
            owner: owner.to_string(),
            target,
            mode,
            size,
        };
        let path = parts.path(id);
        let created = serde_json::to_vec(&meta)
            .map_err(|e| ServerError::Internal(e.to_string()))
            .and_then(|json| Ok(fs::write(parts.meta_path(id), json)?))
            .and_then(|()| Ok(fsutil::create_new(&path)?));
        let file = match created {
            Ok(file) => file,
            Err(e) => {
                parts.finish(id);
                return Err(e);
            }
        };
        let quota = Held {
            allowance,
            held,
            quota,
            room,
        };
        Ok(self.part_writer(id, meta, file, blake3::Hasher::new(), 0, quota))
    }

    /// The writer of part `id`, whose first `written` bytes (hashed into `hasher`) are in
    /// `file`: large or undeclared uploads write whole blocks directly, small ones stay
    /// buffered (they may be read back from the cache).
    fn part_writer(
        &self,
        id: u64,
        meta: PartMeta,
        file: fs::File,
        hasher: blake3::Hasher,
        written: u64,
        quota: Held,
    ) -> StagedUpload {
        let path = self.inner.parts.path(id);
        let direct = match meta.size {
            Some(size) if size <= PACK_MAX => None,
            _ => upload::DirectWriter::resume(&path, &file, written),
        };
        StagedUpload {
            id,
            parts: self.inner.parts.clone(),
            anchored: false,
            discard: false,
            owner: meta.owner,
            target: meta.target,
            mode: meta.mode,
            file: Some(file),
            direct,
            path,
            hasher,
            written,
            writeback_from: written,
            allowance: quota.allowance,
            held: quota.held,
            quota: quota.quota,
            room: quota.room,
            failed: None,
        }
    }

    /// Takes up the upload `id` of `owner` that its connection (or the server before a
    /// restart) left behind, from the bytes its part holds. Blocking: it hashes them.
    pub fn resume_upload(&self, owner: &str, id: u64, quota: Option<u64>) -> Result<StagedUpload> {
        let parts = self.inner.parts.clone();
        // A part whose commit made it before a restart is settled when its owner's
        // folder loads (`Parts::settle`): not found here, then.
        self.folder(owner)?;
        parts.attach(owner, id)?;
        let resumed = (|| {
            let meta = parts.meta(id)?;
            let path = parts.path(id);
            let file = fsutil::open_rw(&path, false)?;
            let written = file.metadata()?.len();
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut pos = 0u64;
            while pos < written {
                let n = (written - pos).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], pos)?;
                hasher.update(&buf[..n]);
                pos += n as u64;
            }
            let declared = meta.size.unwrap_or(0);
            let (allowance, held) =
                self.hold_quota(owner, &meta.target, declared.max(written), quota, Some(id))?;
            let room = self.inner.space.claim(declared.saturating_sub(written))?;
            let quota = Held {
                allowance,
                held,
                quota,
                room,
            };
            Ok(self.part_writer(id, meta, file, hasher, written, quota))
        })();
        if let Err(e) = &resumed {
            tracing::warn!(upload = id, error = %e, "cannot resume an upload");
            parts.detach(id);
        }
        resumed
    }

    /// Holds `bytes` of `owner`'s quota for an upload to `target`: the allowance it may
    /// grow into and the reservation (none without a quota). The owner's uploads waiting
    /// for a resume count as used, but `resuming`, the one being taken up.
    fn hold_quota(
        &self,
        owner: &str,
        target: &UploadTarget,
        bytes: u64,
        quota: Option<u64>,
        resuming: Option<u64>,
    ) -> Result<(u64, Option<Reservation>)> {
        // Loaded first: that settles the parts of commits a crash cut after the journal,
        // whose bytes are the folder's now, not an upload's.
        let folder = self.folder(owner)?;
        let waiting = match quota {
            Some(_) => self.inner.parts.detached_bytes(owner, resuming),
            None => 0,
        };
        // Reserved under the folder lock, which commits hold while they turn their
        // reservation into used bytes: no upload is counted twice, or not at all.
        let f = lock(&folder)?;
        // The old version's bytes are freed by the commit, so they count as available.
        let old = replaced_size(&f.tree, owner, target)?;
        let used = (f.tree.used() + waiting).saturating_sub(old);
        let (allowance, _) = allowance(used, quota);
        let held = match quota {
            Some(_) => Some(self.inner.reservations.reserve(owner, bytes, allowance)?),
            None => None,
        };
        Ok((allowance, held))
    }

    /// Drops the uploads left without a session for longer than `bound`.
    pub fn expire_uploads(&self, bound: std::time::Duration) -> usize {
        self.inner.parts.expire(bound)
    }

    /// Uploads waiting for a resume.
    pub fn detached_uploads(&self) -> usize {
        self.inner.parts.detached()
    }

    /// Makes an upload the current version of its file. Blocking; fsyncs.
    pub fn commit_upload(
        &self,
        mut upload: StagedUpload,
        size: u64,
        blake3_hex: &str,
        mtime_ns: Option<i64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        // Whatever the outcome, the upload ends here: a failed commit changes nothing and
        // leaves nothing to resume.
        upload.discard = true;
        if let Some(e) = upload.failed.take() {
            return Err(e);
        }
        if size != upload.written {
            return Err(ServerError::Protocol(format!(
                "commit of {size} bytes but {} were received",
                upload.written
            )));
        }
        let hash = upload.hasher.finalize().to_hex();
        if !hash.as_str().eq_ignore_ascii_case(blake3_hex) {
            return Err(ServerError::ChecksumMismatch);
        }
        upload.finish_writes()?;
        let file = upload
            .file
            .take()
            .ok_or_else(|| ServerError::Internal("upload already finished".into()))?;
        let held = upload.held.take();
        let parts = self.inner.parts.clone();
        parts.committing(upload.id);
        let result = self.install(&upload, &file, size, hash.as_str(), mtime_ns, held, cutoff);
        match &result {
            // A commit that did not run (past its deadline, or fenced by a newer
            // connection of the client) leaves the upload to be resumed and committed
            // again: its part is still there.
            Err(e @ ServerError::Expired(_)) if upload.path.exists() => {
                tracing::info!(upload = upload.id, error = %e, "commit not made; upload kept for a resume");
                parts.detach(upload.id);
            }
            // Committed (its part is now the blob's), or gone: nothing of it remains.
            _ => parts.finish(upload.id),
        }
        result
    }

    /// Makes the received content of `upload` (in `file`) the file's current version.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        upload: &StagedUpload,
        file: &fs::File,
        size: u64,
        hash: &str,
        mtime_ns: Option<i64>,
        held: Option<Reservation>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        let owner = upload.owner.as_str();
        file.sync_all()?;
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        cutoff.check()?;
        let old = replaced_size(&folder.tree, owner, &upload.target)?;
        let (allowance, allowance_error) =
            allowance(folder.tree.used().saturating_sub(old), upload.quota);
        if size > allowance {
            return Err(allowance_error);
        }
        let _room = self.inner.space.claim(RECORD_ROOM)?;
        // The blob is named by a fresh number, the version the ops give the file is another:
        // both come from the same counter, so neither collides with anything on disk.
        let blob_id = self.next_version();
        let (ops, id) = self.content_ops(
            &mut folder.tree,
            owner,
            &upload.target,
            upload.mode,
            mtime_ns,
            size,
            hash,
            Content::Blob(blob_id),
        )?;
        let blob = folder.dir.join(blob_name(blob_id));
        // Linked, not renamed: until the journal holds the commit, the part stays whole
        // for a resume after a crash. Its second link says, after one, that the commit
        // made it (see `Parts::settle`); the part's own name goes when the commit ends.
        fs::hard_link(&upload.path, &blob)?;
        fsutil::sync_dir(&folder.dir)?;
        // Content is never answered before it is durable.
        let events = match self.change(&mut folder, owner, ops, None, false) {
            Ok(events) => events,
            Err(e) => {
                let _ = fs::remove_file(&blob);
                return Err(e);
            }
        };
        // Used from now on, no longer reserved (still under the folder lock).
        drop(held);
        let info = folder
            .tree
            .get(id)
            .map(|n| n.info(owner))
            .ok_or_else(|| ServerError::Internal("committed file missing".into()))?;
        Ok((info, events))
    }

    /// Stores a whole file received in one piece: small ones are appended to the folder's
    /// pack, larger ones go through a blob like any upload. Blocking; durable on return.
    #[allow(clippy::too_many_arguments)]
    pub fn put(
        &self,
        owner: &str,
        target: UploadTarget,
        data: &[u8],
        blake3_hex: &str,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        quota: Option<u64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        let size = data.len() as u64;
        if size > PACK_MAX {
            let mut up = self.begin_upload(owner, target, Some(size), mode, quota)?;
            up.write_chunk(0, data);
            return self.commit_upload(up, size, blake3_hex, mtime_ns, cutoff);
        }
        if let UploadTarget::At { name, .. } = &target {
            check_new_name(name)?;
        }
        let hash = blake3::hash(data).to_hex();
        if !hash.as_str().eq_ignore_ascii_case(blake3_hex) {
            return Err(ServerError::ChecksumMismatch);
        }
        let folder = self.folder(owner)?;
        let mut folder = lock(&folder)?;
        cutoff.check()?;
        let old = replaced_size(&folder.tree, owner, &target)?;
        // What uploads in progress hold of the quota counts as used.
        let reserved = match quota {
            Some(_) => self.inner.reservations.reserved(owner)?,
            None => 0,
        };
        let (allowance, allowance_error) =
            allowance((folder.tree.used() + reserved).saturating_sub(old), quota);
        if size > allowance {
            return Err(allowance_error);
        }
        let _room = self.inner.space.claim(size + RECORD_ROOM)?;
        let (mut ops, id) = self.content_ops(
            &mut folder.tree,
            owner,
            &target,
            mode,
            mtime_ns,
            size,
            hash.as_str(),
            Content::Blob(0),
        )?;
        let space = folder.space.clone();
        let pack = folder.pack_mut()?;
        let at = PackRef {
            pack: pack.id,
            offset: pack.len,
        };
        let pending = if size > 0 {
            pack.write(data, &space)?
        } else {
            None
        };
        if let Some(Op::Put(node)) = ops.first_mut() {
            node.content = Some(Content::Pack(at));
        }
        // Only an empty file may be answered before it is durable: content never is.
        let lazy = cutoff.is_lazy() && size == 0;
        let events = match self.change(&mut folder, owner, ops, pending, lazy) {
            Ok(events) => events,
            Err(e) => {
                // The appended bytes are garbage now.
                folder.wasted(size);
                return Err(e);
            }
        };
        let info = folder
            .tree
            .get(id)
            .map(|n| n.info(owner))
            .ok_or_else(|| ServerError::Internal("stored file missing".into()))?;
        Ok((info, events))
    }
}

/// Bytes `owner` may still add under `quota`, with the error to report when crossed.
/// (Disk space is claimed separately, see [`DiskSpace`].)
pub fn allowance(used: u64, quota: Option<u64>) -> (u64, ServerError) {
    match quota {
        Some(q) => (
            q.saturating_sub(used),
            ServerError::QuotaExceeded(format!("quota of {q} bytes reached")),
        ),
        None => (u64::MAX, ServerError::Internal("no quota".into())),
    }
}

/// The size of the file `target` replaces (0 if none), checking the target can take a
/// file's content.
pub fn replaced_size(tree: &Tree, owner: &str, target: &UploadTarget) -> Result<u64> {
    match target {
        UploadTarget::Replace(id) => match tree.get(*id) {
            Some(n) if n.kind == EntryKind::File => Ok(n.size),
            Some(n) if n.is_dir() => Err(ServerError::IsADirectory(format!("{owner}/#{id}"))),
            Some(_) => Err(ServerError::InvalidArgument(format!(
                "{owner}/#{id} is a symbolic link"
            ))),
            None => Err(ServerError::NotFound(format!("{owner}/#{id}"))),
        },
        UploadTarget::At { parent, name } => {
            tree.dir(*parent, &format!("{owner}/{name}"))?;
            match tree.lookup(*parent, name) {
                Some(n) if n.is_dir() => Err(ServerError::IsADirectory(format!("{owner}/{name}"))),
                Some(n) => Ok(n.used()),
                None => Ok(0),
            }
        }
    }
}

/// The ops that make `content` the new version of `target`, and the index of the
/// file's op in them.
#[allow(clippy::too_many_arguments)]
pub fn content_ops(
    tree: &mut Tree,
    owner: &str,
    target: &UploadTarget,
    mode: Option<u32>,
    mtime_ns: Option<i64>,
    size: u64,
    blake3: &str,
    content: Content,
    version: u64,
) -> Result<(Vec<Op>, u64)> {
    let digest = Digest::from_hex(blake3)
        .ok_or_else(|| ServerError::InvalidArgument(format!("not a BLAKE3 hash: {blake3:?}")))?;
    replaced_size(tree, owner, target)?;
    let now = fsutil::now_ns();
    let fill = |node: &mut Node| {
        node.size = size;
        node.version = version;
        node.blake3 = digest;
        node.content = Some(content);
        node.mtime_ns = mtime_ns.unwrap_or(now);
        node.ctime_ns = now;
        if let Some(mode) = mode {
            node.mode = mode & MODE_MASK;
        }
    };
    let existing = match target {
        UploadTarget::Replace(id) => tree.get(*id),
        UploadTarget::At { parent, name } => tree.lookup(*parent, name),
    };
    let mut ops = Vec::new();
    let node = match existing {
        Some(old) if old.kind == EntryKind::File => {
            let mut node = old.clone();
            fill(&mut node);
            node
        }
        other => {
            // A new file, in place of a link if one had the name.
            let UploadTarget::At { parent, name } = target else {
                return Err(ServerError::Internal("replacing a non-file".into()));
            };
            if let Some(link) = other {
                ops.push(Op::Remove { id: link.id });
            } else {
                tree.check_path_room(*parent, name)?;
            }
            let id = tree.allocate_id();
            let mut node = Node::new(id, *parent, name, EntryKind::File, DEFAULT_FILE_MODE, now);
            fill(&mut node);
            node.atime_ns = now;
            ops.extend(tree.touched_dir(*parent, now).map(Op::Put));
            node
        }
    };
    let id = node.id;
    ops.insert(0, Op::Put(node));
    Ok((ops, id))
}
