//! Who a client is, read from the certificate it authenticated with, and whether
//! `server.allowed_client_names` lets it in.
//!
//! Authentication (the chain to `client_ca_file`, validity dates) is rustls/webpki's job and
//! happens in the handshake; this module only names an already-verified peer and authorizes it.

use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer as _};

/// Names read from one certificate beyond this are ignored (a bound on per-connection memory).
const MAX_NAMES: usize = 32;

/// One name a client certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Name {
    /// A SAN dNSName; compared ASCII case-insensitively, as DNS names are.
    Dns(String),
    /// A SAN uniformResourceIdentifier (SPIFFE IDs and the like); compared exactly.
    Uri(String),
    /// The subject's commonName; compared exactly.
    Cn(String),
}

impl Name {
    fn as_str(&self) -> &str {
        match self {
            Name::Dns(s) | Name::Uri(s) | Name::Cn(s) => s,
        }
    }

    fn matches(&self, allowed: &str) -> bool {
        match self {
            Name::Dns(s) => s.eq_ignore_ascii_case(allowed),
            Name::Uri(s) | Name::Cn(s) => s == allowed,
        }
    }
}

/// A verified client: its names, and the one shown in logs, 403 bodies and rate-limit keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    pub names: Vec<Name>,
    /// Subject CN when present, else the first SAN DNS, else the first URI, else `unknown`.
    pub display: String,
}

impl ClientIdentity {
    /// Reads the names of the leaf certificate (DER). A certificate webpki accepted but this
    /// parser cannot read yields an identity with no names, which no allow-list matches.
    pub fn from_der(der: &[u8]) -> Self {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return Self::from_names(Vec::new());
        };
        let mut names = Vec::new();
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(Name::Cn(cn.to_string()));
            }
        }
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for general in &san.value.general_names {
                match general {
                    GeneralName::DNSName(dns) => names.push(Name::Dns((*dns).to_string())),
                    GeneralName::URI(uri) => names.push(Name::Uri((*uri).to_string())),
                    _ => {}
                }
            }
        }
        names.truncate(MAX_NAMES);
        Self::from_names(names)
    }

    pub fn from_names(names: Vec<Name>) -> Self {
        let pick = |f: fn(&Name) -> bool| names.iter().find(|n| f(n)).map(Name::as_str);
        let display = pick(|n| matches!(n, Name::Cn(_)))
            .or_else(|| pick(|n| matches!(n, Name::Dns(_))))
            .or_else(|| pick(|n| matches!(n, Name::Uri(_))))
            .unwrap_or("unknown")
            .to_string();
        Self { names, display }
    }

    /// Authorization: an empty allow-list admits every authenticated client; otherwise one of
    /// the certificate's names must equal one of the allowed names.
    pub fn is_allowed(&self, allowed: &[String]) -> bool {
        allowed.is_empty()
            || self
                .names
                .iter()
                .any(|name| allowed.iter().any(|a| name.matches(a)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: Option<&str>, sans: &[rcgen::SanType]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params.subject_alt_names = sans.to_vec();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn dns(s: &str) -> rcgen::SanType {
        rcgen::SanType::DnsName(s.try_into().unwrap())
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().unwrap())
    }

    fn allow(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_cn_san_dns_and_uri() {
        let id = ClientIdentity::from_der(&cert(
            Some("cluster-operator"),
            &[
                dns("operator.kafka.svc"),
                uri("spiffe://cluster/ns/kafka/sa/op"),
            ],
        ));
        assert_eq!(
            id.names,
            [
                Name::Cn("cluster-operator".into()),
                Name::Dns("operator.kafka.svc".into()),
                Name::Uri("spiffe://cluster/ns/kafka/sa/op".into()),
            ]
        );
        assert_eq!(id.display, "cluster-operator");
    }

    #[test]
    fn display_falls_back_from_cn_to_dns_to_uri() {
        let id = ClientIdentity::from_der(&cert(None, &[uri("spiffe://x/y"), dns("prom.local")]));
        assert_eq!(id.display, "prom.local");
        let id = ClientIdentity::from_der(&cert(None, &[uri("spiffe://x/y")]));
        assert_eq!(id.display, "spiffe://x/y");
        let id = ClientIdentity::from_der(&cert(None, &[]));
        assert_eq!(id.display, "unknown");
        assert!(id.names.is_empty());
    }

    #[test]
    fn matching_uses_every_name_kind() {
        let id = ClientIdentity::from_der(&cert(
            Some("cluster-operator"),
            &[dns("Prom.Monitoring.svc"), uri("spiffe://c/sa/op")],
        ));
        assert!(id.is_allowed(&[]), "empty list admits any verified client");
        assert!(id.is_allowed(&allow(&["cluster-operator"])));
        assert!(id.is_allowed(&allow(&["other", "prom.monitoring.svc"])));
        assert!(id.is_allowed(&allow(&["spiffe://c/sa/op"])));
        assert!(!id.is_allowed(&allow(&["Cluster-Operator"])), "CN is exact");
        assert!(
            !id.is_allowed(&allow(&["SPIFFE://c/sa/op"])),
            "URI is exact"
        );
        assert!(!id.is_allowed(&allow(&["prometheus"])));
        assert!(!id.is_allowed(&allow(&["cluster"])), "no prefix matching");
    }

    #[test]
    fn unparsable_certificate_matches_nothing() {
        let id = ClientIdentity::from_der(b"not DER");
        assert_eq!(id.display, "unknown");
        assert!(!id.is_allowed(&allow(&["unknown"])));
        assert!(id.is_allowed(&[]));
    }

    #[test]
    fn names_are_bounded() {
        let sans: Vec<_> = (0..100).map(|i| dns(&format!("n{i}.example"))).collect();
        let id = ClientIdentity::from_der(&cert(Some("many"), &sans));
        assert_eq!(id.names.len(), MAX_NAMES);
    }
}
