//! Entries as rows of `sharefs_entries` and back, and a change's ops as the statements that
//! make them.

use deadpool_postgres::GenericClient;
use sharefs_protocol::EntryKind;
use tokio_postgres::Row;

use crate::error::{Result, ServerError};
use crate::store::digest::Digest;
use crate::store::tree::{Content, Node, Op};

use super::pg_error;

/// The columns of an entry, in the order [`node`] reads them.
pub const COLUMNS: &str =
    "id, parent, name, kind, mode, size, mtime_ns, atime_ns, ctime_ns, version, blake3, object, target";

fn kind_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::File => "file",
        EntryKind::Dir => "dir",
        EntryKind::Symlink => "symlink",
    }
}

fn kind_of(name: &str) -> Result<EntryKind> {
    match name {
        "file" => Ok(EntryKind::File),
        "dir" => Ok(EntryKind::Dir),
        "symlink" => Ok(EntryKind::Symlink),
        other => Err(ServerError::Backend(format!(
            "an entry of unknown kind {other:?}"
        ))),
    }
}

/// The entry a row (of [`COLUMNS`]) holds.
pub fn node(row: &Row) -> Result<Node> {
    let get_i64 = |i: usize| -> Result<i64> { row.try_get(i).map_err(pg_error) };
    let object: Option<i64> = row.try_get(11).map_err(pg_error)?;
    let mode: i32 = row.try_get(4).map_err(pg_error)?;
    let kind: String = row.try_get(3).map_err(pg_error)?;
    Ok(Node {
        id: unbig(get_i64(0)?),
        parent: unbig(get_i64(1)?),
        name: row.try_get(2).map_err(pg_error)?,
        kind: kind_of(&kind)?,
        mode: u32::try_from(mode).unwrap_or(0),
        size: unbig(get_i64(5)?),
        mtime_ns: get_i64(6)?,
        atime_ns: get_i64(7)?,
        ctime_ns: get_i64(8)?,
        version: unbig(get_i64(9)?),
        blake3: Digest::from_hex(row.try_get(10).map_err(pg_error)?)
            .ok_or_else(|| ServerError::Internal("a row's blake3 is not a hash".into()))?,
        content: object.map(|o| Content::Blob(unbig(o))),
        target: row.try_get(12).map_err(pg_error)?,
    })
}

/// The object holding a node's content, if any.
pub fn object_of(node: &Node) -> Option<u64> {
    match node.content {
        Some(Content::Blob(o)) => Some(o),
        _ => None,
    }
}

/// Writes `ops` to `owner`'s rows.
pub async fn apply(client: &impl GenericClient, owner: &str, ops: &[Op]) -> Result<()> {
    for op in ops {
        match op {
            Op::Put(n) => {
                let mode = i32::try_from(n.mode).unwrap_or(0);
                let object = object_of(n).map(big);
                let blake3 = n.blake3.to_hex();
                client
                    .execute(
                        "INSERT INTO sharefs_entries (owner, id, parent, name, kind, mode, size,
                             mtime_ns, atime_ns, ctime_ns, version, blake3, object, target)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                         ON CONFLICT (owner, id) DO UPDATE SET parent = $3, name = $4,
                             kind = $5, mode = $6, size = $7, mtime_ns = $8, atime_ns = $9,
                             ctime_ns = $10, version = $11, blake3 = $12, object = $13,
                             target = $14",
                        &[
                            &owner,
                            &big(n.id),
                            &big(n.parent),
                            &n.name,
                            &kind_name(n.kind),
                            &mode,
                            &big(n.size),
                            &n.mtime_ns,
                            &n.atime_ns,
                            &n.ctime_ns,
                            &big(n.version),
                            &blake3,
                            &object,
                            &n.target,
                        ],
                    )
                    .await
                    .map_err(pg_error)?;
            }
            Op::Remove { id } => {
                client
                    .execute(
                        "DELETE FROM sharefs_entries WHERE owner = $1 AND id = $2",
                        &[&owner, &big(*id)],
                    )
                    .await
                    .map_err(pg_error)?;
            }
        }
    }
    Ok(())
}

/// Every entry of `owner`'s tree.
pub async fn load(client: &impl GenericClient, owner: &str) -> Result<Vec<Node>> {
    let rows = client
        .query(
            &format!("SELECT {COLUMNS} FROM sharefs_entries WHERE owner = $1"),
            &[&owner],
        )
        .await
        .map_err(pg_error)?;
    rows.iter().map(node).collect()
}

/// `n` as a bigint.
pub fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A bigint as `u64` (negative: 0).
pub fn unbig(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
