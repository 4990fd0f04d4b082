//! `brokerscope pki dev`: a throwaway PKI for local runs and tests.
//!
//! Writes `ca.crt`/`ca.key`, the server's `tls.crt`/`tls.key` (SANs localhost, 127.0.0.1, ::1 and
//! the hostname) and the operator's `client.crt`/`client.key` (CN and SAN DNS `cluster-operator`),
//! all ECDSA P-256. Never for production: the CA key sits next to the certificates.

use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The operator's client identity, as Strimzi's Cluster Operator presents it.
pub const OPERATOR_NAME: &str = "cluster-operator";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Validity of the generated certificates.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
}

impl Validity {
    /// From now (less a minute of clock skew) for `days`.
    pub fn days(days: u32) -> Self {
        let now = time::OffsetDateTime::now_utc();
        Self {
            not_before: now - time::Duration::minutes(1),
            not_after: now + time::Duration::days(i64::from(days)),
        }
    }
}

impl Validity {
    /// Replaces either bound (hidden `pki dev` flags, to make expired or future certificates).
    pub fn with_bounds(
        self,
        not_before: Option<time::OffsetDateTime>,
        not_after: Option<time::OffsetDateTime>,
    ) -> Self {
        Self {
            not_before: not_before.unwrap_or(self.not_before),
            not_after: not_after.unwrap_or(self.not_after),
        }
    }
}

/// A `--not-before`/`--not-after` value that is neither RFC 3339 nor an offset.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{value}` is not a time: use RFC 3339 (2026-01-02T03:04:05Z) or an offset from now such as \
     -2d, +12h, -30m, 90s"
)]
pub struct InstantError {
    pub value: String,
}

/// Parses an RFC 3339 timestamp or a signed offset from now (`-2d`, `+12h`, `-30m`, `90s`).
pub fn parse_instant(value: &str) -> Result<time::OffsetDateTime, InstantError> {
    parse_instant_at(value, time::OffsetDateTime::now_utc())
}

fn parse_instant_at(
    value: &str,
    now: time::OffsetDateTime,
) -> Result<time::OffsetDateTime, InstantError> {
    let err = || InstantError {
        value: value.to_string(),
    };
    if let Ok(t) =
        time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
    {
        return Ok(t);
    }
    let (sign, rest) = match value.as_bytes().first() {
        Some(b'-') => (-1, &value[1..]),
        Some(b'+') => (1, &value[1..]),
        _ => (1, value),
    };
    let unit = rest.chars().last().ok_or_else(err)?;
    let n: i64 = rest[..rest.len() - unit.len_utf8()]
        .parse()
        .map_err(|_| err())?;
    let seconds = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(err()),
    };
    Ok(now + time::Duration::seconds(sign * n * seconds))
}

/// Generates the dev PKI into `out` (created if needed). Returns the files written.
pub fn generate_dev(out: &Path, validity: Validity) -> Result<Vec<PathBuf>, PkiError> {
    fs::create_dir_all(out).map_err(|source| PkiError::Write {
        path: out.into(),
        source,
    })?;
    let gen_err = |what| move |source| PkiError::Generate { what, source };

    let ca_key = KeyPair::generate().map_err(gen_err("CA key"))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = name("brokerscope dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca_params, validity);
    let ca = ca_params
        .self_signed(&ca_key)
        .map_err(gen_err("CA certificate"))?;

    let mut server_names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Some(host) = hostname().filter(|h| !server_names.contains(h)) {
        server_names.push(host);
    }
    let server_key = KeyPair::generate().map_err(gen_err("server key"))?;
    let mut server_params =
        CertificateParams::new(server_names).map_err(gen_err("server certificate"))?;
    server_params.distinguished_name = name("brokerscope");
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut server_params, validity);
    let server = server_params
        .signed_by(&server_key, &ca, &ca_key)
        .map_err(gen_err("server certificate"))?;

    let client_key = KeyPair::generate().map_err(gen_err("client key"))?;
    let mut client_params = CertificateParams::new(vec![OPERATOR_NAME.to_string()])
        .map_err(gen_err("client certificate"))?;
    client_params.distinguished_name = name(OPERATOR_NAME);
    client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    set_validity(&mut client_params, validity);
    let client = client_params
        .signed_by(&client_key, &ca, &ca_key)
        .map_err(gen_err("client certificate"))?;

    let files = [
        ("ca.crt", ca.pem(), false),
        ("ca.key", ca_key.serialize_pem(), true),
        ("tls.crt", server.pem(), false),
        ("tls.key", server_key.serialize_pem(), true),
        ("client.crt", client.pem(), false),
        ("client.key", client_key.serialize_pem(), true),
    ];
    let mut written = Vec::with_capacity(files.len());
    for (file, pem, secret) in files {
        let path = out.join(file);
        write_file(&path, pem.as_bytes(), if secret { 0o600 } else { 0o644 })?;
        written.push(path);
    }
    Ok(written)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
}

fn hostname() -> Option<String> {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let host = host.trim();
    (!host.is_empty()).then(|| host.to_string())
}

/// Writes atomically (temp file + rename) with the given mode.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_parse_as_rfc3339_or_offsets() {
        let now = time::macros::datetime!(2026-05-01 12:00 UTC);
        assert_eq!(
            parse_instant_at("2026-01-02T03:04:05Z", now).unwrap(),
            time::macros::datetime!(2026-01-02 03:04:05 UTC)
        );
        assert_eq!(
            parse_instant_at("-2d", now).unwrap(),
            time::macros::datetime!(2026-04-29 12:00 UTC)
        );
        assert_eq!(
            parse_instant_at("+12h", now).unwrap(),
            time::macros::datetime!(2026-05-02 00:00 UTC)
        );
        assert_eq!(
            parse_instant_at("90s", now).unwrap(),
            time::macros::datetime!(2026-05-01 12:01:30 UTC)
        );
        for bad in ["", "-", "2d3", "-2w", "yesterday", "-d"] {
            let err = parse_instant_at(bad, now).unwrap_err();
            assert_eq!(err.value, bad);
        }
    }

    #[test]
    fn bounds_override_the_days() {
        let before = time::macros::datetime!(2020-01-01 0:00 UTC);
        let v = Validity::days(30).with_bounds(Some(before), None);
        assert_eq!(v.not_before, before);
        assert!(v.not_after > time::OffsetDateTime::now_utc() + time::Duration::days(29));
    }

    #[test]
    fn writes_the_six_files_with_private_keys_private() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate_dev(dir.path(), Validity::days(1)).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "ca.crt",
                "ca.key",
                "tls.crt",
                "tls.key",
                "client.crt",
                "client.key"
            ]
        );
        for key in ["ca.key", "tls.key", "client.key"] {
            let mode = fs::metadata(dir.path().join(key)).unwrap().permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
                0o600,
                "{key}"
            );
        }
        let crt = fs::read_to_string(dir.path().join("client.crt")).unwrap();
        assert!(crt.starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
