//! The download notifications of a cluster, in `sharefs_notes`: one row per notification,
//! pending until its owner acknowledges it, then kept as history (the newest
//! [`HISTORY_KEPT`] per owner). Ids are the table's, unique across nodes, so a client
//! that moves from one node to another never takes one notification for two.
//!
//! Recording one is one transaction, serialised per owner by an advisory lock so that
//! two nodes coalescing the same downloads do not both make a notification: it coalesces
//! or inserts, on the database's clock (the nodes' may differ), and announces the new row
//! with `NOTIFY sharefs_notes, '<node> <id>'`. Folding the oldest pending into a digest
//! past the bound, and trimming the history, follow in a transaction of their own, so
//! their failure never undoes a record. If the record itself cannot be made (the
//! database fails), the download fails with it: nobody downloads unnoticed. The node that recorded it pushes
//! it to its own sessions at once; every other node reads the row on the announcement
//! and pushes it to the owner's sessions it serves ([`super::feed`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::GenericClient;
use sharefs_protocol::Notification;
use tokio_postgres::Row;

use super::rows::{big, unbig};
use super::{pg_error, Db};
use crate::error::Result;
use crate::notes::{digest_text, empty_digest, fold_into, NoteStore};

/// The channel new notifications are announced on.
pub const CHANNEL: &str = "sharefs_notes";

/// Notifications kept per owner once acknowledged (the history `sharefs notifications`
/// shows the end of).
pub const HISTORY_KEPT: i64 = 10_000;

/// The history is trimmed at a node's first record and every this many after.
const TRIM_EVERY: u64 = 64;

/// The advisory lock (with the owner's name hashed) that serialises one owner's records,
/// acknowledgements and purge across nodes.
const OWNER_LOCK: &str = "SELECT pg_advisory_xact_lock(70700702, hashtext($1))";

/// The database's clock in milliseconds since the epoch: the nodes' clocks may differ,
/// and coalescing compares times written by different nodes.
const NOW_MS: &str = "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint";

const COLUMNS: &str = "id, owner, downloader, file, size, first_ms, last_ms, count, folded";

/// The notification a row (of [`COLUMNS`]) holds.
fn notification(row: &Row) -> Result<Notification> {
    let count: i32 = row.try_get(7).map_err(pg_error)?;
    let folded: i32 = row.try_get(8).map_err(pg_error)?;
    Ok(Notification {
        id: unbig(row.try_get(0).map_err(pg_error)?),
        owner: row.try_get(1).map_err(pg_error)?,
        downloader: row.try_get(2).map_err(pg_error)?,
        file: row.try_get(3).map_err(pg_error)?,
        size: unbig(row.try_get(4).map_err(pg_error)?),
        first_ms: row.try_get(5).map_err(pg_error)?,
        last_ms: row.try_get(6).map_err(pg_error)?,
        count: u32::try_from(count).unwrap_or(0),
        folded: u32::try_from(folded).unwrap_or(0),
    })
}

fn int(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The notification `id`, if it is still there.
pub async fn fetch(client: &impl GenericClient, id: i64) -> Result<Option<Notification>> {
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM sharefs_notes WHERE id = $1 AND pending"),
            &[&id],
        )
        .await
        .map_err(pg_error)?;
    row.as_ref().map(notification).transpose()
}

/// The notifications in a cluster's database.
#[derive(Debug)]
pub struct PgNotes {
    db: Db,
    window: Duration,
    max_pending: usize,
    /// Records made by this node, to trim the history every [`TRIM_EVERY`].
    made: AtomicU64,
}

impl PgNotes {
    pub fn new(db: Db, window: Duration, max_pending: usize) -> PgNotes {
        PgNotes {
            db,
            window,
            max_pending: max_pending.max(1),
            made: AtomicU64::new(0),
        }
    }

    /// Folds past the bound and trims the history of `owner`, in a transaction of its
    /// own after the record's: a failure here is logged and leaves the record as it is.
    fn tidy(&self, owner: &str, trim: bool) {
        let db = self.db.clone();
        let owner = owner.to_string();
        let max_pending = self.max_pending;
        let tidied = self.db.run(async move {
            let mut client = db.client().await?;
            let tx = client.transaction().await.map_err(pg_error)?;
            tx.execute(OWNER_LOCK, &[&owner]).await.map_err(pg_error)?;
            bound_pending(&tx, &owner, max_pending).await?;
            if trim {
                tx.execute(
                    "DELETE FROM sharefs_notes WHERE owner = $1 AND NOT pending AND id <=
                         (SELECT id FROM sharefs_notes WHERE owner = $1
                          ORDER BY id DESC OFFSET $2 LIMIT 1)",
                    &[&owner, &HISTORY_KEPT],
                )
                .await
                .map_err(pg_error)?;
            }
            tx.commit().await.map_err(pg_error)
        });
        if let Err(e) = tidied {
            tracing::warn!(error = %e, "cannot fold or trim notifications; the next record tries again");
        }
    }
}

/// Past `max` pending notifications of `owner`, folds the oldest into the digest (down to
/// 7/8 of the bound, so the digest is rewritten once per many records).
async fn bound_pending(tx: &impl GenericClient, owner: &str, max: usize) -> Result<()> {
    let row = tx
        .query_one(
            "SELECT count(*) FROM sharefs_notes WHERE owner = $1 AND pending AND folded = 0",
            &[&owner],
        )
        .await
        .map_err(pg_error)?;
    let pending = unbig(row.try_get(0).map_err(pg_error)?);
    let max = max as u64;
    if pending <= max {
        return Ok(());
    }
    let keep = max - max / 8;
    let digests = tx
        .query(
            &format!(
                "SELECT {COLUMNS} FROM sharefs_notes WHERE owner = $1 AND pending AND folded > 0"
            ),
            &[&owner],
        )
        .await
        .map_err(pg_error)?;
    let oldest = tx
        .query(
            &format!(
                "SELECT {COLUMNS} FROM sharefs_notes WHERE owner = $1 AND pending AND folded = 0
                 ORDER BY id LIMIT $2"
            ),
            &[&owner, &big(pending - keep)],
        )
        .await
        .map_err(pg_error)?;
    let mut digest = empty_digest(owner);
    let mut old_digests = Vec::with_capacity(digests.len());
    for row in &digests {
        let n = notification(row)?;
        fold_into(&mut digest, &n);
        old_digests.push(big(n.id));
    }
    let mut ids = Vec::with_capacity(oldest.len());
    for row in &oldest {
        let n = notification(row)?;
        fold_into(&mut digest, &n);
        ids.push(big(n.id));
    }
    digest.file = digest_text(digest.folded);
    tx.execute(
        "INSERT INTO sharefs_notes
             (owner, downloader, file, size, first_ms, last_ms, count, folded)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &owner,
            &digest.downloader,
            &digest.file,
            &big(digest.size),
            &digest.first_ms,
            &digest.last_ms,
            &int(digest.count),
            &int(digest.folded),
        ],
    )
    .await
    .map_err(pg_error)?;
    // Folded ones stay as history; an old digest is not history.
    tx.execute(
        "DELETE FROM sharefs_notes WHERE id = ANY($1)",
        &[&old_digests],
    )
    .await
    .map_err(pg_error)?;
    tx.execute(
        "UPDATE sharefs_notes SET pending = false WHERE id = ANY($1)",
        &[&ids],
    )
    .await
    .map_err(pg_error)?;
    tracing::info!(
        owner,
        folded = ids.len(),
        total = digest.folded,
        "too many pending notifications; the oldest are folded into a digest"
    );
    Ok(())
}

impl NoteStore for PgNotes {
    fn record(
        &self,
        owner: &str,
        downloader: &str,
        file: &str,
        size: u64,
    ) -> Result<Option<Notification>> {
        let db = self.db.clone();
        let (owner, downloader, file) =
            (owner.to_string(), downloader.to_string(), file.to_string());
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        let recorded = self.db.run(async move {
            let mut client = db.client().await?;
            let tx = client.transaction().await.map_err(pg_error)?;
            // One owner's records one at a time, across nodes.
            tx.execute(OWNER_LOCK, &[&owner]).await.map_err(pg_error)?;
            let now: i64 = tx
                .query_one(NOW_MS, &[])
                .await
                .map_err(pg_error)?
                .try_get(0)
                .map_err(pg_error)?;
            let coalesced = tx
                .query_opt(
                    "UPDATE sharefs_notes SET count = count + 1, last_ms = $4, size = $5
                     WHERE id = (SELECT id FROM sharefs_notes
                                 WHERE owner = $1 AND downloader = $2 AND file = $3
                                   AND folded = 0 AND last_ms >= $6
                                 ORDER BY id DESC LIMIT 1)
                     RETURNING count",
                    &[
                        &owner,
                        &downloader,
                        &file,
                        &now,
                        &big(size),
                        &now.saturating_sub(window_ms),
                    ],
                )
                .await
                .map_err(pg_error)?;
            if let Some(row) = coalesced {
                tx.commit().await.map_err(pg_error)?;
                let count: i32 = row.try_get(0).map_err(pg_error)?;
                tracing::debug!(%owner, %downloader, %file, count, "download coalesced");
                return Ok(None);
            }
            let row = tx
                .query_one(
                    "INSERT INTO sharefs_notes
                         (owner, downloader, file, size, first_ms, last_ms, count)
                     VALUES ($1, $2, $3, $4, $5, $5, 1) RETURNING id",
                    &[&owner, &downloader, &file, &big(size), &now],
                )
                .await
                .map_err(pg_error)?;
            let id: i64 = row.try_get(0).map_err(pg_error)?;
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &format!("{} {id}", db.node)],
            )
            .await
            .map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)?;
            tracing::info!(%owner, %downloader, %file, id, "download notification recorded");
            Ok(Some(Notification {
                id: unbig(id),
                downloader,
                owner,
                file,
                size,
                first_ms: now,
                last_ms: now,
                count: 1,
                folded: 0,
            }))
        })?;
        if let Some(n) = &recorded {
            let made = self.made.fetch_add(1, Ordering::Relaxed) + 1;
            self.tidy(&n.owner, made % TRIM_EVERY == 1);
        }
        Ok(recorded)
    }

    fn pending(&self, user: &str) -> Result<Vec<Notification>> {
        let db = self.db.clone();
        let user = user.to_string();
        let rows = self.db.run(async move {
            let client = db.client().await?;
            client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM sharefs_notes WHERE owner = $1 AND pending
                         ORDER BY folded = 0, id"
                    ),
                    &[&user],
                )
                .await
                .map_err(pg_error)
        })?;
        rows.iter().map(notification).collect()
    }

    fn recent(&self, user: &str, limit: usize) -> Result<Vec<Notification>> {
        let db = self.db.clone();
        let user = user.to_string();
        let limit = big(limit as u64);
        let rows = self.db.run(async move {
            let client = db.client().await?;
            client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM sharefs_notes WHERE owner = $1 AND folded = 0
                         ORDER BY id DESC LIMIT $2"
                    ),
                    &[&user, &limit],
                )
                .await
                .map_err(pg_error)
        })?;
        let mut out = rows.iter().map(notification).collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    fn ack(&self, user: &str, ids: &[u64]) -> Result<usize> {
        let db = self.db.clone();
        let user = user.to_string();
        let ids: Vec<i64> = ids.iter().map(|id| big(*id)).collect();
        let acked = self.db.run(async move {
            let mut client = db.client().await?;
            let tx = client.transaction().await.map_err(pg_error)?;
            tx.execute(OWNER_LOCK, &[&user]).await.map_err(pg_error)?;
            // A digest is no history: it goes once seen.
            let digests = tx
                .execute(
                    "DELETE FROM sharefs_notes
                     WHERE owner = $1 AND pending AND folded > 0 AND id = ANY($2)",
                    &[&user, &ids],
                )
                .await
                .map_err(pg_error)?;
            let acked = tx
                .execute(
                    "UPDATE sharefs_notes SET pending = false
                     WHERE owner = $1 AND pending AND id = ANY($2)",
                    &[&user, &ids],
                )
                .await
                .map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)?;
            Ok(digests + acked)
        })?;
        Ok(usize::try_from(acked).unwrap_or(usize::MAX))
    }
}
