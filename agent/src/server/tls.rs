//! TLS material: the server's chain and key, and the client CA bundle, into a rustls config
//! that requires and verifies a client certificate.

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

/// Builds the server's TLS config from the files named in `[server]`: TLS 1.2 and 1.3, ALPN h2
/// and http/1.1, a client certificate required and chained to one of the CAs in the bundle.
pub fn server_config(section: &ServerSection) -> Result<Arc<ServerConfig>, TlsError> {
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
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(pair_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&section.cert_file)?, key(&section.key_file)?)
        .map_err(pair_err)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
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

        std::fs::remove_file(&s.cert_file).unwrap();
        let err = server_config(&s).unwrap_err();
        assert!(err.to_string().contains("tls.crt"), "{err}");
    }
}
