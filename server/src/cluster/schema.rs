//! The cluster's tables, created and upgraded at start by numbered migrations, each
//! applied once in its own transaction under an advisory lock, so nodes starting together
//! apply each exactly once.
//!
//! - `sharefs_folders`: one row per user tree: the sequence number of its last change and
//!   the next entry id to hand out. Every change of a tree locks this row first, so the
//!   changes of one tree are serialised across nodes; different trees never wait on each
//!   other.
//! - `sharefs_entries`: one row per entry, keyed by (owner, id), with (owner, parent,
//!   name) unique: the embedded store's `Node`, column for column. `object` names the
//!   content's blocks in the object store.
//! - `sharefs_changes`: each tree's recent changes, as the ops a journal record holds
//!   (JSON), by sequence number: how a node brings its cached copy of a tree up to date
//!   without reading it whole.
//! - `sharefs_uploads`: uploads in progress, resumable from any node: what they are for,
//!   how many bytes the object store holds durably, and which node holds them until when.
//! - `sharefs_doomed`: contents no entry names any more, deleted from the object store
//!   after a grace period (readers that opened them keep reading meanwhile).
//! - `sharefs_objects`: a sequence naming contents and versions, unique across nodes.
//! - `sharefs_users`: the accounts, as `users.json` holds them for one machine.
//! - `sharefs_notes`: download notifications, pending until acknowledged and kept after
//!   as history (a bounded number per owner); digests of folded ones have `folded > 0`.

use crate::error::{Result, ServerError};

use super::pg_error;

/// The migrations, in order; the schema's version is how many have been applied.
const MIGRATIONS: &[&str] = &[
    // 1: trees, uploads and contents.
    "CREATE TABLE sharefs_folders (
         owner text PRIMARY KEY,
         seq bigint NOT NULL,
         next_id bigint NOT NULL
     );
     CREATE TABLE sharefs_entries (
         owner text NOT NULL,
         id bigint NOT NULL,
         parent bigint NOT NULL,
         name text NOT NULL,
         kind text NOT NULL,
         mode integer NOT NULL,
         size bigint NOT NULL,
         mtime_ns bigint NOT NULL,
         atime_ns bigint NOT NULL,
         ctime_ns bigint NOT NULL,
         version bigint NOT NULL,
         blake3 text NOT NULL,
         object bigint,
         target text,
         PRIMARY KEY (owner, id),
         CONSTRAINT sharefs_entries_place UNIQUE (owner, parent, name)
             DEFERRABLE INITIALLY DEFERRED
     );
     CREATE TABLE sharefs_changes (
         owner text NOT NULL,
         seq bigint NOT NULL,
         ops text NOT NULL,
         PRIMARY KEY (owner, seq)
     );
     CREATE TABLE sharefs_uploads (
         id bigint PRIMARY KEY,
         owner text NOT NULL,
         meta text NOT NULL,
         durable bigint NOT NULL DEFAULT 0,
         held_until timestamptz,
         left_at timestamptz
     );
     CREATE TABLE sharefs_doomed (
         object bigint PRIMARY KEY,
         size bigint NOT NULL,
         doomed_at timestamptz NOT NULL DEFAULT now()
     );
     CREATE SEQUENCE sharefs_objects START 1;",
    // 2: accounts and download notifications, shared by the nodes.
    "CREATE TABLE sharefs_users (
         name text PRIMARY KEY,
         password_hash text NOT NULL,
         quota bigint,
         created_ms bigint NOT NULL
     );
     CREATE TABLE sharefs_notes (
         id bigserial PRIMARY KEY,
         owner text NOT NULL,
         downloader text NOT NULL,
         file text NOT NULL,
         size bigint NOT NULL,
         first_ms bigint NOT NULL,
         last_ms bigint NOT NULL,
         count integer NOT NULL,
         folded integer NOT NULL DEFAULT 0,
         pending boolean NOT NULL DEFAULT true
     );
     CREATE INDEX sharefs_notes_owner ON sharefs_notes (owner, id);
     CREATE INDEX sharefs_notes_pending ON sharefs_notes (owner, id) WHERE pending;
     CREATE INDEX sharefs_notes_same ON sharefs_notes (owner, downloader, file, id);",
];

/// Applies the migrations this database lacks; returns the schema version.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<usize> {
    let tx = client.transaction().await.map_err(pg_error)?;
    // One node at a time; the lock ends with the transaction.
    tx.execute("SELECT pg_advisory_xact_lock(70700701)", &[])
        .await
        .map_err(pg_error)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS sharefs_schema (version integer NOT NULL)")
        .await
        .map_err(pg_error)?;
    let row = tx
        .query_one("SELECT coalesce(max(version), 0) FROM sharefs_schema", &[])
        .await
        .map_err(pg_error)?;
    let have: i32 = row.get(0);
    let have = usize::try_from(have).unwrap_or(0);
    if have > MIGRATIONS.len() {
        return Err(ServerError::Backend(format!(
            "the database's schema is version {have}, newer than this server's {}: \
             upgrade this server",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have) {
        tx.batch_execute(sql).await.map_err(pg_error)?;
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO sharefs_schema (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(pg_error)?;
        tracing::info!(version, "database schema migrated");
    }
    tx.commit().await.map_err(pg_error)?;
    Ok(MIGRATIONS.len())
}
