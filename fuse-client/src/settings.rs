//! Connection settings shared by every client command (SPEC section 2): `--server`
//! (`SHAREFS_SERVER`), `--user` (`SHAREFS_USER`), and the password from `SHAREFS_PASSWORD`,
//! `--password-file`, the login stored by `sharefs login`, or an interactive prompt.
//!
//! Each setting comes from the first that gives it: the flag, its environment variable,
//! the profile of the configuration file (`--profile`/`SHAREFS_PROFILE`, else
//! `[default]`; see [`crate::config`]), the built-in default.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use sharefs_protocol::fingerprint::parse_fingerprint;

use crate::config::{Config, Profile};
use crate::login;
use crate::remote::ConnectOptions;
use crate::tls::TrustOptions;

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Profile of the configuration file to use (default: its [default] section).
    #[arg(long, global = true, env = "SHAREFS_PROFILE")]
    pub profile: Option<String>,
    /// Server address, HOST:PORT [default: 127.0.0.1:7070]; the nodes of a cluster as a
    /// comma-separated list (tried in turn when one is unreachable).
    #[arg(long, global = true, env = "SHAREFS_SERVER")]
    pub server: Option<String>,
    /// User name (defaults to $USER).
    #[arg(long, global = true, env = "SHAREFS_USER")]
    pub user: Option<String>,
    /// File whose first line is the password.
    #[arg(long, global = true)]
    pub password_file: Option<PathBuf>,
    /// Seconds to wait for the server to answer a connection [default: 10].
    #[arg(long, global = true)]
    pub connect_timeout: Option<u64>,
    /// Connect without TLS (only to a server started with --plaintext, on a trusted network).
    #[arg(
        long,
        global = true,
        env = "SHAREFS_PLAINTEXT",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    pub plaintext: bool,
    /// Require the server's certificate to have this SHA-256 fingerprint.
    #[arg(long, global = true, env = "SHAREFS_SERVER_FINGERPRINT")]
    pub server_fingerprint: Option<String>,
    /// Verify the server's certificate against this CA certificate (PEM) instead of pinning.
    #[arg(long, global = true, env = "SHAREFS_CA")]
    pub ca: Option<PathBuf>,
    /// File of pinned server fingerprints (default ~/.config/sharefs/known_servers).
    #[arg(long, global = true, env = "SHAREFS_KNOWN_SERVERS")]
    pub known_servers: Option<PathBuf>,
}

/// The server when neither flags, environment nor profile name one.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7070";

/// Who connects where: settled before any password is looked for.
#[derive(Debug, Clone)]
pub struct Identity {
    pub server: String,
    pub user: String,
    /// The profile the settings came from (its mount defaults are used by `mount`).
    pub profile: Profile,
}

impl ConnectArgs {
    /// The selected profile of the configuration file.
    pub fn profile(&self) -> Result<Profile, String> {
        Config::load()
            .and_then(|c| c.profile(self.profile.as_deref()))
            .map_err(|e| e.to_string())
    }

    /// The server and user, from flags, environment, profile or defaults.
    pub fn identity(&self) -> Result<Identity, String> {
        let profile = self.profile()?;
        let server = self
            .server
            .clone()
            .or_else(|| profile.server.clone())
            .unwrap_or_else(|| DEFAULT_SERVER.to_string());
        let user = match self.user.clone().or_else(|| profile.user.clone()) {
            Some(u) => u,
            None => std::env::var("USER")
                .map_err(|_| "no user given: use --user or SHAREFS_USER".to_string())?,
        };
        sharefs_protocol::name::check_user_name(&user)?;
        Ok(Identity {
            server,
            user,
            profile,
        })
    }

    /// Resolves the user and password into options, prompting if nothing else gives one.
    pub fn resolve(&self) -> Result<ConnectOptions, String> {
        self.resolve_with_profile().map(|(opts, _)| opts)
    }

    /// [`ConnectArgs::resolve`], and the profile the settings came from.
    pub fn resolve_with_profile(&self) -> Result<(ConnectOptions, Profile), String> {
        let who = self.identity()?;
        let password = self.password(&who)?;
        let opts = self.options(&who, password)?;
        Ok((opts, who.profile))
    }

    /// The password: `SHAREFS_PASSWORD`, the password file, the stored login, a prompt.
    fn password(&self, who: &Identity) -> Result<String, String> {
        let Identity {
            server,
            user,
            profile,
        } = who;
        let password_file = self
            .password_file
            .clone()
            .or_else(|| profile.password_file.clone());
        let password = if let Ok(p) = std::env::var("SHAREFS_PASSWORD") {
            p
        } else if let Some(path) = &password_file {
            read_password_file(path)?
        } else if let Some(p) = login::lookup(server, user) {
            p
        } else if std::io::stdin().is_terminal() {
            rpassword::prompt_password(format!("Password for {user}@{server}: "))
                .map_err(|e| format!("cannot read password: {e}"))?
        } else {
            return Err(format!(
                "no password for {user}@{server}: run sharefs login, set SHAREFS_PASSWORD, \
                 use --password-file, or run in a terminal"
            ));
        };
        Ok(password)
    }

    /// Options to connect as `who` with `password`: the trust settings from flags,
    /// environment or profile.
    pub fn options(&self, who: &Identity, password: String) -> Result<ConnectOptions, String> {
        let profile = &who.profile;
        let plaintext = self.plaintext || profile.plaintext.unwrap_or(false);
        let tls = if plaintext {
            None
        } else {
            let fingerprint = match self
                .server_fingerprint
                .as_ref()
                .or(profile.server_fingerprint.as_ref())
            {
                Some(f) => Some(parse_fingerprint(f).ok_or_else(|| {
                    format!("server fingerprint {f}: expected SHA256: and 64 hex digits")
                })?),
                None => None,
            };
            Some(TrustOptions {
                fingerprint,
                ca: self.ca.clone().or_else(|| profile.ca.clone()),
                known_servers: self
                    .known_servers
                    .clone()
                    .or_else(|| profile.known_servers.clone()),
            })
        };
        let connect_timeout = self
            .connect_timeout
            .or(profile.connect_timeout)
            .unwrap_or(10);
        Ok(ConnectOptions {
            server: who.server.clone(),
            user: who.user.clone(),
            password,
            connect_timeout: Duration::from_secs(connect_timeout.max(1)),
            tls,
        })
    }
}

/// The first line of a password file.
pub fn read_password_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.lines().next().unwrap_or("").to_string())
}
