//! The server's TLS identity: a certificate given with `--tls-cert/--tls-key`, or a
//! self-signed one generated on first start into `<data>/tls/` and reused afterwards, so
//! its fingerprint (logged at every start) stays what clients pinned.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sharefs_protocol::fingerprint::fingerprint;

use crate::error::{Result, ServerError};

/// A loaded TLS identity.
#[derive(Clone)]
pub struct TlsIdentity {
    pub config: Arc<rustls::ServerConfig>,
    pub fingerprint: String,
    pub cert_path: PathBuf,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("fingerprint", &self.fingerprint)
            .field("cert_path", &self.cert_path)
            .finish()
    }
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::Internal(format!("{what}: {e}"))
}

/// Writes `bytes` to a new file readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Generates the self-signed identity in `dir` unless it exists.
fn ensure_self_signed(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    crate::fsutil::create_dir_private(dir)?;
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_string());
        }
    }
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| tls_err("generating a certificate", e))?;
    let _ = std::fs::remove_file(&key_path);
    let _ = std::fs::remove_file(&cert_path);
    write_private(&key_path, generated.key_pair.serialize_pem().as_bytes())?;
    write_private(&cert_path, generated.cert.pem().as_bytes())?;
    crate::fsutil::sync_dir(dir)?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed TLS certificate");
    Ok((cert_path, key_path))
}

/// Loads the identity: the given certificate and key, or the generated one.
pub fn load(data_dir: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<TlsIdentity> {
    let (cert_path, key_path) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf()),
        (None, None) => ensure_self_signed(&data_dir.join("tls"))?,
        _ => {
            return Err(ServerError::Internal(
                "--tls-cert and --tls-key go together".into(),
            ))
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| tls_err(&cert_path.display().to_string(), e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| tls_err(&cert_path.display().to_string(), e))?;
    let Some(leaf) = certs.first() else {
        return Err(tls_err(
            &cert_path.display().to_string(),
            "no certificate in file",
        ));
    };
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| tls_err(&key_path.display().to_string(), e))?;
    let provider = sharefs_protocol::tls_provider();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("TLS setup", e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err("TLS certificate and key", e))?;
    Ok(TlsIdentity {
        config: Arc::new(config),
        fingerprint,
        cert_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_is_stable_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = load(dir.path(), None, None).unwrap();
        let b = load(dir.path(), None, None).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private key readable by others");
    }
}
