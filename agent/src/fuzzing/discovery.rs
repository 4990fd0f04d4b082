//! Discovery's parsers: `server.properties`, Kafka listener specs, JVM command lines.

use std::{collections::BTreeMap, sync::OnceLock};

use crate::broker::Listener;
use crate::discovery::{
    cmdline::{Cmdline, MAX_EXCERPT, MAX_OVERRIDES, Patterns},
    listeners::{self, MAX_LISTENERS},
    properties::{self, BrokerSettings, MAX_PROPERTIES_KEYS, Properties},
};

/// `server.properties` text: parse, write back as `.properties` text, parse again: the same
/// keys and values. Then what discovery takes from it must be self-consistent.
pub fn properties(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(props) = Properties::parse(&text) else {
        return;
    };
    assert!(props.values.len() <= MAX_PROPERTIES_KEYS);
    let written = store(&props);
    match Properties::parse(&written) {
        Ok(again) => assert_eq!(again, props, "re-parsing the written text:\n{written}"),
        Err(e) => panic!("the written text does not parse ({e}):\n{written}"),
    }
    check_settings(&props);
}

/// Writes properties as `java.util.Properties::store` does (every character that means
/// something escaped), so that reading it back gives the same pairs.
fn store(props: &Properties) -> String {
    let mut out = String::from("# written by the fuzz target\n");
    for (key, value) in &props.values {
        escape(&mut out, key, true);
        out.push('=');
        escape(&mut out, value, false);
        out.push('\n');
    }
    out
}

fn escape(out: &mut String, s: &str, key: bool) {
    for (i, c) in s.chars().enumerate() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\x0c' => out.push_str("\\f"),
            // Blanks end a key, and lead a value only to be skipped.
            ' ' if key || i == 0 => out.push_str("\\ "),
            '=' | ':' | '#' | '!' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
}

/// What `BrokerSettings::from_properties` must make of any properties.
fn check_settings(props: &Properties) {
    let s = BrokerSettings::from_properties(props);
    match &s.id {
        Some((id, key)) => {
            let n: i32 = id.parse().expect("an id is an integer");
            assert!(n >= 0 && n.to_string() == *id, "id {id:?}");
            let raw = props.get(key).expect("the id's key is set").trim();
            assert_eq!(raw.parse::<i32>().ok(), Some(n));
            if *key == "broker.id" {
                // node.id wins when it is valid.
                assert!(
                    props
                        .get("node.id")
                        .and_then(|v| v.trim().parse::<i32>().ok())
                        .is_none_or(|n| n < 0)
                );
            } else {
                assert_eq!(*key, "node.id");
            }
        }
        None => assert!(!s.errors.is_empty(), "no id and no error saying why"),
    }
    assert!(s.listeners_source.is_some());
    check_listeners(&s.listeners);
    for l in &s.listeners {
        if l.security_protocol.is_none() {
            assert!(
                s.errors.iter().any(|e| e.contains(&l.name)),
                "unmapped listener {} without an error",
                l.name
            );
        }
    }
    assert!(!s.log_dirs.is_empty() || props.get("log.dirs").or(props.get("log.dir")).is_some());
    assert!(s.log_dirs.len() <= 64 && s.log_dirs.iter().all(|d| !d.is_empty()));
    assert!(s.process_roles.len() <= 4);
}

/// Invariants of any parsed listener list.
fn check_listeners(ls: &[Listener]) {
    assert!(ls.len() <= MAX_LISTENERS);
    for (i, l) in ls.iter().enumerate() {
        assert!(l.port != 0, "{l:?}");
        assert!(
            !l.name.is_empty() && !l.name.contains(['/', ':', ',']),
            "{l:?}"
        );
        assert!(!l.host.contains([',', '[', ']', '/']), "{l:?}");
        assert!(ls[..i].iter().all(|o| o.name != l.name), "{} twice", l.name);
    }
}

/// A `listeners` value and a `listener.security.protocol.map`, one per line: parse, write each
/// back in Kafka's canonical form, parse again: the same listeners and map, and no error.
pub fn listeners(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (spec, map) = text.split_once('\n').unwrap_or((&text, ""));

    let (parsed, _) = listeners::parse_listeners(spec);
    check_listeners(&parsed);
    let written: Vec<String> = parsed
        .iter()
        .map(|l| {
            if l.host.contains(':') {
                format!("{}://[{}]:{}", l.name, l.host, l.port)
            } else {
                format!("{}://{}:{}", l.name, l.host, l.port)
            }
        })
        .collect();
    let written = written.join(",");
    let (again, errors) = listeners::parse_listeners(&written);
    assert_eq!(again, parsed, "re-parsing {written:?}");
    assert!(errors.is_empty(), "re-parsing {written:?}: {errors:?}");

    let (parsed, _) = listeners::parse_protocol_map(map);
    assert!(parsed.len() <= 2 * MAX_LISTENERS);
    for (name, proto) in &parsed {
        assert!(!name.is_empty() && !proto.is_empty() && !proto.contains(':'));
        assert_eq!(*proto, proto.to_ascii_uppercase());
    }
    let written: Vec<String> = parsed.iter().map(|(n, p)| format!("{n}:{p}")).collect();
    let written = written.join(",");
    let (again, errors) = listeners::parse_protocol_map(&written);
    assert_eq!(again, parsed, "re-parsing {written:?}");
    assert!(errors.is_empty(), "re-parsing {written:?}: {errors:?}");
}

/// The default pattern and the kinds docs/interface.md shows (a wrapper's name, a pattern
/// spanning the main class and the config directory).
const PATTERNS: [&str; 3] = [
    r"kafka\.Kafka",
    r"kafka\.Kafka /etc/kafka/",
    r"bin/\w+-broker",
];

/// [`PATTERNS`], compiled once (compiling per input would be most of the run).
fn builtin() -> &'static Patterns {
    static BUILTIN: OnceLock<Patterns> = OnceLock::new();
    BUILTIN.get_or_init(|| match Patterns::new(&PATTERNS.map(String::from)) {
        Ok(p) => p,
        Err(e) => panic!("the built-in patterns: {e}"),
    })
}

/// Longest fuzzed pattern compiled (the config allows 1024 bytes; longer only slows the run).
const MAX_PATTERN: usize = 64;

/// `/proc/<pid>/cmdline` bytes, optionally after a first line holding one more
/// `discovery.cmdline_patterns` entry (`\x01pattern\n`): split, match, extract Kafka's
/// arguments, then apply the `--override`s to a broker's properties.
pub fn cmdline(data: &[u8]) {
    let fuzzed;
    let (patterns, bytes) = match data.strip_prefix(b"\x01") {
        Some(rest) => {
            let (pattern, bytes) = super::scratch::first_line(rest);
            let pattern = String::from_utf8_lossy(pattern);
            let mut all: Vec<String> = PATTERNS.map(String::from).to_vec();
            if pattern.len() <= MAX_PATTERN {
                all.insert(0, pattern.into_owned());
            }
            // An invalid regex is refused by config validation before discovery sees it.
            match Patterns::new(&all) {
                Ok(p) => fuzzed = p,
                Err(_) => return,
            }
            (&fuzzed, bytes)
        }
        None => (builtin(), data),
    };

    let cmd = Cmdline::from_proc(bytes);
    // Splitting: NUL-separated, one trailing NUL dropped, invalid UTF-8 replaced.
    let body = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    if body.is_empty() {
        assert!(cmd.args.is_empty());
    } else {
        assert_eq!(cmd.args.len(), body.split(|&b| b == 0).count());
        assert_eq!(cmd.args.join("\0"), String::from_utf8_lossy(body));
    }
    let excerpt = cmd.excerpt();
    assert!(excerpt.len() <= MAX_EXCERPT + '…'.len_utf8());

    let Some(m) = patterns.matches(&cmd) else {
        return;
    };
    let k = &m.kafka;
    assert!(k.overrides.len() <= MAX_OVERRIDES);
    if let Some(file) = &k.properties {
        assert!(
            !file.starts_with('-') && cmd.args.contains(file),
            "{file:?}"
        );
    } else {
        assert!(
            !k.problems.is_empty(),
            "no properties file and no problem said"
        );
    }
    for (key, _) in &k.overrides {
        assert!(!key.is_empty() && key.trim() == key, "override key {key:?}");
    }

    // The overrides win over the file, the last one of a key over earlier ones.
    let mut props = match Properties::parse(BASE_PROPERTIES) {
        Ok(p) => p,
        Err(e) => panic!("the base properties: {e}"),
    };
    let applied = properties::apply_overrides(&mut props, &k.overrides);
    assert_eq!(applied.len(), k.overrides.len());
    let last: BTreeMap<&str, &str> = k
        .overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for (key, value) in last {
        assert_eq!(props.get(key), Some(value), "override of {key}");
    }
    check_settings(&props);
}

/// The file the overrides of [`cmdline`] apply over: a KRaft combined node.
const BASE_PROPERTIES: &str = "process.roles=broker,controller\nnode.id=1\n\
    listeners=PLAINTEXT://:9092,CONTROLLER://:9093\n\
    listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
    log.dirs=/var/lib/kafka/data\n";
