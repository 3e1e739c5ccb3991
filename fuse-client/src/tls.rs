//! Deciding whether to trust a server, like SSH's known_hosts.
//!
//! In order:
//! 1. `--server-fingerprint` given: the certificate must have exactly that fingerprint.
//! 2. `--ca FILE` given: the certificate must chain to that CA, be current and name the
//!    host; nothing else is accepted.
//! 3. A fingerprint pinned for this `host:port` in the known-servers file: must match.
//! 4. A certificate that chains to a system root (Mozilla's list) for this host: accepted.
//! 5. A self-signed (unknown issuer) certificate seen for the first time: pinned in the
//!    known-servers file, and its fingerprint printed so the user can compare it with the
//!    one the server logs.
//!
//! Expired or wrong-host CA-signed certificates are refused, never pinned.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sharefs_protocol::fingerprint::fingerprint;

/// How the client trusts servers.
#[derive(Debug, Clone, Default)]
pub struct TrustOptions {
    /// Exact certificate fingerprint to require.
    pub fingerprint: Option<String>,
    /// A CA file (PEM) to verify against instead of pinning.
    pub ca: Option<PathBuf>,
    /// Where pins are kept; `None` uses the default path.
    pub known_servers: Option<PathBuf>,
}

/// The default known-servers file: `$XDG_CONFIG_HOME/sharefs/known_servers`.
pub fn default_known_servers() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("sharefs")
        .join("known_servers")
}

fn pinned(file: &Path, server: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(s, _)| *s == server)
        .map(|(_, f)| f.trim().to_string())
}

fn pin(file: &Path, server: &str, fp: &str) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?;
    writeln!(f, "{server} {fp}")
}

#[derive(Debug)]
struct Verifier {
    server: String,
    trust: TrustOptions,
    known_servers: PathBuf,
    ca: Option<Arc<WebPkiServerVerifier>>,
    system: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    /// Why the last verification failed, in words for the user.
    failure: Arc<Mutex<Option<String>>>,
}

impl Verifier {
    fn fail(&self, why: String) -> rustls::Error {
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(why.clone());
        }
        rustls::Error::General(why)
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if let Some(want) = &self.trust.fingerprint {
            return if &fp == want {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(self.fail(format!(
                    "server {} presented certificate {fp}, not the {want} given with --server-fingerprint",
                    self.server
                )))
            };
        }
        if let Some(ca) = &self.ca {
            return ca
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                .map_err(|e| self.fail(format!("certificate of {} refused: {e}", self.server)));
        }
        if let Some(known) = pinned(&self.known_servers, &self.server) {
            return if known == fp {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(self.fail(format!(
                    "SERVER IDENTITY CHANGED: {} presented certificate {fp}, but {known} is pinned in {}. \
                     Someone may be intercepting the connection. If the server's certificate was replaced \
                     on purpose, check the new fingerprint in the server's log with its administrator, then \
                     remove the line for {} from that file (or pass --server-fingerprint).",
                    self.server,
                    self.known_servers.display(),
                    self.server
                )))
            };
        }
        if let Some(system) = &self.system {
            match system.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
                Ok(ok) => return Ok(ok),
                Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {}
                Err(e) => {
                    return Err(self.fail(format!("certificate of {} refused: {e}", self.server)))
                }
            }
        }
        // First contact with a self-signed server: trust on first use.
        pin(&self.known_servers, &self.server, &fp).map_err(|e| {
            self.fail(format!(
                "cannot record the server's fingerprint in {}: {e}",
                self.known_servers.display()
            ))
        })?;
        eprintln!(
            "sharefs: first connection to {}: pinned its certificate {fp} in {}; \
             compare it with the fingerprint in the server's log",
            self.server,
            self.known_servers.display()
        );
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS connector for `server` (`host:port`) and a slot that explains a refusal.
pub struct Connector {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
    pub failure: Arc<Mutex<Option<String>>>,
}

fn host_of(server: &str) -> &str {
    let host = match server.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => server,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

pub fn connector(server: &str, trust: &TrustOptions) -> Result<Connector, String> {
    let provider = sharefs_protocol::tls_provider();
    let webpki = |roots: RootCertStore| {
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| format!("TLS setup: {e}"))
    };
    let ca = match &trust.ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            Some(webpki(roots)?)
        }
        None => None,
    };
    let system = {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        Some(webpki(roots)?)
    };
    let failure = Arc::new(Mutex::new(None));
    let verifier = Verifier {
        server: server.to_string(),
        known_servers: trust
            .known_servers
            .clone()
            .unwrap_or_else(default_known_servers),
        trust: trust.clone(),
        ca,
        system,
        provider: provider.clone(),
        failure: failure.clone(),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let server_name = ServerName::try_from(host_of(server).to_string())
        .map_err(|e| format!("{server}: not a host name: {e}"))?;
    Ok(Connector {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name,
        failure,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(host_of("example.com:7070"), "example.com");
        assert_eq!(host_of("127.0.0.1:7070"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7070"), "::1");
        assert_eq!(host_of("example.com"), "example.com");
    }

    #[test]
    fn pins_are_per_server() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a/known");
        pin(&f, "h:1", "SHA256:aa").unwrap();
        pin(&f, "h:2", "SHA256:bb").unwrap();
        assert_eq!(pinned(&f, "h:2").as_deref(), Some("SHA256:bb"));
        assert_eq!(pinned(&f, "h:3"), None);
    }
}
