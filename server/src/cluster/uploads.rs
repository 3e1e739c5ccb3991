//! The cluster's contents side ([`BlobStore`]): uploads written block by block into the
//! object store and recorded in `sharefs_uploads` (so any node can resume one), commits
//! that name the content in the tree's transaction, whole puts, and reads (through
//! [`super::readahead`]).
//!
//! An upload's content id is also the version its file gets, and the prefix of its
//! blocks. Full blocks are written as they fill; a sync writes the partial last block too
//! (rewritten longer later) and records how many bytes are durable. An upload whose
//! connection ends is let go: its row keeps the durable count, and a resume on any node
//! reads those bytes back to hash them and continues from there. A node holds the uploads
//! it serves for [`LEASE`], renewed by each sync; a node that dies lets them lapse.

use std::any::Any;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sharefs_protocol::FileInfo;

use super::objects::{blocks_of, BLOCK};
use super::readahead::ReadAhead;
use super::{pg_error, pool_error, rows, Cluster};
use crate::cutoff::Cutoff;
use crate::error::{Result, ServerError};
use crate::storage::{BlobStore, ContentReader, ContentWriter};
use crate::store::access;
use crate::store::contents::{allowance, content_ops, replaced_size};
use crate::store::parts::PartMeta;
use crate::store::tree::{Content, Tree};
use crate::store::{check_new_name, Caller, Published, UploadTarget};

/// How long a node holds an upload it serves without a sync renewing the hold.
pub const LEASE: Duration = Duration::from_secs(15);
/// Uploads a user may have recorded at once, attached or waiting for a resume.
const MAX_UPLOADS_PER_OWNER: i64 = 64;

/// An upload in progress on this node.
#[derive(Debug)]
pub struct ClusterUpload {
    cluster: Cluster,
    id: u64,
    owner: String,
    target: UploadTarget,
    mode: Option<u32>,
    allowance: u64,
    quota: Option<u64>,
    hasher: blake3::Hasher,
    written: u64,
    /// The bytes of the block being filled, which starts at `block_start`.
    block: Vec<u8>,
    block_start: u64,
    /// Bytes the object store holds and the upload's row says it does.
    durable: u64,
    failed: Option<ServerError>,
    /// Aborted or failed: dropping it deletes it.
    discard: bool,
    /// Committed or deleted: dropping it does nothing.
    ended: bool,
}

fn lease_secs() -> f64 {
    LEASE.as_secs_f64()
}

impl Cluster {
    /// A fresh content id, unique across nodes.
    async fn next_content(pool: &deadpool_postgres::Pool) -> Result<u64> {
        let client = pool.get().await.map_err(pool_error)?;
        let row = client
            .query_one("SELECT nextval('sharefs_objects')", &[])
            .await
            .map_err(pg_error)?;
        Ok(rows::unbig(row.get::<_, i64>(0)))
    }

    /// Checks that `size` bytes for `target` fit in `owner`'s quota, on the current tree;
    /// returns what the upload may grow to.
    fn check_room(
        tree: &Tree,
        owner: &str,
        target: &UploadTarget,
        size: u64,
        quota: Option<u64>,
    ) -> Result<u64> {
        let old = replaced_size(tree, owner, target)?;
        let (room, error) = allowance(tree.used().saturating_sub(old), quota);
        if size > room {
            return Err(error);
        }
        Ok(room)
    }

    /// Makes content `content` (already in the object store) the new version of `target`,
    /// ending `upload` in the same transaction.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        owner: &str,
        target: UploadTarget,
        content: u64,
        size: u64,
        blake3: &str,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        quota: Option<u64>,
        upload: Option<u64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        let o = owner.to_string();
        let hash = blake3.to_ascii_lowercase();
        self.change_ending(
            owner,
            cutoff,
            move |tree| {
                Cluster::check_room(tree, &o, &target, size, quota)?;
                let (ops, id) = content_ops(
                    tree,
                    &o,
                    &target,
                    mode,
                    mtime_ns,
                    size,
                    &hash,
                    Content::Blob(content),
                    content,
                )?;
                let info = ops
                    .iter()
                    .find_map(|op| match op {
                        crate::store::tree::Op::Put(n) if n.id == id => Some(n.info(&o)),
                        _ => None,
                    })
                    .ok_or_else(|| ServerError::Internal("a commit without its file".into()))?;
                Ok((ops, info))
            },
            upload,
        )
    }

    /// Deletes an upload's row and blocks.
    fn drop_upload(&self, id: u64, written: u64) {
        let pool = self.inner.db.pool.clone();
        let objects = self.inner.objects.clone();
        let done = self.run(async move {
            let client = pool.get().await.map_err(pool_error)?;
            client
                .execute(
                    "DELETE FROM sharefs_uploads WHERE id = $1",
                    &[&rows::big(id)],
                )
                .await
                .map_err(pg_error)?;
            objects.delete(id, written).await
        });
        if let Err(e) = done {
            // The collector of contents nothing names removes them later.
            tracing::warn!(upload = id, error = %e, "cannot delete an upload");
        }
    }

    /// Deletes the contents doomed longer ago than the grace period, the uploads let go
    /// longer ago than `bound`, and (at most hourly) blocks nothing names.
    fn collect(&self, bound: Duration) -> Result<usize> {
        let pool = self.inner.db.pool.clone();
        let objects = self.inner.objects.clone();
        let grace = super::DOOMED_GRACE.as_secs_f64();
        let bound = bound.as_secs_f64();
        self.run(async move {
            let client = pool.get().await.map_err(pool_error)?;
            let uploads = client
                .query(
                    "DELETE FROM sharefs_uploads
                     WHERE (left_at IS NOT NULL AND left_at < now() - make_interval(secs => $1))
                        OR (held_until IS NOT NULL
                            AND held_until < now() - make_interval(secs => $1))
                     RETURNING id, durable",
                    &[&bound],
                )
                .await
                .map_err(pg_error)?;
            let doomed = client
                .query(
                    "DELETE FROM sharefs_doomed WHERE doomed_at < now() - make_interval(secs => $1)
                     RETURNING object, size",
                    &[&grace],
                )
                .await
                .map_err(pg_error)?;
            let expired = uploads.len();
            for row in uploads.iter().chain(doomed.iter()) {
                let (id, size): (i64, i64) = (row.get(0), row.get(1));
                if let Err(e) = objects.delete(rows::unbig(id), rows::unbig(size)).await {
                    tracing::warn!(content = id, error = %e, "cannot delete a content");
                }
            }
            Ok(expired)
        })
    }

    /// Deletes blocks older than [`super::ORPHAN_AGE`] that no entry, upload or doomed
    /// row names (a node died between writing them and the transaction naming them).
    fn collect_orphans(&self) -> Result<usize> {
        let pool = self.inner.db.pool.clone();
        let objects = self.inner.objects.clone();
        self.run(async move {
            let mut removed = 0;
            let client = pool.get().await.map_err(pool_error)?;
            for (content, age) in objects.contents().await? {
                if age < super::ORPHAN_AGE {
                    continue;
                }
                let named = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM sharefs_entries WHERE object = $1)
                             OR EXISTS (SELECT 1 FROM sharefs_uploads WHERE id = $1)
                             OR EXISTS (SELECT 1 FROM sharefs_doomed WHERE object = $1)",
                        &[&rows::big(content)],
                    )
                    .await
                    .map_err(pg_error)?;
                if !named.get::<_, bool>(0) {
                    // Its size is unknown: delete block by block until one is missing.
                    let mut n = 0u64;
                    while objects.delete_block(content, n).await? {
                        n += 1;
                    }
                    removed += 1;
                }
            }
            Ok(removed)
        })
    }
}

impl ClusterUpload {
    fn fail(&mut self, e: ServerError) {
        tracing::warn!(upload = self.id, error = %e, "upload failed");
        if self.failed.is_none() {
            self.failed = Some(e);
        }
    }

    /// Writes the partial last block and records the durable count, renewing the hold.
    fn make_durable(&mut self) -> Result<u64> {
        if let Some(e) = &self.failed {
            return Err(ServerError::Again(e.body()));
        }
        if self.durable == self.written {
            return Ok(self.durable);
        }
        let objects = self.cluster.inner.objects.clone();
        let pool = self.cluster.inner.db.pool.clone();
        let (id, n, block, written) = (
            self.id,
            self.block_start / BLOCK,
            Bytes::from(self.block.clone()),
            self.written,
        );
        self.cluster.run(async move {
            if !block.is_empty() {
                objects.put_block(id, n, block).await?;
            }
            let client = pool.get().await.map_err(pool_error)?;
            client
                .execute(
                    "UPDATE sharefs_uploads SET durable = $2,
                         held_until = now() + make_interval(secs => $3)
                     WHERE id = $1",
                    &[&rows::big(id), &rows::big(written), &lease_secs()],
                )
                .await
                .map_err(pg_error)?;
            Ok(())
        })?;
        self.durable = written;
        Ok(written)
    }
}

impl ContentWriter for ClusterUpload {
    fn id(&self) -> u64 {
        self.id
    }

    fn write_chunk(&mut self, offset: u64, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if offset != self.written {
            return self.fail(ServerError::Protocol(format!(
                "a chunk at {offset}, but {} bytes were received",
                self.written
            )));
        }
        if self.written + data.len() as u64 > self.allowance {
            let q = self.quota.unwrap_or(0);
            return self.fail(ServerError::QuotaExceeded(format!(
                "quota of {q} bytes reached"
            )));
        }
        self.hasher.update(data);
        self.written += data.len() as u64;
        self.block.extend_from_slice(data);
        while self.block.len() as u64 >= BLOCK {
            let rest = self.block.split_off(BLOCK as usize);
            let full = Bytes::from(std::mem::replace(&mut self.block, rest));
            let objects = self.cluster.inner.objects.clone();
            let (id, n) = (self.id, self.block_start / BLOCK);
            if let Err(e) = self
                .cluster
                .run(async move { objects.put_block(id, n, full).await })
            {
                return self.fail(e);
            }
            self.block_start += BLOCK;
        }
    }

    fn written(&self) -> u64 {
        self.written
    }

    fn sync_point(&mut self) -> Result<Box<dyn FnOnce() -> Result<u64> + Send>> {
        let durable = self.make_durable()?;
        Ok(Box::new(move || Ok(durable)))
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let end = self.written.min(offset.saturating_add(len as u64));
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        if offset < self.block_start {
            let upto = end.min(self.block_start);
            let objects = self.cluster.inner.objects.clone();
            let (id, size) = (self.id, self.block_start);
            let bytes = self.cluster.run(async move {
                objects
                    .read(id, size, offset, (upto - offset) as usize)
                    .await
            })?;
            out.extend_from_slice(&bytes);
        }
        if end > self.block_start {
            let from = offset.max(self.block_start) - self.block_start;
            let to = end - self.block_start;
            out.extend_from_slice(&self.block[from as usize..to as usize]);
        }
        Ok(out)
    }

    fn abort(&mut self) {
        self.discard = true;
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

impl Drop for ClusterUpload {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if self.discard || self.failed.is_some() {
            self.cluster.drop_upload(self.id, self.written);
            return;
        }
        // Let go for a resume: what is durable stays; the rest the client sends again.
        if let Err(e) = self.make_durable() {
            tracing::warn!(upload = self.id, error = %e, "cannot make a let-go upload durable");
        }
        let pool = self.cluster.inner.db.pool.clone();
        let id = self.id;
        let done = self.cluster.run(async move {
            let client = pool.get().await.map_err(pool_error)?;
            client
                .execute(
                    "UPDATE sharefs_uploads SET held_until = NULL, left_at = now() WHERE id = $1",
                    &[&rows::big(id)],
                )
                .await
                .map_err(pg_error)?;
            Ok(())
        });
        if let Err(e) = done {
            // Its hold lapses by itself.
            tracing::warn!(upload = id, error = %e, "cannot let an upload go");
        }
    }
}

/// A read handle on one content.
#[derive(Debug)]
pub struct ClusterReader {
    cluster: Cluster,
    info: FileInfo,
    ahead: Arc<ReadAhead>,
}

impl ContentReader for ClusterReader {
    fn info(&self) -> &FileInfo {
        &self.info
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let ahead = self.ahead.clone();
        self.cluster
            .run(async move { ahead.read(offset, len).await })
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn read_cached(&self, offset: u64, len: usize) -> Option<Bytes> {
        self.ahead.read_ready(offset, len)
    }
}

impl BlobStore for Cluster {
    fn begin_upload(
        &self,
        owner: &str,
        target: UploadTarget,
        size: Option<u64>,
        mode: Option<u32>,
        quota: Option<u64>,
    ) -> Result<Box<dyn ContentWriter>> {
        if let UploadTarget::At { name, .. } = &target {
            check_new_name(name)?;
        }
        let (o, t) = (owner.to_string(), target.clone());
        let declared = size.unwrap_or(0);
        let room = self.read(owner, move |tree| {
            Cluster::check_room(tree, &o, &t, declared, quota)
        })?;
        let meta = PartMeta {
            owner: owner.to_string(),
            target: target.clone(),
            mode,
            size,
        };
        let json = serde_json::to_string(&meta)
            .map_err(|e| ServerError::Internal(format!("an upload as JSON: {e}")))?;
        let pool = self.inner.db.pool.clone();
        let o = owner.to_string();
        let id = self.run(async move {
            let id = Cluster::next_content(&pool).await?;
            let client = pool.get().await.map_err(pool_error)?;
            let row = client
                .query_one(
                    "SELECT count(*) FROM sharefs_uploads WHERE owner = $1",
                    &[&o],
                )
                .await
                .map_err(pg_error)?;
            if row.get::<_, i64>(0) >= MAX_UPLOADS_PER_OWNER {
                return Err(ServerError::Busy("uploads in progress"));
            }
            client
                .execute(
                    "INSERT INTO sharefs_uploads (id, owner, meta, durable, held_until)
                     VALUES ($1, $2, $3, 0, now() + make_interval(secs => $4))",
                    &[&rows::big(id), &o, &json, &lease_secs()],
                )
                .await
                .map_err(pg_error)?;
            Ok(id)
        })?;
        Ok(Box::new(ClusterUpload {
            cluster: self.clone(),
            id,
            owner: owner.to_string(),
            target,
            mode,
            allowance: room,
            quota,
            hasher: blake3::Hasher::new(),
            written: 0,
            block: Vec::new(),
            block_start: 0,
            durable: 0,
            failed: None,
            discard: false,
            ended: false,
        }))
    }

    fn resume_upload(
        &self,
        owner: &str,
        id: u64,
        quota: Option<u64>,
    ) -> Result<Box<dyn ContentWriter>> {
        let pool = self.inner.db.pool.clone();
        let objects = self.inner.objects.clone();
        let o = owner.to_string();
        let (meta, durable, hasher, block) = self.run(async move {
            let client = pool.get().await.map_err(pool_error)?;
            let row = client
                .query_opt(
                    "UPDATE sharefs_uploads SET held_until = now() + make_interval(secs => $3),
                         left_at = NULL
                     WHERE id = $1 AND owner = $2 AND (held_until IS NULL OR held_until < now())
                     RETURNING meta, durable",
                    &[&rows::big(id), &o, &lease_secs()],
                )
                .await
                .map_err(pg_error)?;
            let Some(row) = row else {
                let held = client
                    .query_opt(
                        "SELECT 1 FROM sharefs_uploads WHERE id = $1 AND owner = $2",
                        &[&rows::big(id), &o],
                    )
                    .await
                    .map_err(pg_error)?;
                return Err(match held {
                    Some(_) => ServerError::InUse("the upload is in use"),
                    None => ServerError::NotFound(format!("upload {id}")),
                });
            };
            let json: String = row.get(0);
            let meta: PartMeta = serde_json::from_str(&json)
                .map_err(|e| ServerError::Backend(format!("an upload's record: {e}")))?;
            let durable = rows::unbig(row.get::<_, i64>(1));
            // Hash what is durable again; keep the partial last block to append to.
            let mut hasher = blake3::Hasher::new();
            let mut block = Vec::new();
            for n in 0..blocks_of(durable) {
                let bytes = objects.read(id, durable, n * BLOCK, BLOCK as usize).await?;
                hasher.update(&bytes);
                if bytes.len() < BLOCK as usize {
                    block = bytes.to_vec();
                }
            }
            Ok((meta, durable, hasher, block))
        })?;
        let (o, t) = (owner.to_string(), meta.target.clone());
        let declared = meta.size.unwrap_or(0).max(durable);
        let room = match self.read(owner, move |tree| {
            Cluster::check_room(tree, &o, &t, declared, quota)
        }) {
            Ok(room) => room,
            Err(e) => {
                self.drop_upload(id, durable);
                return Err(e);
            }
        };
        Ok(Box::new(ClusterUpload {
            cluster: self.clone(),
            id,
            owner: owner.to_string(),
            target: meta.target,
            mode: meta.mode,
            allowance: room,
            quota,
            hasher,
            written: durable,
            block_start: durable - block.len() as u64,
            block,
            durable,
            failed: None,
            discard: false,
            ended: false,
        }))
    }

    fn expire_uploads(&self, bound: Duration) -> usize {
        // Called every few seconds; the scan for unnamed blocks lists the whole bucket,
        // so it runs at most once per ORPHAN_SCAN_EVERY.
        let scan_due = self.inner.orphans_scanned.lock().is_ok_and(|mut last| {
            let due = last.is_none_or(|t| t.elapsed() >= super::ORPHAN_SCAN_EVERY);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        });
        if scan_due {
            match self.collect_orphans() {
                Ok(0) => {}
                Ok(n) => tracing::info!(contents = n, "deleted blocks no entry names"),
                Err(e) => tracing::warn!(error = %e, "cannot collect unnamed blocks"),
            }
        }
        match self.collect(bound) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot expire uploads");
                0
            }
        }
    }

    fn commit_upload(
        &self,
        upload: Box<dyn ContentWriter>,
        size: u64,
        blake3: &str,
        mtime_ns: Option<i64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        let mut upload = upload
            .into_any()
            .downcast::<ClusterUpload>()
            .map_err(|_| ServerError::Internal("an upload of another store".into()))?;
        if let Some(e) = upload.failed.take() {
            upload.discard = true;
            return Err(e);
        }
        if size != upload.written {
            upload.discard = true;
            return Err(ServerError::Protocol(format!(
                "commit of {size} bytes but {} were received",
                upload.written
            )));
        }
        let hash = upload.hasher.finalize().to_hex();
        if !hash.as_str().eq_ignore_ascii_case(blake3) {
            upload.discard = true;
            return Err(ServerError::ChecksumMismatch);
        }
        upload.make_durable()?;
        let result = self.install(
            &upload.owner,
            upload.target.clone(),
            upload.id,
            size,
            hash.as_str(),
            upload.mode,
            mtime_ns,
            upload.quota,
            Some(upload.id),
            cutoff,
        );
        match &result {
            Ok(_) => upload.ended = true,
            // Not run: kept for a resume and a new commit (dropping it lets it go).
            Err(ServerError::Expired(_)) => {}
            Err(_) => upload.discard = true,
        }
        result
    }

    fn put(
        &self,
        owner: &str,
        target: UploadTarget,
        data: &[u8],
        blake3: &str,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        quota: Option<u64>,
        cutoff: &Cutoff,
    ) -> Result<(FileInfo, Vec<Published>)> {
        if let UploadTarget::At { name, .. } = &target {
            check_new_name(name)?;
        }
        let hash = blake3::hash(data).to_hex();
        if !hash.as_str().eq_ignore_ascii_case(blake3) {
            return Err(ServerError::ChecksumMismatch);
        }
        let pool = self.inner.db.pool.clone();
        let objects = self.inner.objects.clone();
        let bytes = Bytes::copy_from_slice(data);
        let content = self.run(async move {
            let content = Cluster::next_content(&pool).await?;
            objects.put_all(content, bytes).await?;
            Ok(content)
        })?;
        let size = data.len() as u64;
        let result = self.install(
            owner,
            target,
            content,
            size,
            hash.as_str(),
            mode,
            mtime_ns,
            quota,
            None,
            cutoff,
        );
        if result.is_err() {
            let objects = self.inner.objects.clone();
            if let Err(e) = self.run(async move { objects.delete(content, size).await }) {
                tracing::warn!(content, error = %e, "cannot delete an uncommitted content");
            }
        }
        result
    }

    fn open_read(
        &self,
        owner: &str,
        id: u64,
        caller: Caller,
    ) -> Result<(Box<dyn ContentReader>, String)> {
        let o = owner.to_string();
        let (info, path, content) = self.read(owner, move |tree| {
            let (node, path) = access::readable_file(tree, &o, id, caller)?;
            Ok((node.info(&o), path, rows::object_of(node).unwrap_or(0)))
        })?;
        let runtime = self
            .inner
            .db
            .handle()
            .ok_or_else(|| ServerError::Internal("the storage is closed".into()))?;
        let ahead = ReadAhead::new(
            self.inner.objects.clone(),
            content,
            info.size,
            self.inner.read_ahead.clone(),
            runtime,
        );
        Ok((
            Box::new(ClusterReader {
                cluster: self.clone(),
                info,
                ahead: Arc::new(ahead),
            }),
            path,
        ))
    }
}
