//! The configuration file, `$XDG_CONFIG_HOME/sharefs/config.toml` (default
//! `~/.config/sharefs/config.toml`): where to connect, as whom, how to trust the server,
//! and how to mount, so that commands need no flags.
//!
//! ```toml
//! [default]
//! server = "files.example.org:7070"
//! user = "alice"
//! server_fingerprint = "SHA256:..."
//! [default.mount]
//! mountpoint = "~/Share"
//!
//! [profiles.work]
//! server = "share.work.example:7070"
//! ca = "~/.config/sharefs/work-ca.pem"
//! ```
//!
//! `[default]` is the profile used without `--profile`; a named profile takes what it
//! leaves unset from `[default]`. Flags and environment variables override both. A
//! missing file is an empty configuration; a file with an unknown key is an error, so a
//! misspelt setting is not silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One profile: connection settings and mount defaults, every one optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `HOST:PORT` of the server.
    pub server: Option<String>,
    pub user: Option<String>,
    /// File whose first line is the password (else the stored login, else a prompt).
    pub password_file: Option<PathBuf>,
    /// Pinned certificate fingerprint (`SHA256:` and 64 hex digits).
    pub server_fingerprint: Option<String>,
    /// CA certificate (PEM) to verify the server against.
    pub ca: Option<PathBuf>,
    /// File of pinned server fingerprints.
    pub known_servers: Option<PathBuf>,
    /// Connect without TLS.
    pub plaintext: Option<bool>,
    /// Seconds to wait for the server to answer a connection.
    pub connect_timeout: Option<u64>,
    #[serde(default)]
    pub mount: MountDefaults,
}

/// Defaults of `sharefs mount`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountDefaults {
    /// Where to mount when no mount point is given.
    pub mountpoint: Option<PathBuf>,
    pub allow_other: Option<bool>,
    /// Seconds an operation waits for an unreachable server.
    pub timeout: Option<u64>,
    pub cache_dir: Option<PathBuf>,
    pub threads: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub default: Profile,
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("no profile {name:?} in {path}")]
    NoProfile { name: String, path: PathBuf },
}

/// `~/.config/sharefs` (or `$XDG_CONFIG_HOME/sharefs`): the configuration file and, without
/// a Secret Service, stored logins.
pub fn config_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".config")))?;
    Some(base.join("sharefs"))
}

/// The configuration file's path.
pub fn config_path() -> Option<PathBuf> {
    config_dir().map(|d| d.join("config.toml"))
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `~/x` as `$HOME/x`; other paths as they are.
pub fn expand_home(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), home()) {
        (Ok(rest), Some(h)) => h.join(rest),
        _ => path.to_path_buf(),
    }
}

impl Config {
    /// Reads the configuration file; a missing one is an empty configuration.
    pub fn load() -> Result<Config, ConfigError> {
        match config_path() {
            Some(path) => Config::load_from(&path),
            None => Ok(Config::default()),
        }
    }

    pub fn load_from(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
        };
        Config::parse(&text).map_err(|reason| ConfigError::Parse {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }

    /// The profile `name` over `[default]`, or `[default]` itself without a name.
    pub fn profile(&self, name: Option<&str>) -> Result<Profile, ConfigError> {
        let Some(name) = name.filter(|n| *n != "default") else {
            return Ok(self.default.clone().expanded());
        };
        let named = self
            .profiles
            .get(name)
            .ok_or_else(|| ConfigError::NoProfile {
                name: name.to_string(),
                path: config_path().unwrap_or_else(|| PathBuf::from("config.toml")),
            })?;
        Ok(named.clone().over(&self.default).expanded())
    }
}

impl Profile {
    /// This profile with what it leaves unset taken from `base`.
    fn over(self, base: &Profile) -> Profile {
        let b = base.clone();
        Profile {
            server: self.server.or(b.server),
            user: self.user.or(b.user),
            password_file: self.password_file.or(b.password_file),
            server_fingerprint: self.server_fingerprint.or(b.server_fingerprint),
            ca: self.ca.or(b.ca),
            known_servers: self.known_servers.or(b.known_servers),
            plaintext: self.plaintext.or(b.plaintext),
            connect_timeout: self.connect_timeout.or(b.connect_timeout),
            mount: MountDefaults {
                mountpoint: self.mount.mountpoint.or(b.mount.mountpoint),
                allow_other: self.mount.allow_other.or(b.mount.allow_other),
                timeout: self.mount.timeout.or(b.mount.timeout),
                cache_dir: self.mount.cache_dir.or(b.mount.cache_dir),
                threads: self.mount.threads.or(b.mount.threads),
            },
        }
    }

    /// Paths with `~/` made absolute.
    fn expanded(mut self) -> Profile {
        for p in [
            &mut self.password_file,
            &mut self.ca,
            &mut self.known_servers,
            &mut self.mount.mountpoint,
            &mut self.mount.cache_dir,
        ]
        .into_iter()
        .flatten()
        {
            *p = expand_home(p);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
        [default]
        server = "home.example:7070"
        user = "alice"
        [default.mount]
        mountpoint = "/mnt/share"
        timeout = 5

        [profiles.work]
        server = "work.example:7070"
        ca = "/etc/work-ca.pem"
        [profiles.work.mount]
        allow_other = true
    "#;

    #[test]
    fn named_profiles_inherit_the_default() {
        let config = Config::parse(TEXT).unwrap();
        let home = config.profile(None).unwrap();
        assert_eq!(home.server.as_deref(), Some("home.example:7070"));
        assert_eq!(home.mount.allow_other, None);
        assert_eq!(config.profile(Some("default")).unwrap(), home);
        let work = config.profile(Some("work")).unwrap();
        assert_eq!(work.server.as_deref(), Some("work.example:7070"));
        assert_eq!(work.user.as_deref(), Some("alice"));
        assert_eq!(work.ca.as_deref(), Some(Path::new("/etc/work-ca.pem")));
        assert_eq!(work.mount.allow_other, Some(true));
        assert_eq!(work.mount.timeout, Some(5));
        assert_eq!(
            work.mount.mountpoint.as_deref(),
            Some(Path::new("/mnt/share"))
        );
        assert!(matches!(
            config.profile(Some("nope")),
            Err(ConfigError::NoProfile { .. })
        ));
    }

    #[test]
    fn unknown_keys_and_bad_types_are_errors() {
        let err = Config::parse("[default]\nsever = \"x\"\n").unwrap_err();
        assert!(err.contains("sever"), "{err}");
        assert!(Config::parse("[default]\nplaintext = \"yes\"\n").is_err());
        assert!(Config::parse("").unwrap().profiles.is_empty());
    }
}
