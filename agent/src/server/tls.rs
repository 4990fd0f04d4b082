//! TLS material: the server's chain and key, and the client CA bundle, into a rustls config
//! that requires and verifies a client certificate. RSA and ECDSA keys in PKCS#8, SEC1 or
//! PKCS#1 PEM; the whole chain in `cert_file` is sent.
//!
//! Reading and checking only; swapping a new config in while serving is `reload`.

use std::{path::Path, sync::Arc};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
};

use crate::config::ServerConfig as ServerSection;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    Empty { path: String, what: &'static str },
    #[error("client CA bundle {path}: {source}")]
    Ca {
        path: String,
        #[source]
        source: rustls::Error,
    },
    #[error("client certificate verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("server certificate {path} cannot be parsed: {reason}")]
    Parse { path: String, reason: String },
    #[error(
        "server certificate {path} is not valid now: valid from {not_before} until {not_after} (Unix seconds), now {now}"
    )]
    Validity {
        path: String,
        not_before: i64,
        not_after: i64,
        now: i64,
    },
    #[error("server certificate {cert} and key {key} do not form a usable pair: {source}")]
    Pair {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            path: path.display().to_string(),
            what: "private key",
        })
}

/// What the agent reports about its own (leaf) server certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafInfo {
    /// Serial number, hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl LeafInfo {
    fn read(path: &Path, der: &[u8]) -> Result<Self, TlsError> {
        use x509_parser::prelude::FromDer as _;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| {
            TlsError::Parse {
                path: path.display().to_string(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            serial: cert.raw_serial_as_string().replace(':', "").to_uppercase(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// A usable server config and what it serves.
#[derive(Debug)]
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    pub leaf: LeafInfo,
}

/// Builds the server's TLS config from the files named in `[server]`: TLS 1.2 and 1.3, ALPN h2
/// and http/1.1, a client certificate required and chained to one of the CAs in the bundle.
#[cfg(test)]
pub fn server_config(section: &ServerSection) -> Result<Arc<ServerConfig>, TlsError> {
    load(section, unix_now()).map(|l| l.config)
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// As [`server_config`], and refuses a server certificate that is not valid at `now` (Unix
/// seconds): serving an expired certificate only moves the failure to every client.
pub fn load(section: &ServerSection, now: i64) -> Result<Loaded, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in certs(&section.client_ca_file)? {
        roots.add(ca).map_err(|source| TlsError::Ca {
            path: section.client_ca_file.display().to_string(),
            source,
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;
    let pair_err = |source| TlsError::Pair {
        cert: section.cert_file.display().to_string(),
        key: section.key_file.display().to_string(),
        source,
    };
    let chain = certs(&section.cert_file)?;
    let leaf = LeafInfo::read(&section.cert_file, &chain[0])?;
    if now < leaf.not_before || now > leaf.not_after {
        return Err(TlsError::Validity {
            path: section.cert_file.display().to_string(),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            now,
        });
    }
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(pair_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key(&section.key_file)?)
        .map_err(pair_err)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        leaf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    fn section(dir: &Path) -> ServerSection {
        ServerSection {
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            client_ca_file: dir.join("ca.crt"),
            ..ServerSection::default()
        }
    }

    #[test]
    fn dev_pki_makes_a_config_with_alpn() {
        let dir = tempfile::tempdir().unwrap();
        pki::generate_dev(dir.path(), pki::Validity::days(1)).unwrap();
        let config = server_config(&section(dir.path())).unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn bad_material_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        pki::generate_dev(dir.path(), pki::Validity::days(1)).unwrap();
        let s = section(dir.path());

        std::fs::write(&s.client_ca_file, "not pem").unwrap();
        let err = server_config(&s).unwrap_err();
        assert!(
            matches!(err, TlsError::Empty { ref path, .. } if path.ends_with("ca.crt")),
            "{err}"
        );

        pki::generate_dev(dir.path(), pki::Validity::days(1)).unwrap();
        // A key from another PKI does not match the certificate.
        let other = tempfile::tempdir().unwrap();
        pki::generate_dev(other.path(), pki::Validity::days(1)).unwrap();
        std::fs::copy(other.path().join("tls.key"), &s.key_file).unwrap();
        let err = server_config(&s).unwrap_err();
        assert!(matches!(err, TlsError::Pair { .. }), "{err}");

        // An expired (or not yet valid) server certificate is refused, naming the dates.
        pki::generate_dev(dir.path(), pki::Validity::days(1)).unwrap();
        let loaded = load(&s, unix_now()).unwrap();
        assert!(loaded.leaf.not_after - loaded.leaf.not_before >= 86_400);
        let err = load(&s, loaded.leaf.not_after + 1).unwrap_err();
        assert!(
            matches!(err, TlsError::Validity { not_after, .. } if not_after == loaded.leaf.not_after),
            "{err}"
        );
        let err = load(&s, loaded.leaf.not_before - 1).unwrap_err();
        assert!(matches!(err, TlsError::Validity { .. }), "{err}");

        std::fs::remove_file(&s.cert_file).unwrap();
        let err = server_config(&s).unwrap_err();
        assert!(err.to_string().contains("tls.crt"), "{err}");
    }
}
