//! User accounts: argon2id password hashes and optional quotas, behind [`UserStore`];
//! kept in `users.json` ([`UserDb`], the embedded default) or in a cluster's database
//! ([`crate::cluster::accounts`]).
//!
//! The file is small (one entry per user) and rewritten atomically on every change. The
//! `sharefs-server user ...` commands write it while a server may be running, so writers
//! hold an exclusive `flock` on `users.lock`; the server only reads it, at every login and
//! listing, so account changes apply from the next login without a restart.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use sharefs_protocol::name::check_user_name;

use crate::error::{Result, ServerError};
use crate::fsutil;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    /// PHC string of an argon2id hash; the password itself is never stored.
    pub password_hash: String,
    /// Bytes this user may store; `None` means limited only by the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct UsersFile {
    pub(crate) users: BTreeMap<String, UserRecord>,
}

/// The accounts as one version of `users.json` has them: what a live session's login is
/// compared with (see [`crate::accounts`]).
#[derive(Debug, Clone)]
pub struct Accounts(pub(crate) Arc<UsersFile>);

impl Accounts {
    /// The password hash of `name`, if the account exists.
    pub fn password_hash(&self, name: &str) -> Option<&str> {
        self.0.users.get(name).map(|u| u.password_hash.as_str())
    }
}

/// Where accounts are kept; shared by every connection.
pub type Users = Arc<dyn UserStore>;

/// The accounts, wherever they are kept. Every method blocks (files, or the database).
pub trait UserStore: std::fmt::Debug + Send + Sync {
    fn add(&self, name: &str, password: &str, quota: Option<u64>) -> Result<()>;
    fn remove(&self, name: &str) -> Result<()>;
    fn set_password(&self, name: &str, password: &str) -> Result<()>;
    fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<()>;
    /// Every account (possibly as read a moment ago).
    fn list(&self) -> Result<BTreeMap<String, UserRecord>>;
    /// One account (possibly as read a moment ago): whether it exists.
    fn get(&self, name: &str) -> Result<Option<UserRecord>>;
    /// One account as it is now: what a login and a quota are checked against.
    fn fresh(&self, name: &str) -> Result<Option<UserRecord>> {
        self.get(name)
    }
    /// Reads the accounts again whatever was kept; returns how many there are.
    fn reload(&self) -> Result<usize>;
    /// The accounts as they are now, to compare live sessions with.
    fn accounts(&self) -> Result<Accounts>;

    /// Checks a password (argon2 takes tens of milliseconds: call it off the async
    /// runtime). Unknown users take as long as wrong passwords.
    fn verify(&self, name: &str, password: &str) -> Result<bool> {
        Ok(self.login(name, password)?.is_some())
    }

    /// Like [`UserStore::verify`], returning the password hash the password matched: a
    /// session is bound to it, and ends when it changes.
    fn login(&self, name: &str, password: &str) -> Result<Option<String>> {
        match self.fresh(name)? {
            Some(rec) => Ok(verify_hash(&rec.password_hash, password).then_some(rec.password_hash)),
            None => {
                let _ = verify_hash(dummy_hash(), password);
                Ok(None)
            }
        }
    }
}

/// Handle on `users.json` of one data directory. Reads are served from a parsed copy
/// kept while the file's identity (inode, size, ctime) is unchanged, so `sharefs-server
/// user ...` run beside a live server takes effect at once without a re-read per request.
#[derive(Debug, Clone)]
pub struct UserDb {
    dir: PathBuf,
    cached: Arc<Mutex<Option<Cached>>>,
}

/// The parsed file and the stamp it was read under.
type Cached = (Stamp, Arc<UsersFile>);

/// What identifies one written version of `users.json` (every save renames a new file in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    ctime_ns: i128,
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            ino: m.ino(),
            size: m.size(),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

/// An exclusive advisory lock held while a writer rewrites `users.json`.
struct WriteLock(File);

impl WriteLock {
    fn take(dir: &Path) -> io::Result<WriteLock> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(fsutil::FILE_MODE)
            .open(dir.join("users.lock"))?;
        // SAFETY: flock on a valid, owned file descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(WriteLock(f))
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// A hash computed once, verified against when the user is unknown, so an unknown user
/// costs the same time as a wrong password.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("not a password").unwrap_or_default())
}

pub fn hash_password(password: &str) -> Result<String> {
    if password.len() > sharefs_protocol::MAX_PASSWORD {
        return Err(ServerError::PasswordTooLong);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ServerError::Internal(format!("password hashing failed: {e}")))
}

pub(crate) fn verify_hash(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

impl UserDb {
    pub fn new(data_dir: &Path) -> UserDb {
        UserDb {
            dir: data_dir.to_path_buf(),
            cached: Arc::default(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("users.json")
    }

    fn load(&self) -> Result<UsersFile> {
        let path = self.path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ServerError::Corrupt {
                path: path.display().to_string(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(UsersFile::default()),
            Err(e) => Err(e.into()),
        }
    }

    /// The current users, re-read only if the file changed since the last read.
    fn current(&self) -> Result<Arc<UsersFile>> {
        let stamp = match fs::metadata(self.path()) {
            Ok(m) => Some(Stamp::of(&m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let Some(stamp) = stamp else {
            return Ok(Arc::default());
        };
        if let Ok(c) = self.cached.lock() {
            if let Some((s, users)) = c.as_ref() {
                if *s == stamp {
                    return Ok(users.clone());
                }
            }
        }
        // Stamp taken before the read: a change during the read makes the next call re-read.
        let users = Arc::new(self.load()?);
        if let Ok(mut c) = self.cached.lock() {
            *c = Some((stamp, users.clone()));
        }
        Ok(users)
    }

    fn save(&self, users: &UsersFile) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(users)
            .map_err(|e| ServerError::Internal(format!("cannot encode users: {e}")))?;
        fsutil::write_atomic(&self.dir, &self.path(), &bytes)?;
        Ok(())
    }

    fn modify<T>(&self, f: impl FnOnce(&mut UsersFile) -> Result<T>) -> Result<T> {
        fsutil::create_dir_durable(&self.dir)?;
        let _lock = WriteLock::take(&self.dir)?;
        let mut users = self.load()?;
        let out = f(&mut users)?;
        self.save(&users)?;
        Ok(out)
    }
}

impl UserStore for UserDb {
    fn add(&self, name: &str, password: &str, quota: Option<u64>) -> Result<()> {
        check_user_name(name).map_err(ServerError::InvalidName)?;
        let password_hash = hash_password(password)?;
        self.modify(|users| {
            if users.users.contains_key(name) {
                return Err(ServerError::UserExists(name.to_string()));
            }
            users.users.insert(
                name.to_string(),
                UserRecord {
                    password_hash,
                    quota,
                    created_ms: fsutil::now_ms(),
                },
            );
            Ok(())
        })
    }

    fn remove(&self, name: &str) -> Result<()> {
        self.modify(|users| match users.users.remove(name) {
            Some(_) => Ok(()),
            None => Err(ServerError::NoSuchUser(name.to_string())),
        })
    }

    fn set_password(&self, name: &str, password: &str) -> Result<()> {
        let password_hash = hash_password(password)?;
        self.modify(|users| match users.users.get_mut(name) {
            Some(rec) => {
                rec.password_hash = password_hash;
                Ok(())
            }
            None => Err(ServerError::NoSuchUser(name.to_string())),
        })
    }

    fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<()> {
        self.modify(|users| match users.users.get_mut(name) {
            Some(rec) => {
                rec.quota = quota;
                Ok(())
            }
            None => Err(ServerError::NoSuchUser(name.to_string())),
        })
    }

    fn list(&self) -> Result<BTreeMap<String, UserRecord>> {
        Ok(self.current()?.users.clone())
    }

    fn get(&self, name: &str) -> Result<Option<UserRecord>> {
        Ok(self.current()?.users.get(name).cloned())
    }

    /// Forgets the parsed copy, so the next read parses the file again whatever its stamp
    /// (a file edited by hand within one ctime tick keeps its stamp); returns how many
    /// accounts the file has now. Blocking.
    fn reload(&self) -> Result<usize> {
        if let Ok(mut c) = self.cached.lock() {
            *c = None;
        }
        Ok(self.current()?.users.len())
    }

    /// The current accounts (re-read only if the file changed): a `stat`.
    fn accounts(&self) -> Result<Accounts> {
        Ok(Accounts(self.current()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_verify_remove() {
        let dir = tempfile::tempdir().unwrap();
        let db = UserDb::new(dir.path());
        db.add("alice", "secret", None).unwrap();
        assert!(db.verify("alice", "secret").unwrap());
        assert!(!db.verify("alice", "wrong").unwrap());
        assert!(!db.verify("nobody", "secret").unwrap());
        assert!(matches!(
            db.add("alice", "x", None),
            Err(ServerError::UserExists(_))
        ));
        assert!(matches!(
            db.add("Bad Name", "x", None),
            Err(ServerError::InvalidName(_))
        ));
        db.set_password("alice", "new").unwrap();
        assert!(db.verify("alice", "new").unwrap());
        let text = fs::read_to_string(dir.path().join("users.json")).unwrap();
        assert!(!text.contains("secret") && !text.contains("\"new\""));
        assert!(text.contains("$argon2id$"));
        db.remove("alice").unwrap();
        assert!(db.list().unwrap().is_empty());
    }
}
