//! Connection settings shared by every client command (SPEC section 2): `--server`
//! (`SHAREFS_SERVER`), `--user` (`SHAREFS_USER`), and the password from `SHAREFS_PASSWORD`,
//! `--password-file`, or an interactive prompt.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use sharefs_protocol::fingerprint::parse_fingerprint;

use crate::remote::ConnectOptions;
use crate::tls::TrustOptions;

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Server address.
    #[arg(
        long,
        global = true,
        env = "SHAREFS_SERVER",
        default_value = "127.0.0.1:7070"
    )]
    pub server: String,
    /// User name (defaults to $USER).
    #[arg(long, global = true, env = "SHAREFS_USER")]
    pub user: Option<String>,
    /// File whose first line is the password.
    #[arg(long, global = true)]
    pub password_file: Option<PathBuf>,
    /// Seconds to wait for the server to answer a connection.
    #[arg(long, global = true, default_value_t = 10)]
    pub connect_timeout: u64,
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

impl ConnectArgs {
    /// Resolves the user and password into options, prompting if nothing else gives one.
    pub fn resolve(&self) -> Result<ConnectOptions, String> {
        let user = match &self.user {
            Some(u) => u.clone(),
            None => std::env::var("USER")
                .map_err(|_| "no user given: use --user or SHAREFS_USER".to_string())?,
        };
        sharefs_protocol::name::check_user_name(&user)?;
        let password = if let Ok(p) = std::env::var("SHAREFS_PASSWORD") {
            p
        } else if let Some(path) = &self.password_file {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            text.lines().next().unwrap_or("").to_string()
        } else if std::io::stdin().is_terminal() {
            rpassword::prompt_password(format!("Password for {user}@{}: ", self.server))
                .map_err(|e| format!("cannot read password: {e}"))?
        } else {
            return Err(
                "no password: set SHAREFS_PASSWORD, use --password-file, or run in a terminal"
                    .into(),
            );
        };
        let tls = if self.plaintext {
            None
        } else {
            let fingerprint = match &self.server_fingerprint {
                Some(f) => Some(parse_fingerprint(f).ok_or_else(|| {
                    format!("--server-fingerprint {f}: expected SHA256: and 64 hex digits")
                })?),
                None => None,
            };
            Some(TrustOptions {
                fingerprint,
                ca: self.ca.clone(),
                known_servers: self.known_servers.clone(),
            })
        };
        Ok(ConnectOptions {
            server: self.server.clone(),
            user,
            password,
            connect_timeout: Duration::from_secs(self.connect_timeout.max(1)),
            tls,
        })
    }
}
