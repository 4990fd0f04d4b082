//! Kafka listener specs (`NAME://host:port,...`) and `listener.security.protocol.map`
//! (`NAME:PROTOCOL,...`).
//!
//! Pure: a bad entry becomes an error naming it, and the good entries around it still count.

use std::collections::BTreeMap;

use crate::broker::{Listener, excerpt};

/// Most listeners kept per broker (Kafka brokers have a handful).
pub const MAX_LISTENERS: usize = 32;
/// Longest listener name or host kept.
const MAX_FIELD: usize = 253;

/// Why one listener entry was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListenerError {
    #[error("listener `{entry}`: expected NAME://host:port")]
    MissingScheme { entry: String },
    #[error("listener `{entry}`: empty name")]
    EmptyName { entry: String },
    #[error("listener `{entry}`: name must be letters, digits, `_`, `-` or `.`")]
    BadName { entry: String },
    #[error("listener `{entry}`: no port (expected host:port)")]
    MissingPort { entry: String },
    #[error("listener `{entry}`: port `{port}` is not 1..=65535")]
    BadPort { entry: String, port: String },
    #[error("listener `{entry}`: bad host (IPv6 needs brackets: [::1]:9092)")]
    BadHost { entry: String },
    #[error("listener name {name} appears twice; the first is kept")]
    DuplicateName { name: String },
    #[error("more than {max} listeners; the rest are ignored")]
    TooMany { max: usize },
    #[error("listener.security.protocol.map entry `{entry}`: expected NAME:PROTOCOL")]
    BadMapEntry { entry: String },
}

/// Parses Kafka's `listeners` value. Entries are comma-separated; blanks around them are ignored.
pub fn parse_listeners(text: &str) -> (Vec<Listener>, Vec<ListenerError>) {
    let mut listeners: Vec<Listener> = Vec::new();
    let mut errors = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if listeners.len() == MAX_LISTENERS {
            errors.push(ListenerError::TooMany { max: MAX_LISTENERS });
            break;
        }
        match parse_listener(entry) {
            Ok(l) if listeners.iter().any(|x| x.name == l.name) => {
                errors.push(ListenerError::DuplicateName { name: l.name });
            }
            Ok(l) => listeners.push(l),
            Err(e) => errors.push(e),
        }
    }
    (listeners, errors)
}

fn parse_listener(entry: &str) -> Result<Listener, ListenerError> {
    let shown = excerpt(entry, 128);
    let (name, rest) = entry
        .split_once("://")
        .ok_or_else(|| ListenerError::MissingScheme {
            entry: shown.clone(),
        })?;
    if name.is_empty() {
        return Err(ListenerError::EmptyName { entry: shown });
    }
    if name.len() > MAX_FIELD
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(ListenerError::BadName { entry: shown });
    }
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| ListenerError::BadHost {
                entry: shown.clone(),
            })?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| ListenerError::MissingPort {
                entry: shown.clone(),
            })?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(ListenerError::BadHost { entry: shown });
        }
        (host, port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| ListenerError::MissingPort {
                entry: shown.clone(),
            })?;
        // An unbracketed IPv6 address would split on its last colon and look plausible.
        if host.contains(':')
            || host.len() > MAX_FIELD
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '%'))
        {
            return Err(ListenerError::BadHost { entry: shown });
        }
        (host, port)
    };
    let port_number = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| ListenerError::BadPort {
            entry: shown.clone(),
            port: excerpt(port, 16),
        })?;
    Ok(Listener {
        name: name.to_string(),
        host: host.to_string(),
        port: port_number,
        security_protocol: None,
    })
}

/// Parses `listener.security.protocol.map` into name -> protocol.
pub fn parse_protocol_map(text: &str) -> (BTreeMap<String, String>, Vec<ListenerError>) {
    let mut map = BTreeMap::new();
    let mut errors = Vec::new();
    for entry in text
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .take(MAX_LISTENERS * 2)
    {
        match entry.split_once(':') {
            Some((name, proto))
                if !name.trim().is_empty() && !proto.trim().is_empty() && !proto.contains(':') =>
            {
                map.insert(name.trim().to_string(), proto.trim().to_ascii_uppercase());
            }
            _ => errors.push(ListenerError::BadMapEntry {
                entry: excerpt(entry, 128),
            }),
        }
    }
    (map, errors)
}

/// Listeners named `port-<n>` for `discovery.listener_ports`, used when a broker's config can't
/// be read.
pub fn from_ports(ports: &[u16]) -> Vec<Listener> {
    let mut seen = Vec::new();
    ports
        .iter()
        .filter(|&&p| p != 0)
        .filter(|&&p| {
            let new = !seen.contains(&p);
            seen.push(p);
            new
        })
        .take(MAX_LISTENERS)
        .map(|&port| Listener {
            name: format!("port-{port}"),
            host: String::new(),
            port,
            security_protocol: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(text: &str) -> Vec<(String, String, u16)> {
        let (ls, errors) = parse_listeners(text);
        assert_eq!(errors, vec![], "{text}");
        ls.into_iter().map(|l| (l.name, l.host, l.port)).collect()
    }

    fn t(name: &str, host: &str, port: u16) -> (String, String, u16) {
        (name.into(), host.into(), port)
    }

    #[test]
    fn the_issue_example() {
        assert_eq!(
            hp("PLAINTEXT://:9092,CONTROLLER://0.0.0.0:9093,SSL://[::1]:9094"),
            vec![
                t("PLAINTEXT", "", 9092),
                t("CONTROLLER", "0.0.0.0", 9093),
                t("SSL", "::1", 9094),
            ]
        );
    }

    #[test]
    fn ipv6_hostnames_blanks_and_empty_entries() {
        assert_eq!(
            hp(
                " REPL://[::]:9091 , ,EXT://kafka-0.kafka.svc.cluster.local:9095,INT://10.0.0.7:9096,"
            ),
            vec![
                t("REPL", "::", 9091),
                t("EXT", "kafka-0.kafka.svc.cluster.local", 9095),
                t("INT", "10.0.0.7", 9096),
            ]
        );
    }

    #[test]
    fn bad_entries_have_clear_errors_and_do_not_hide_good_ones() {
        let (ls, errors) = parse_listeners(
            "PLAINTEXT//:9092,://:1,A B://:2,X://host,Y://:99999,Z://:0,W://::1:9092,V://[::1:9092,\
             U://[nothost]:1,OK://:9092,OK://:9093",
        );
        assert_eq!(
            ls.iter()
                .map(|l| (l.name.as_str(), l.port))
                .collect::<Vec<_>>(),
            vec![("OK", 9092)]
        );
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            vec![
                "listener `PLAINTEXT//:9092`: expected NAME://host:port",
                "listener `://:1`: empty name",
                "listener `A B://:2`: name must be letters, digits, `_`, `-` or `.`",
                "listener `X://host`: no port (expected host:port)",
                "listener `Y://:99999`: port `99999` is not 1..=65535",
                "listener `Z://:0`: port `0` is not 1..=65535",
                "listener `W://::1:9092`: bad host (IPv6 needs brackets: [::1]:9092)",
                "listener `V://[::1:9092`: bad host (IPv6 needs brackets: [::1]:9092)",
                "listener `U://[nothost]:1`: bad host (IPv6 needs brackets: [::1]:9092)",
                "listener name OK appears twice; the first is kept",
            ]
        );
    }

    #[test]
    fn listener_count_is_bounded() {
        let text: String = (1..=40).map(|i| format!("L{i}://:{i},")).collect();
        let (ls, errors) = parse_listeners(&text);
        assert_eq!(ls.len(), MAX_LISTENERS);
        assert_eq!(errors, vec![ListenerError::TooMany { max: MAX_LISTENERS }]);
    }

    #[test]
    fn protocol_map() {
        let (map, errors) =
            parse_protocol_map("CONTROLLER:PLAINTEXT, INTERNAL : sasl_ssl,bad,:SSL,X:Y:Z");
        assert_eq!(map.get("CONTROLLER").map(String::as_str), Some("PLAINTEXT"));
        assert_eq!(map.get("INTERNAL").map(String::as_str), Some("SASL_SSL"));
        assert_eq!(map.len(), 2);
        assert_eq!(
            errors,
            vec![
                ListenerError::BadMapEntry {
                    entry: "bad".into()
                },
                ListenerError::BadMapEntry {
                    entry: ":SSL".into()
                },
                ListenerError::BadMapEntry {
                    entry: "X:Y:Z".into()
                },
            ]
        );
    }

    #[test]
    fn fallback_ports_are_named_and_deduplicated() {
        let ls = from_ports(&[9092, 9093, 9092, 0]);
        assert_eq!(
            ls.iter()
                .map(|l| (l.name.as_str(), l.port))
                .collect::<Vec<_>>(),
            vec![("port-9092", 9092), ("port-9093", 9093)]
        );
        assert!(
            ls.iter()
                .all(|l| l.host.is_empty() && l.security_protocol.is_none())
        );
    }
}
