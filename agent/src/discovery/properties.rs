//! Java `.properties` text, as `java.util.Properties::load` reads it, and the broker settings
//! discovery takes from it.
//!
//! Pure: text in, values out. Reading the file (through `/proc/<pid>/root`) is `proc`'s job.

use std::collections::BTreeMap;

use super::listeners::{self, ListenerError};
use crate::broker::{Listener, ListenersSource, excerpt};

/// Largest properties file read; Kafka's are a few KiB.
pub const MAX_PROPERTIES_BYTES: u64 = 1024 * 1024;
/// Most keys kept from one file; later keys are refused with an error.
pub const MAX_PROPERTIES_KEYS: usize = 10_000;

/// Why a properties text was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PropertiesError {
    #[error("line {line}: malformed \\uXXXX escape")]
    BadUnicodeEscape { line: usize },
    #[error("more than {max} keys")]
    TooManyKeys { max: usize },
}

/// Parsed key/value pairs. A later key replaces an earlier one, as in Java.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    pub(crate) values: BTreeMap<String, String>,
}

impl Properties {
    /// Parses the text of a `.properties` file: `#`/`!` comment lines, `=`, `:` or whitespace
    /// between key and value, `\` at the end of a line continues it (the next line's leading
    /// whitespace is dropped), and `\t \n \r \f \uXXXX \<any>` escapes in keys and values.
    pub fn parse(text: &str) -> Result<Self, PropertiesError> {
        let mut values = BTreeMap::new();
        let mut lines = text.split_inclusive('\n').enumerate().peekable();
        while let Some((index, first)) = lines.next() {
            let first_line = index + 1;
            let first = strip_eol(first).trim_start_matches(is_blank);
            if first.is_empty() || first.starts_with('#') || first.starts_with('!') {
                continue;
            }
            // Join natural lines into one logical line while a line ends in an odd number of
            // backslashes; comment lines never continue, only logical lines do.
            let mut logical = String::new();
            let mut piece = first;
            loop {
                let trailing = piece.chars().rev().take_while(|&c| c == '\\').count();
                if trailing % 2 == 1 {
                    logical.push_str(&piece[..piece.len() - 1]);
                    match lines.next() {
                        Some((_, next)) => piece = strip_eol(next).trim_start_matches(is_blank),
                        None => break,
                    }
                } else {
                    logical.push_str(piece);
                    break;
                }
            }
            let (key, value) = split_key_value(&logical);
            let key = unescape(key, first_line)?;
            let value = unescape(value, first_line)?;
            if !values.contains_key(&key) && values.len() >= MAX_PROPERTIES_KEYS {
                return Err(PropertiesError::TooManyKeys {
                    max: MAX_PROPERTIES_KEYS,
                });
            }
            values.insert(key, value);
        }
        Ok(Self { values })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn set(&mut self, key: String, value: String) {
        self.values.insert(key, value);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.values.len()
    }
}

fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\x0c')
}

fn strip_eol(line: &str) -> &str {
    let line = line.strip_suffix('\n').unwrap_or(line);
    line.strip_suffix('\r').unwrap_or(line)
}

/// The key ends at the first unescaped `=`, `:` or blank; then blanks, at most one `=` or `:`,
/// and blanks again are skipped.
fn split_key_value(line: &str) -> (&str, &str) {
    let mut escaped = false;
    let mut key_end = line.len();
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '=' || c == ':' || is_blank(c) {
            key_end = i;
            break;
        }
    }
    let key = &line[..key_end];
    let mut rest = line[key_end..].trim_start_matches(is_blank);
    if let Some(r) = rest.strip_prefix(['=', ':']) {
        rest = r.trim_start_matches(is_blank);
    }
    (key, rest)
}

fn unescape(s: &str, line: usize) -> Result<String, PropertiesError> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\x0c'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                let code = (hex.len() == 4)
                    .then(|| u32::from_str_radix(&hex, 16).ok())
                    .flatten()
                    .ok_or(PropertiesError::BadUnicodeEscape { line })?;
                // A lone UTF-16 surrogate has no char; Java would keep it, we substitute.
                out.push(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
            }
            Some(other) => out.push(other),
            // A trailing lone backslash (the file ended mid-continuation) is dropped, as in Java.
            None => {}
        }
    }
    Ok(out)
}

/// Applies `--override key=value` arguments over the file's values. Returns the keys applied
/// (values are not kept: overrides often carry passwords).
pub fn apply_overrides(props: &mut Properties, overrides: &[(String, String)]) -> Vec<String> {
    overrides
        .iter()
        .map(|(k, v)| {
            props.set(k.clone(), v.clone());
            k.clone()
        })
        .collect()
}

/// Kafka's default when `listeners` is unset.
pub const DEFAULT_LISTENERS: &str = "PLAINTEXT://:9092";
/// Kafka's default when neither `log.dirs` nor `log.dir` is set.
pub const DEFAULT_LOG_DIR: &str = "/tmp/kafka-logs";

/// What discovery takes from a broker's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BrokerSettings {
    /// `node.id`, else `broker.id`, and which key gave it.
    pub id: Option<(String, &'static str)>,
    pub listeners: Vec<Listener>,
    pub listeners_source: Option<ListenersSource>,
    pub log_dirs: Vec<String>,
    pub process_roles: Vec<String>,
    /// Problems found; each is shown as evidence, none stops discovery.
    pub errors: Vec<String>,
}

/// The four protocols Kafka maps a listener name to by default (a listener named after one).
const SECURITY_PROTOCOLS: [&str; 4] = ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];

impl BrokerSettings {
    /// Extracts the broker's identity, listeners, log dirs and roles.
    pub fn from_properties(props: &Properties) -> Self {
        let mut errors = Vec::new();
        let id = ["node.id", "broker.id"].into_iter().find_map(|key| {
            let value = props.get(key)?.trim();
            match value.parse::<i32>() {
                // broker.id=-1 asks Kafka to generate one: unknown until it registers.
                Ok(n) if n >= 0 => Some((n.to_string(), key)),
                Ok(n) => {
                    errors.push(format!(
                        "{key}={n} is generated by Kafka at start; not used"
                    ));
                    None
                }
                Err(_) => {
                    errors.push(format!("{key}=`{}` is not an integer", excerpt(value, 64)));
                    None
                }
            }
        });
        if id.is_none() && errors.is_empty() {
            errors.push("neither node.id nor broker.id is set".into());
        }

        let (text, source) = match props.get("listeners") {
            Some(text) => (text, ListenersSource::Properties),
            None => (DEFAULT_LISTENERS, ListenersSource::KafkaDefault),
        };
        let (mut parsed, listener_errors) = listeners::parse_listeners(text);
        errors.extend(listener_errors.iter().map(ListenerError::to_string));
        let (map, map_errors) = listeners::parse_protocol_map(
            props.get("listener.security.protocol.map").unwrap_or(""),
        );
        errors.extend(map_errors.iter().map(ListenerError::to_string));
        for listener in &mut parsed {
            listener.security_protocol = map.get(&listener.name).cloned().or_else(|| {
                SECURITY_PROTOCOLS
                    .contains(&listener.name.as_str())
                    .then(|| listener.name.clone())
            });
            if listener.security_protocol.is_none() {
                errors.push(format!(
                    "listener {} has no entry in listener.security.protocol.map",
                    listener.name
                ));
            }
        }

        let dirs = props
            .get("log.dirs")
            .or_else(|| props.get("log.dir"))
            .unwrap_or(DEFAULT_LOG_DIR);
        let log_dirs = split_list(dirs, MAX_LIST_ITEMS);
        let process_roles = split_list(props.get("process.roles").unwrap_or(""), 4);

        Self {
            id,
            listeners: parsed,
            listeners_source: Some(source),
            log_dirs,
            process_roles,
            errors,
        }
    }
}

/// Most items kept from one comma-separated list (log.dirs).
const MAX_LIST_ITEMS: usize = 64;

fn split_list(text: &str, max: usize) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .take(max)
        .map(|s| excerpt(s, 256))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(text: &str) -> Properties {
        Properties::parse(text).unwrap()
    }

    #[test]
    fn separators_comments_and_blank_lines() {
        let p = props(
            "# comment\n! also a comment\n\n   \na=1\nb : 2\nc 3\n  d\t=\t4  \ne\nf=\ng==x\nh:=y\n",
        );
        assert_eq!(p.get("a"), Some("1"));
        assert_eq!(p.get("b"), Some("2"));
        assert_eq!(p.get("c"), Some("3"));
        // Trailing whitespace of a value is kept, as in Java.
        assert_eq!(p.get("d"), Some("4  "));
        assert_eq!(p.get("e"), Some(""));
        assert_eq!(p.get("f"), Some(""));
        // Only one separator is skipped: the second `=` belongs to the value.
        assert_eq!(p.get("g"), Some("=x"));
        assert_eq!(p.get("h"), Some("=y"));
        assert_eq!(p.len(), 8);
    }

    #[test]
    fn continuations_join_lines_and_drop_leading_blanks() {
        let p = props(
            "listeners=PLAINTEXT://:9092,\\\n    CONTROLLER://:9093\nnext=1\r\nwin=a\\\r\n  b\r\n",
        );
        assert_eq!(
            p.get("listeners"),
            Some("PLAINTEXT://:9092,CONTROLLER://:9093")
        );
        assert_eq!(p.get("next"), Some("1"));
        assert_eq!(p.get("win"), Some("ab"));
    }

    #[test]
    fn even_backslashes_do_not_continue() {
        let p = props("path=C:\\\\\nother=2\n");
        assert_eq!(p.get("path"), Some("C:\\"));
        assert_eq!(p.get("other"), Some("2"));
    }

    #[test]
    fn comment_lines_never_continue() {
        let p = props("# note \\\nkey=v\n");
        assert_eq!(p.get("key"), Some("v"));
    }

    #[test]
    fn continuation_at_end_of_file() {
        assert_eq!(props("k=v\\").get("k"), Some("v"));
    }

    #[test]
    fn escapes_in_keys_and_values() {
        let p = props(
            "key\\ with\\ spaces=v\nk\\=eq=1\nk\\:colon=2\ntab=a\\tb\nnl=a\\nb\nuni=caf\\u00e9\nother=\\q\\#\n",
        );
        assert_eq!(p.get("key with spaces"), Some("v"));
        assert_eq!(p.get("k=eq"), Some("1"));
        assert_eq!(p.get("k:colon"), Some("2"));
        assert_eq!(p.get("tab"), Some("a\tb"));
        assert_eq!(p.get("nl"), Some("a\nb"));
        assert_eq!(p.get("uni"), Some("café"));
        assert_eq!(p.get("other"), Some("q#"));
    }

    #[test]
    fn bad_unicode_escape_names_the_line() {
        assert_eq!(
            Properties::parse("a=1\nb=\\u12\n"),
            Err(PropertiesError::BadUnicodeEscape { line: 2 })
        );
        assert_eq!(
            Properties::parse("a=1\n\nc=\\uzzzz\n"),
            Err(PropertiesError::BadUnicodeEscape { line: 3 })
        );
    }

    #[test]
    fn later_keys_win_and_overrides_win_over_the_file() {
        let mut p = props("broker.id=1\nbroker.id=2\nlog.dirs=/a\n");
        assert_eq!(p.get("broker.id"), Some("2"));
        let applied = apply_overrides(
            &mut p,
            &[
                ("broker.id".into(), "7".into()),
                ("ssl.keystore.password".into(), "secret".into()),
            ],
        );
        assert_eq!(applied, vec!["broker.id", "ssl.keystore.password"]);
        assert_eq!(p.get("broker.id"), Some("7"));
        assert_eq!(p.get("log.dirs"), Some("/a"));
    }

    #[test]
    fn too_many_keys_is_an_error() {
        let text: String = (0..=MAX_PROPERTIES_KEYS)
            .map(|i| format!("k{i}=v\n"))
            .collect();
        assert_eq!(
            Properties::parse(&text),
            Err(PropertiesError::TooManyKeys {
                max: MAX_PROPERTIES_KEYS
            })
        );
    }

    #[test]
    fn settings_of_a_kraft_broker() {
        let p = props(
            "process.roles=broker,controller\nnode.id=3\nbroker.id=99\n\
             listeners=PLAINTEXT://:9092,CONTROLLER://0.0.0.0:9093,SSL://[::1]:9094,INTERNAL://kafka-0.svc:9095\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,INTERNAL:SASL_SSL\n\
             log.dirs=/var/lib/kafka/a, /var/lib/kafka/b\n",
        );
        let s = BrokerSettings::from_properties(&p);
        assert_eq!(s.id, Some(("3".into(), "node.id")));
        assert_eq!(s.process_roles, vec!["broker", "controller"]);
        assert_eq!(s.log_dirs, vec!["/var/lib/kafka/a", "/var/lib/kafka/b"]);
        assert_eq!(s.listeners_source, Some(ListenersSource::Properties));
        let got: Vec<(&str, &str, u16, Option<&str>)> = s
            .listeners
            .iter()
            .map(|l| {
                (
                    l.name.as_str(),
                    l.host.as_str(),
                    l.port,
                    l.security_protocol.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("PLAINTEXT", "", 9092, Some("PLAINTEXT")),
                ("CONTROLLER", "0.0.0.0", 9093, Some("PLAINTEXT")),
                // Not in the map, but named after a protocol: Kafka's default mapping.
                ("SSL", "::1", 9094, Some("SSL")),
                ("INTERNAL", "kafka-0.svc", 9095, Some("SASL_SSL")),
            ]
        );
        assert_eq!(s.errors, Vec::<String>::new());
    }

    #[test]
    fn zookeeper_broker_defaults() {
        let s = BrokerSettings::from_properties(&props("broker.id=0\nlog.dir=/data\n"));
        assert_eq!(s.id, Some(("0".into(), "broker.id")));
        assert_eq!(s.log_dirs, vec!["/data"]);
        assert_eq!(s.listeners_source, Some(ListenersSource::KafkaDefault));
        assert_eq!(s.listeners.len(), 1);
        assert_eq!(
            (s.listeners[0].name.as_str(), s.listeners[0].port),
            ("PLAINTEXT", 9092)
        );
        assert_eq!(s.process_roles, Vec::<String>::new());
        assert_eq!(s.errors, Vec::<String>::new());
        let s = BrokerSettings::from_properties(&props("node.id=1\n"));
        assert_eq!(s.log_dirs, vec![DEFAULT_LOG_DIR]);
    }

    #[test]
    fn missing_or_bad_ids_are_explained() {
        let s = BrokerSettings::from_properties(&props("log.dirs=/x\n"));
        assert_eq!(s.id, None);
        assert_eq!(s.errors, vec!["neither node.id nor broker.id is set"]);

        let s = BrokerSettings::from_properties(&props("node.id=abc\nbroker.id=4\n"));
        assert_eq!(s.id, Some(("4".into(), "broker.id")));
        assert_eq!(s.errors, vec!["node.id=`abc` is not an integer"]);

        let s = BrokerSettings::from_properties(&props("broker.id=-1\n"));
        assert_eq!(s.id, None);
        assert_eq!(
            s.errors,
            vec!["broker.id=-1 is generated by Kafka at start; not used"]
        );
    }

    #[test]
    fn unmapped_listener_is_reported() {
        let s =
            BrokerSettings::from_properties(&props("node.id=1\nlisteners=REPLICATION://:9091\n"));
        assert_eq!(s.listeners[0].security_protocol, None);
        assert_eq!(
            s.errors,
            vec!["listener REPLICATION has no entry in listener.security.protocol.map"]
        );
    }

    #[test]
    fn excerpt_cuts_on_char_boundaries() {
        assert_eq!(excerpt("abc", 3), "abc");
        assert_eq!(excerpt("abcd", 3), "abc…");
        assert_eq!(excerpt("aé", 2), "a…");
    }
}
