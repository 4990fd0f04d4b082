//! Command lines: which processes are brokers (`discovery.cmdline_patterns`), and what Kafka's
//! own arguments say (`kafka.Kafka <server.properties> [--override key=value ...]`).
//!
//! Pure: bytes of `/proc/<pid>/cmdline` in, a match and Kafka's arguments out.

use regex::Regex;

use crate::broker::excerpt;

/// Longest command line excerpt kept as evidence.
pub const MAX_EXCERPT: usize = 512;
/// Most `--override` arguments taken from one command line.
pub const MAX_OVERRIDES: usize = 256;

/// An invalid `discovery.cmdline_patterns` entry.
#[derive(Debug, thiserror::Error)]
#[error("cmdline pattern `{pattern}` is not a valid regex: {source}")]
pub struct PatternError {
    pub pattern: String,
    #[source]
    pub source: Box<regex::Error>,
}

/// The compiled `discovery.cmdline_patterns`.
#[derive(Clone, Debug)]
pub struct Patterns {
    compiled: Vec<Regex>,
}

impl Patterns {
    pub fn new(patterns: &[String]) -> Result<Self, PatternError> {
        let compiled = patterns
            .iter()
            .map(|p| {
                Regex::new(p).map_err(|source| PatternError {
                    pattern: p.clone(),
                    source: Box::new(source),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { compiled })
    }

    /// The first pattern matching the command line, and Kafka's arguments after the match.
    /// An empty command line (a kernel thread, a zombie) is no broker, whatever the patterns.
    pub fn matches(&self, cmdline: &Cmdline) -> Option<Match> {
        if cmdline.args.is_empty() {
            return None;
        }
        self.compiled.iter().find_map(|re| {
            let m = re.find(&cmdline.joined)?;
            // Kafka's arguments follow the main class, which is where the match starts for the
            // default pattern. A pattern may start earlier (a wrapper's name) or span several
            // arguments (`kafka\.Kafka /etc/kafka/`): the properties file is then the first
            // `*.properties` argument after the match's start, and else the next argument.
            let arg = cmdline.arg_at(m.start());
            let after = &cmdline.args[arg + 1..];
            let start = after
                .iter()
                .take_while(|a| !a.starts_with("--override"))
                .position(|a| a.ends_with(".properties") && !a.starts_with('-'))
                .unwrap_or(0);
            Some(Match {
                pattern: re.as_str().to_string(),
                kafka: KafkaArgs::parse(&after[start..]),
            })
        })
    }
}

/// A process's arguments, and their space-joined form that patterns run over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmdline {
    pub args: Vec<String>,
    joined: String,
    /// Byte offset in `joined` where each argument starts.
    starts: Vec<usize>,
}

impl Cmdline {
    /// Splits `/proc/<pid>/cmdline` (NUL-terminated arguments). Invalid UTF-8 is replaced.
    /// Empty for kernel threads and zombies.
    pub fn from_proc(bytes: &[u8]) -> Self {
        let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
        let args: Vec<String> = if bytes.is_empty() {
            Vec::new()
        } else {
            bytes
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        };
        Self::from_args(args)
    }

    pub fn from_args(args: Vec<String>) -> Self {
        let mut joined = String::new();
        let mut starts = Vec::with_capacity(args.len());
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                joined.push(' ');
            }
            starts.push(joined.len());
            joined.push_str(a);
        }
        Self {
            args,
            joined,
            starts,
        }
    }

    fn arg_at(&self, offset: usize) -> usize {
        self.starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1)
    }

    /// The command line for evidence: values of `key=value` arguments whose key looks secret
    /// are replaced, then cut to [`MAX_EXCERPT`] bytes.
    pub fn excerpt(&self) -> String {
        let redacted: Vec<String> = self.args.iter().map(|a| redact(a)).collect();
        excerpt(&redacted.join(" "), MAX_EXCERPT)
    }
}

/// Words in a key that mark its value as a secret.
const SECRET_WORDS: [&str; 5] = ["password", "secret", "token", "credential", "jaas"];

fn redact(arg: &str) -> String {
    match arg.split_once('=') {
        Some((key, _))
            if SECRET_WORDS
                .iter()
                .any(|w| key.to_ascii_lowercase().contains(w)) =>
        {
            format!("{key}=<redacted>")
        }
        _ => arg.to_string(),
    }
}

/// A command line that matched a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    pub pattern: String,
    pub kafka: KafkaArgs,
}

/// `kafka.Kafka`'s arguments: the properties file, then `--override key=value` pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaArgs {
    pub properties: Option<String>,
    pub overrides: Vec<(String, String)>,
    /// Arguments that are neither (shown as evidence).
    pub problems: Vec<String>,
}

impl KafkaArgs {
    pub fn parse(args: &[String]) -> Self {
        let mut out = KafkaArgs::default();
        let mut rest = args.iter();
        match args.first() {
            Some(first) if !first.starts_with('-') => {
                out.properties = Some(first.clone());
                rest.next();
            }
            _ => out
                .problems
                .push("no properties file after the main class".into()),
        }
        while let Some(arg) = rest.next() {
            let pair = if arg == "--override" {
                match rest.next() {
                    Some(pair) => pair,
                    None => {
                        out.problems.push("--override without key=value".into());
                        break;
                    }
                }
            } else if let Some(pair) = arg.strip_prefix("--override=") {
                pair
            } else {
                out.problems.push(format!(
                    "unexpected argument `{}`",
                    excerpt(&redact(arg), 64)
                ));
                continue;
            };
            match pair.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    if out.overrides.len() == MAX_OVERRIDES {
                        out.problems
                            .push(format!("more than {MAX_OVERRIDES} overrides; rest ignored"));
                        break;
                    }
                    out.overrides.push((k.trim().to_string(), v.to_string()));
                }
                _ => out.problems.push(format!(
                    "--override `{}` is not key=value",
                    excerpt(&redact(pair), 64)
                )),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&str]) -> Cmdline {
        Cmdline::from_args(args.iter().map(|s| s.to_string()).collect())
    }

    fn default_patterns() -> Patterns {
        Patterns::new(&[r"kafka\.Kafka".into()]).unwrap()
    }

    #[test]
    fn proc_cmdline_bytes() {
        let c = Cmdline::from_proc(b"java\0-cp\0a b\0kafka.Kafka\0/etc/s.properties\0");
        assert_eq!(
            c.args,
            ["java", "-cp", "a b", "kafka.Kafka", "/etc/s.properties"]
        );
        assert_eq!(c.joined, "java -cp a b kafka.Kafka /etc/s.properties");
        assert!(Cmdline::from_proc(b"").args.is_empty());
        // Invalid UTF-8 is replaced, not refused.
        assert_eq!(Cmdline::from_proc(b"a\xff\0").args, ["a\u{fffd}"]);
    }

    #[test]
    fn a_kafka_jvm_matches_with_its_arguments() {
        let c = cmd(&[
            "/usr/bin/java",
            "-Xmx1G",
            "-cp",
            "/opt/kafka/libs/*",
            "kafka.Kafka",
            "/opt/kafka/config/server.properties",
            "--override",
            "node.id=5",
            "--override=log.dirs=/data",
        ]);
        let m = default_patterns().matches(&c).unwrap();
        assert_eq!(m.pattern, r"kafka\.Kafka");
        assert_eq!(
            m.kafka,
            KafkaArgs {
                properties: Some("/opt/kafka/config/server.properties".into()),
                overrides: vec![
                    ("node.id".into(), "5".into()),
                    ("log.dirs".into(), "/data".into())
                ],
                problems: vec![],
            }
        );
    }

    #[test]
    fn non_brokers_do_not_match() {
        let p = default_patterns();
        for args in [
            &["bash"][..],
            &[
                "java",
                "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                "zoo.cfg",
            ],
            &["java", "kafkaXKafka"],
            &["grep", "kafka"],
            &[],
        ] {
            assert_eq!(p.matches(&cmd(args)), None, "{args:?}");
        }
    }

    #[test]
    fn an_empty_command_line_matches_no_pattern() {
        // Found by the `cmdline` fuzz target: a pattern that matches the empty string (`^`,
        // `kafka|`, accepted by config validation) met a kernel thread's empty cmdline, and
        // taking the arguments after the match indexed past the end (a panic in discovery).
        let p = Patterns::new(&["^".into(), "kafka|".into(), ".*".into()]).unwrap();
        assert_eq!(p.matches(&Cmdline::from_proc(b"")), None);
        assert_eq!(p.matches(&Cmdline::from_proc(b"\0")), None);
        let m = p.matches(&Cmdline::from_proc(b"java\0")).unwrap();
        assert_eq!(m.pattern, "^");
        assert_eq!(m.kafka.properties, None);
    }

    #[test]
    fn the_first_matching_pattern_is_the_evidence() {
        let p =
            Patterns::new(&["nomatch".into(), r"fake-\w+ kafka".into(), "kafka".into()]).unwrap();
        let m = p
            .matches(&cmd(&[
                "/bin/fake-broker",
                "kafka.Kafka",
                "/tmp/s.properties",
            ]))
            .unwrap();
        assert_eq!(m.pattern, r"fake-\w+ kafka");
        // The match starts before `kafka.Kafka`: the properties file is still the one after it.
        assert_eq!(m.kafka.properties.as_deref(), Some("/tmp/s.properties"));
        // A pattern spanning the main class and the properties path.
        let p = Patterns::new(&[r"kafka\.Kafka /tmp/x/".into()]).unwrap();
        let m = p
            .matches(&cmd(&[
                "java",
                "kafka.Kafka",
                "/tmp/x/s.properties",
                "--override",
                "a=b",
            ]))
            .unwrap();
        assert_eq!(m.kafka.properties.as_deref(), Some("/tmp/x/s.properties"));
        assert_eq!(m.kafka.overrides, vec![("a".into(), "b".into())]);
        // A pattern matching the wrapper: the properties file is found after the main class.
        let p = Patterns::new(&["my-broker".into()]).unwrap();
        let m = p
            .matches(&cmd(&[
                "/bin/my-broker",
                "-Xmx1g",
                "kafka.Kafka",
                "/s.properties",
                "--override",
                "ssl.truststore.location=/t.properties",
            ]))
            .unwrap();
        assert_eq!(m.kafka.properties.as_deref(), Some("/s.properties"));
        assert_eq!(m.kafka.problems, Vec::<String>::new());
        // No *.properties argument: Kafka's form, the argument right after the match.
        let m = default_patterns()
            .matches(&cmd(&["java", "kafka.Kafka", "/etc/kafka/server.conf"]))
            .unwrap();
        assert_eq!(
            m.kafka.properties.as_deref(),
            Some("/etc/kafka/server.conf")
        );
    }

    #[test]
    fn bad_kafka_arguments_are_reported() {
        let a = KafkaArgs::parse(&["--override".into(), "x=1".into(), "stray".into()]);
        assert_eq!(a.properties, None);
        assert_eq!(a.overrides, vec![("x".into(), "1".into())]);
        assert_eq!(
            a.problems,
            vec![
                "no properties file after the main class",
                "unexpected argument `stray`"
            ]
        );
        let a = KafkaArgs::parse(&["s.properties".into(), "--override".into(), "novalue".into()]);
        assert_eq!(a.problems, vec!["--override `novalue` is not key=value"]);
        let a = KafkaArgs::parse(&["s.properties".into(), "--override".into()]);
        assert_eq!(a.problems, vec!["--override without key=value"]);
    }

    #[test]
    fn excerpt_redacts_secrets_and_is_bounded() {
        let c = cmd(&[
            "java",
            "-Djavax.net.ssl.keyStorePassword=hunter2",
            "kafka.Kafka",
            "s.properties",
            "--override",
            "ssl.key.password=hunter2",
            "--override",
            "node.id=1",
        ]);
        let e = c.excerpt();
        assert!(!e.contains("hunter2"), "{e}");
        assert_eq!(
            e,
            "java -Djavax.net.ssl.keyStorePassword=<redacted> kafka.Kafka s.properties \
             --override ssl.key.password=<redacted> --override node.id=1"
        );
        let long = cmd(&["java", &"x".repeat(10_000)]);
        assert_eq!(long.excerpt().len(), MAX_EXCERPT + '…'.len_utf8());
    }

    #[test]
    fn invalid_pattern_is_an_error() {
        let e = Patterns::new(&["(".into()]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cmdline pattern `(` is not a valid regex"),
            "{e}"
        );
    }
}
