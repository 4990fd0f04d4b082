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

/// Why TLS material was refused. Each names the config key of the file at fault, and says
/// once why (no error here has a `source`: what the cause says is in the message).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {error}{}", missing_hint(key, error))]
    Read {
        key: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("{key}: {path} holds no PEM {what}")]
    Empty {
        key: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("{key}: a CA in {path} is not usable: {error}")]
    Ca {
        key: &'static str,
        path: String,
        error: rustls::Error,
    },
    #[error("{key}: the client certificate verifier refused the CAs in {path}: {error}")]
    Verifier {
        key: &'static str,
        path: String,
        error: rustls::server::VerifierBuilderError,
    },
    #[error("{key}: {path} is not an X.509 certificate: {reason}")]
    Parse {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error(
        "{key}: the certificate in {path} is not valid now: valid from {} until {}, now {}",
        rfc3339(*not_before), rfc3339(*not_after), rfc3339(*now)
    )]
    Validity {
        key: &'static str,
        path: String,
        not_before: i64,
        not_after: i64,
        now: i64,
    },
    #[error("{}", pair_message(roles, cert, key, error))]
    Pair {
        roles: &'static Roles,
        cert: String,
        key: String,
        error: rustls::Error,
    },
}

/// What each file is called in errors: the config key that names it (the node's), or what it
/// is to a pod (`pods`), whose files are named by their paths in the broker's container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    pub cert: &'static str,
    pub key: &'static str,
    pub cas: &'static str,
}

/// The node listener's files, named by their config keys.
pub const NODE_ROLES: Roles = Roles {
    cert: "server.cert_file",
    key: "server.key_file",
    cas: "server.client_ca_file",
};

/// For a file that does not exist: how to make a set to try the agent with.
fn missing_hint(key: &str, error: &std::io::Error) -> &'static str {
    if error.kind() == std::io::ErrorKind::NotFound && key.starts_with("server.") {
        " (for a local try, `brokerscope pki dev --out DIR` makes a CA, a server and a client \
         certificate; point server.cert_file, key_file and client_ca_file at them)"
    } else {
        ""
    }
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{unix} (Unix seconds)"))
}

fn pair_message(roles: &Roles, cert: &str, key: &str, error: &rustls::Error) -> String {
    match error {
        rustls::Error::InconsistentKeys(_) => format!(
            "{}: the key in {key} is not the key of the certificate in {cert} ({})",
            roles.key, roles.cert
        ),
        other => format!(
            "{} and {}: {cert} and {key} cannot be used together: {other}",
            roles.cert, roles.key
        ),
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        key,
        path: path.display().to_string(),
        error,
    })
}

fn parse_certs(
    key: &'static str,
    path: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &*pem)
        .collect::<Result<_, _>>()
        .map_err(|error| TlsError::Read {
            key,
            path: path.into(),
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.into(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn parse_private_key(
    key: &'static str,
    path: &str,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut &*pem)
        .map_err(|error| TlsError::Read {
            key,
            path: path.into(),
            error,
        })?
        .ok_or_else(|| TlsError::Empty {
            key,
            path: path.into(),
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
    fn read(key: &'static str, path: &str, der: &[u8]) -> Result<Self, TlsError> {
        use x509_parser::prelude::FromDer as _;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| {
            TlsError::Parse {
                key,
                path: path.into(),
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
    let cas = read("server.client_ca_file", &section.client_ca_file)?;
    let chain = read("server.cert_file", &section.cert_file)?;
    let key = read("server.key_file", &section.key_file)?;
    load_pem(
        &Pem {
            chain: (&section.cert_file.display().to_string(), &chain),
            key: (&section.key_file.display().to_string(), &key),
            cas: (&section.client_ca_file.display().to_string(), &cas),
            roles: &NODE_ROLES,
        },
        now,
    )
}

/// PEM material already read, each with the name it is reported by.
pub struct Pem<'a> {
    pub chain: (&'a str, &'a [u8]),
    pub key: (&'a str, &'a [u8]),
    /// One or more CA certificates, concatenated.
    pub cas: (&'a str, &'a [u8]),
    /// What errors call each file.
    pub roles: &'static Roles,
}

/// As [`load`], from material read elsewhere (a broker's root filesystem: `pods`).
pub fn load_pem(pem: &Pem<'_>, now: i64) -> Result<Loaded, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    let roles = pem.roles;
    let (ca_path, ca_pem) = pem.cas;
    for ca in parse_certs(roles.cas, ca_path, ca_pem)? {
        roots.add(ca).map_err(|error| TlsError::Ca {
            key: roles.cas,
            path: ca_path.into(),
            error,
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|error| TlsError::Verifier {
            key: roles.cas,
            path: ca_path.into(),
            error,
        })?;
    let (cert_path, chain_pem) = pem.chain;
    let (key_path, key_pem) = pem.key;
    let pair_err = |error| TlsError::Pair {
        roles,
        cert: cert_path.into(),
        key: key_path.into(),
        error,
    };
    let chain = parse_certs(roles.cert, cert_path, chain_pem)?;
    let leaf = LeafInfo::read(roles.cert, cert_path, &chain[0])?;
    if now < leaf.not_before || now > leaf.not_after {
        return Err(TlsError::Validity {
            key: roles.cert,
            path: cert_path.into(),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            now,
        });
    }
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(pair_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, parse_private_key(roles.key, key_path, key_pem)?)
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
