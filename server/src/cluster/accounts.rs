//! The accounts of a cluster, in `sharefs_users`: one row per user, the same record
//! `users.json` keeps. Every node serves every account; `sharefs-server user …
//! --metadata URL` changes them for all nodes at once.
//!
//! Logins, quota checks and listings read the table as it is now. Whether an account
//! exists (asked at every request naming a user's tree) is answered from a copy at most
//! [`FRESH_FOR`] old when the copy has it, from the table otherwise; the account watch ([`crate::accounts`]) reads the table
//! every quarter second, which both refreshes that copy and ends the sessions of removed
//! or re-passworded accounts on every node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sharefs_protocol::name::check_user_name;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::rows::{self, big, unbig};
use super::{pg_error, Db};
use crate::error::{Result, ServerError};
use crate::fsutil;
use crate::store::tree::{Op, Tree};
use crate::users::{hash_password, Accounts, UserRecord, UserStore, UsersFile};

/// How old the copy of the table may be.
pub const FRESH_FOR: Duration = Duration::from_secs(1);

const COLUMNS: &str = "name, password_hash, quota, created_ms";

/// A statement's parameter, owned, to move into the database's runtime.
type Param = Box<dyn ToSql + Send + Sync>;

/// The accounts in a cluster's database.
#[derive(Debug)]
pub struct PgAccounts {
    db: Db,
    cached: Mutex<Option<(Instant, Arc<UsersFile>)>>,
}

fn record(row: &Row) -> Result<(String, UserRecord)> {
    let quota: Option<i64> = row.try_get(2).map_err(pg_error)?;
    Ok((
        row.try_get(0).map_err(pg_error)?,
        UserRecord {
            password_hash: row.try_get(1).map_err(pg_error)?,
            quota: quota.map(unbig),
            created_ms: row.try_get(3).map_err(pg_error)?,
        },
    ))
}

impl PgAccounts {
    pub fn new(db: Db) -> PgAccounts {
        PgAccounts {
            db,
            cached: Mutex::default(),
        }
    }

    /// Runs one statement changing `name`'s row; forgets the copy of the table. An
    /// account that is not there is [`ServerError::NoSuchUser`], or with `taken`
    /// (an insert that found the name taken) [`ServerError::UserExists`].
    fn change(&self, sql: &'static str, name: &str, params: Vec<Param>, taken: bool) -> Result<()> {
        let db = self.db.clone();
        let touched = self.db.run(async move {
            let client = db.client().await?;
            let params: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                .collect();
            client.execute(sql, &params).await.map_err(pg_error)
        })?;
        self.forget();
        match (touched, taken) {
            (0, true) => Err(ServerError::UserExists(name.to_string())),
            (0, false) => Err(ServerError::NoSuchUser(name.to_string())),
            _ => Ok(()),
        }
    }

    fn forget(&self) {
        if let Ok(mut c) = self.cached.lock() {
            *c = None;
        }
    }

    /// The whole table, read now.
    fn load(&self) -> Result<Arc<UsersFile>> {
        let db = self.db.clone();
        let rows = self.db.run(async move {
            let client = db.client().await?;
            client
                .query(&format!("SELECT {COLUMNS} FROM sharefs_users"), &[])
                .await
                .map_err(pg_error)
        })?;
        let users = rows
            .iter()
            .map(record)
            .collect::<Result<BTreeMap<_, _>>>()?;
        let users = Arc::new(UsersFile { users });
        if let Ok(mut c) = self.cached.lock() {
            *c = Some((Instant::now(), users.clone()));
        }
        Ok(users)
    }

    /// The table as read at most [`FRESH_FOR`] ago.
    fn current(&self) -> Result<Arc<UsersFile>> {
        if let Ok(c) = self.cached.lock() {
            if let Some((at, users)) = c.as_ref() {
                if at.elapsed() < FRESH_FOR {
                    return Ok(users.clone());
                }
            }
        }
        self.load()
    }

    /// Removes everything `name` stored: the tree's rows (its contents doomed, deleted
    /// from the object store after the grace period; the tree an empty root again), its
    /// uploads and its notifications.
    pub fn purge(&self, name: &str) -> Result<()> {
        check_user_name(name).map_err(ServerError::InvalidName)?;
        let db = self.db.clone();
        let name = name.to_string();
        self.db.run(async move {
            let mut client = db.client().await?;
            let tx = client.transaction().await.map_err(pg_error)?;
            // Records and acknowledgements of notifications wait, then find none.
            tx.execute(
                "SELECT pg_advisory_xact_lock(70700702, hashtext($1))",
                &[&name],
            )
            .await
            .map_err(pg_error)?;
            // Waits for a change of the tree in progress.
            let folder = tx
                .query_opt(
                    "SELECT seq FROM sharefs_folders WHERE owner = $1 FOR UPDATE",
                    &[&name],
                )
                .await
                .map_err(pg_error)?;
            tx.execute(
                "INSERT INTO sharefs_doomed (object, size)
                 SELECT DISTINCT ON (object) object, size FROM sharefs_entries
                 WHERE owner = $1 AND object IS NOT NULL
                 ON CONFLICT (object) DO NOTHING",
                &[&name],
            )
            .await
            .map_err(pg_error)?;
            for table in [
                "DELETE FROM sharefs_entries WHERE owner = $1",
                "DELETE FROM sharefs_changes WHERE owner = $1",
                "DELETE FROM sharefs_notes WHERE owner = $1",
                // Their blocks are orphans now, collected in a day.
                "DELETE FROM sharefs_uploads WHERE owner = $1",
            ] {
                tx.execute(table, &[&name]).await.map_err(pg_error)?;
            }
            if let Some(row) = folder {
                // The tree is an empty root again, at a new sequence number whose change
                // record is missing: a node that cached the old tree reloads it (and tells
                // its sessions to drop theirs) instead of taking the old one as current.
                let seq = row.try_get::<_, i64>(0).map_err(pg_error)? + 1;
                let root = Tree::empty(fsutil::now_ns());
                let nodes: Vec<Op> = root.nodes().cloned().map(Op::Put).collect();
                rows::apply(&tx, &name, &nodes).await?;
                tx.execute(
                    "UPDATE sharefs_folders SET seq = $2, next_id = $3 WHERE owner = $1",
                    &[&name, &seq, &big(root.next_id())],
                )
                .await
                .map_err(pg_error)?;
                tx.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&super::feed::CHANNEL, &format!("{seq} {name}")],
                )
                .await
                .map_err(pg_error)?;
            }
            tx.commit().await.map_err(pg_error)
        })
    }

    /// Bytes of file contents each user's tree holds.
    pub fn stored(&self) -> Result<BTreeMap<String, u64>> {
        let db = self.db.clone();
        let rows = self.db.run(async move {
            let client = db.client().await?;
            client
                .query(
                    "SELECT owner, sum(size)::bigint FROM sharefs_entries
                     WHERE kind = 'file' GROUP BY owner",
                    &[],
                )
                .await
                .map_err(pg_error)
        })?;
        rows.iter()
            .map(|row| {
                let owner: String = row.try_get(0).map_err(pg_error)?;
                let size: Option<i64> = row.try_get(1).map_err(pg_error)?;
                Ok((owner, size.map_or(0, unbig)))
            })
            .collect()
    }
}

impl UserStore for PgAccounts {
    fn add(&self, name: &str, password: &str, quota: Option<u64>) -> Result<()> {
        check_user_name(name).map_err(ServerError::InvalidName)?;
        let password_hash = hash_password(password)?;
        self.change(
            "INSERT INTO sharefs_users (name, password_hash, quota, created_ms)
             VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
            name,
            vec![
                Box::new(name.to_string()),
                Box::new(password_hash),
                Box::new(quota.map(big)),
                Box::new(fsutil::now_ms()),
            ],
            true,
        )
    }

    fn remove(&self, name: &str) -> Result<()> {
        self.change(
            "DELETE FROM sharefs_users WHERE name = $1",
            name,
            vec![Box::new(name.to_string())],
            false,
        )
    }

    fn set_password(&self, name: &str, password: &str) -> Result<()> {
        let password_hash = hash_password(password)?;
        self.change(
            "UPDATE sharefs_users SET password_hash = $2 WHERE name = $1",
            name,
            vec![Box::new(name.to_string()), Box::new(password_hash)],
            false,
        )
    }

    fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<()> {
        self.change(
            "UPDATE sharefs_users SET quota = $2 WHERE name = $1",
            name,
            vec![Box::new(name.to_string()), Box::new(quota.map(big))],
            false,
        )
    }

    fn list(&self) -> Result<BTreeMap<String, UserRecord>> {
        Ok(self.load()?.users.clone())
    }

    fn get(&self, name: &str) -> Result<Option<UserRecord>> {
        match self.current()?.users.get(name) {
            Some(user) => Ok(Some(user.clone())),
            // Perhaps added since the copy was read: an account is usable at once.
            None => self.fresh(name),
        }
    }

    fn fresh(&self, name: &str) -> Result<Option<UserRecord>> {
        let db = self.db.clone();
        let user = name.to_string();
        let row = self.db.run(async move {
            let client = db.client().await?;
            client
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM sharefs_users WHERE name = $1"),
                    &[&user],
                )
                .await
                .map_err(pg_error)
        })?;
        row.as_ref()
            .map(record)
            .transpose()
            .map(|r| r.map(|(_, rec)| rec))
    }

    fn reload(&self) -> Result<usize> {
        Ok(self.load()?.users.len())
    }

    fn accounts(&self) -> Result<Accounts> {
        Ok(Accounts(self.load()?))
    }
}
