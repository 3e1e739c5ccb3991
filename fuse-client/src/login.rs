//! Stored logins (`sharefs login` / `logout`): the password of `user@server`, kept so that
//! no command needs it in an environment variable, a file of the user's own or on the
//! command line.
//!
//! The desktop's Secret Service (GNOME Keyring, KWallet, KeePassXC) holds it when one
//! answers on the session bus; otherwise it goes to `credentials.json` in the
//! configuration directory, a file only its owner can read (0600, in a 0700 directory),
//! the way `~/.netrc` and `~/.git-credentials` keep theirs. Lookups try the Secret Service
//! first, then the file; logout removes both.
//!
//! Secret Service calls run on a thread of their own with a small runtime and a deadline,
//! so callers in or out of an async runtime can use them and a bus that does not answer
//! delays a command by seconds, not forever.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secret_service::{EncryptionType, SecretService};

use crate::config;

/// How long a Secret Service call may take (a daemon started on demand needs a moment).
const BUS_DEADLINE: Duration = Duration::from_secs(10);

/// Where a stored password is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    SecretService,
    File(PathBuf),
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::SecretService => write!(f, "the Secret Service"),
            Store::File(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("no configuration directory: set HOME or XDG_CONFIG_HOME")]
    NoDir,
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// The key of a login: `user@server`.
fn key(server: &str, user: &str) -> String {
    format!("{user}@{server}")
}

/// The file that holds logins where no Secret Service does.
pub fn credentials_path() -> Result<PathBuf, LoginError> {
    config::config_dir()
        .map(|d| d.join("credentials.json"))
        .ok_or(LoginError::NoDir)
}

/// Stores the password: in the Secret Service if one answers, else in the file. Says
/// where it went.
pub fn store(server: &str, user: &str, password: &str) -> Result<Store, LoginError> {
    match on_bus(ss_store(
        server.to_string(),
        user.to_string(),
        password.to_string(),
    )) {
        Ok(()) => {
            // An older copy in the file would otherwise outlive a password change.
            let _ = file_remove(server, user);
            Ok(Store::SecretService)
        }
        Err(reason) => {
            tracing::info!(%reason, "no Secret Service; the login goes to a 0600 file");
            file_store(server, user, password)
        }
    }
}

/// The stored password of `user@server`, if any.
pub fn lookup(server: &str, user: &str) -> Option<String> {
    match on_bus(ss_lookup(server.to_string(), user.to_string())) {
        Ok(Some(p)) => return Some(p),
        Ok(None) => {}
        Err(reason) => tracing::debug!(%reason, "Secret Service not used"),
    }
    match file_lookup(server, user) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "stored logins unreadable");
            None
        }
    }
}

/// Removes the stored password from everywhere it is; says where it was.
pub fn remove(server: &str, user: &str) -> Result<Vec<Store>, LoginError> {
    let mut removed = Vec::new();
    match on_bus(ss_remove(server.to_string(), user.to_string())) {
        Ok(true) => removed.push(Store::SecretService),
        Ok(false) => {}
        Err(reason) => tracing::debug!(%reason, "Secret Service not used"),
    }
    if file_remove(server, user)? {
        removed.push(Store::File(credentials_path()?));
    }
    Ok(removed)
}

/// Runs a Secret Service call to its end on a thread of its own, within [`BUS_DEADLINE`].
fn on_bus<T: Send + 'static>(
    call: impl std::future::Future<Output = Result<T, secret_service::Error>> + Send + 'static,
) -> Result<T, String> {
    if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none()
        && std::env::var_os("XDG_RUNTIME_DIR").is_none()
    {
        return Err("no session bus".into());
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(call).map_err(|e| e.to_string()));
        let _ = tx.send(result);
    });
    // Waited for here rather than inside the thread's runtime, so that nothing the call
    // blocks on can hold the command past the deadline (the thread is left behind).
    rx.recv_timeout(BUS_DEADLINE)
        .unwrap_or_else(|_| Err(format!("no answer within {BUS_DEADLINE:?}")))
}

fn attributes<'a>(server: &'a str, user: &'a str) -> HashMap<&'a str, &'a str> {
    HashMap::from([
        ("application", "sharefs"),
        ("server", server),
        ("user", user),
    ])
}

async fn ss_store(
    server: String,
    user: String,
    password: String,
) -> Result<(), secret_service::Error> {
    let ss = SecretService::connect(EncryptionType::Dh).await?;
    let collection = ss.get_default_collection().await?;
    if collection.is_locked().await? {
        collection.unlock().await?;
    }
    collection
        .create_item(
            &format!("sharefs password for {}", key(&server, &user)),
            attributes(&server, &user),
            password.as_bytes(),
            true,
            "text/plain",
        )
        .await?;
    Ok(())
}

async fn ss_lookup(server: String, user: String) -> Result<Option<String>, secret_service::Error> {
    let ss = SecretService::connect(EncryptionType::Dh).await?;
    let found = ss.search_items(attributes(&server, &user)).await?;
    let item = match (found.unlocked.first(), found.locked.first()) {
        (Some(item), _) => item,
        (None, Some(item)) => {
            item.unlock().await?;
            item
        }
        (None, None) => return Ok(None),
    };
    let secret = item.get_secret().await?;
    Ok(String::from_utf8(secret).ok())
}

async fn ss_remove(server: String, user: String) -> Result<bool, secret_service::Error> {
    let ss = SecretService::connect(EncryptionType::Dh).await?;
    let found = ss.search_items(attributes(&server, &user)).await?;
    let mut any = false;
    for item in found.unlocked.iter().chain(found.locked.iter()) {
        item.delete().await?;
        any = true;
    }
    Ok(any)
}

type Logins = BTreeMap<String, String>;

fn read_file(path: &Path) -> Result<Logins, LoginError> {
    let err = |reason: String| LoginError::File {
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Logins::new()),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Replaces the file atomically with `logins`, readable by its owner only.
fn write_file(path: &Path, logins: &Logins) -> Result<(), LoginError> {
    let err = |reason: String| LoginError::File {
        path: path.to_path_buf(),
        reason,
    };
    let dir = path.parent().ok_or(LoginError::NoDir)?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(e.to_string()))?;
    }
    // tempfile creates the file 0600.
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| err(e.to_string()))?;
    let text = serde_json::to_string_pretty(logins).map_err(|e| err(e.to_string()))?;
    tmp.write_all(text.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| err(e.to_string()))?;
    tmp.persist(path).map_err(|e| err(e.error.to_string()))?;
    Ok(())
}

fn file_store(server: &str, user: &str, password: &str) -> Result<Store, LoginError> {
    let path = credentials_path()?;
    let mut logins = read_file(&path)?;
    logins.insert(key(server, user), password.to_string());
    write_file(&path, &logins)?;
    Ok(Store::File(path))
}

fn file_lookup(server: &str, user: &str) -> Result<Option<String>, LoginError> {
    let path = credentials_path()?;
    Ok(read_file(&path)?.remove(&key(server, user)))
}

fn file_remove(server: &str, user: &str) -> Result<bool, LoginError> {
    let path = credentials_path()?;
    let mut logins = read_file(&path)?;
    if logins.remove(&key(server, user)).is_none() {
        return Ok(false);
    }
    write_file(&path, &logins)?;
    Ok(true)
}
