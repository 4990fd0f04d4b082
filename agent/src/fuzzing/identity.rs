//! A client certificate's identity and `server.allowed_client_names`.
//!
//! Input starting with `0x30` (a DER SEQUENCE) is a certificate as sent in the handshake (seeds
//! are real ones, which the fuzzer mutates); anything else is text naming a certificate to make:
//! a subject CN on the first line, then `dns:NAME` and `uri:NAME` SAN lines and one allow-list
//! line `allow:NAME`. The names read back must be exactly the ones put in.

use std::sync::OnceLock;

use crate::server::identity::{ClientIdentity, Name};

/// Names read from one certificate (identity.rs's bound).
const MAX_NAMES: usize = 32;

pub fn identity(data: &[u8]) {
    if data.first() == Some(&0x30) {
        check(&ClientIdentity::from_der(data), &[]);
    } else {
        made(data);
    }
}

fn name_str(name: &Name) -> &str {
    match name {
        Name::Dns(s) | Name::Uri(s) | Name::Cn(s) => s,
    }
}

/// What holds for any identity: bounded names, the display rule, and matching (an empty list
/// admits; each name admits itself; DNS names ignore ASCII case, the others do not).
fn check(id: &ClientIdentity, allow: &[String]) {
    assert!(id.names.len() <= MAX_NAMES);
    let first = |f: fn(&Name) -> bool| id.names.iter().find(|n| f(n)).map(name_str);
    let display = first(|n| matches!(n, Name::Cn(_)))
        .or_else(|| first(|n| matches!(n, Name::Dns(_))))
        .or_else(|| first(|n| matches!(n, Name::Uri(_))))
        .unwrap_or("unknown");
    assert_eq!(id.display, display);

    assert!(
        id.is_allowed(&[]),
        "an empty allow-list admits every client"
    );
    for name in &id.names {
        let s = name_str(name);
        assert!(
            id.is_allowed(&[s.to_string()]),
            "{name:?} not admitted by itself"
        );
        let upper = s.to_ascii_uppercase();
        let admits_upper = id.is_allowed(std::slice::from_ref(&upper));
        let expected = id.names.iter().any(|n| match n {
            Name::Dns(d) => d.eq_ignore_ascii_case(&upper),
            Name::Uri(u) | Name::Cn(u) => *u == upper,
        });
        assert_eq!(admits_upper, expected, "{upper:?} against {:?}", id.names);
    }
    let expected = allow.is_empty()
        || id.names.iter().any(|n| {
            allow.iter().any(|a| match n {
                Name::Dns(d) => d.eq_ignore_ascii_case(a),
                Name::Uri(u) | Name::Cn(u) => u == a,
            })
        });
    assert_eq!(
        id.is_allowed(allow),
        expected,
        "{allow:?} against {:?}",
        id.names
    );
}

/// One key for every made certificate (generating one per input would dominate the run).
fn key() -> &'static rcgen::KeyPair {
    static KEY: OnceLock<rcgen::KeyPair> = OnceLock::new();
    KEY.get_or_init(|| match rcgen::KeyPair::generate() {
        Ok(k) => k,
        Err(e) => panic!("cannot make a key: {e}"),
    })
}

fn made(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.lines();
    let cn = lines.next().filter(|cn| !cn.is_empty());
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let mut want = Vec::new();
    if let Some(cn) = cn {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        want.push(Name::Cn(cn.to_string()));
    }
    let mut allow = Vec::new();
    for line in lines {
        // rcgen refuses names that are not IA5 (ASCII) strings: nothing to read back then.
        if let Some(dns) = line.strip_prefix("dns:") {
            let Ok(ia5) = dns.try_into() else { return };
            params.subject_alt_names.push(rcgen::SanType::DnsName(ia5));
            want.push(Name::Dns(dns.to_string()));
        } else if let Some(uri) = line.strip_prefix("uri:") {
            let Ok(ia5) = uri.try_into() else { return };
            params.subject_alt_names.push(rcgen::SanType::URI(ia5));
            want.push(Name::Uri(uri.to_string()));
        } else if let Some(name) = line.strip_prefix("allow:") {
            allow.push(name.to_string());
        }
    }
    let cert = match params.self_signed(key()) {
        Ok(cert) => cert,
        // Some strings rcgen will not encode; not the agent's concern.
        Err(_) => return,
    };
    let id = ClientIdentity::from_der(cert.der());
    want.truncate(MAX_NAMES);
    assert_eq!(id.names, want, "names read back");
    check(&id, &allow);
}
