//! Renders a [`Snapshot`] (and the endpoint's own [`ServerSnapshot`]) as Prometheus text
//! exposition format 0.0.4, or as OpenMetrics 1.0.0.
//!
//! Pure: takes a snapshot, returns text. Each family gets its HELP and TYPE once, label values
//! are escaped, and output order is stable (sorted keys) so scrapes diff cleanly.

use std::fmt::Write as _;

use crate::{
    model::Snapshot,
    server::stats::{DURATION_BUCKETS, ServerSnapshot},
};

/// `Content-Type` of the text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of OpenMetrics.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The two exposition formats. They differ in three places: the content type, counters'
/// metadata lines (OpenMetrics names the family without `_total`; samples keep it), and the
/// `# EOF` terminator OpenMetrics requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Prometheus,
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => PROMETHEUS_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

const PREFIX: &str = "brokerscope_";

/// Builds the exposition text one family at a time.
struct Exposition {
    out: String,
    format: Format,
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: Kind, help: &str) -> Family<'_> {
        let (kind, meta_name) = match kind {
            Kind::Counter if self.format == Format::OpenMetrics => {
                ("counter", name.strip_suffix("_total").unwrap_or(name))
            }
            Kind::Counter => ("counter", name),
            Kind::Gauge => ("gauge", name),
            Kind::Histogram => ("histogram", name),
        };
        let _ = writeln!(self.out, "# HELP {PREFIX}{meta_name} {help}");
        let _ = writeln!(self.out, "# TYPE {PREFIX}{meta_name} {kind}");
        Family {
            out: &mut self.out,
            name: name.to_string(),
        }
    }
}

struct Family<'a> {
    out: &'a mut String,
    name: String,
}

impl Family<'_> {
    fn sample(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) -> &mut Self {
        self.sample_suffixed("", labels, value)
    }

    /// A sample of the family's `_bucket`, `_sum` or `_count` series (histograms).
    fn sample_suffixed(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        value: impl std::fmt::Display,
    ) -> &mut Self {
        let _ = write!(self.out, "{PREFIX}{}{suffix}", self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                escape_label(self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

/// Label values escape backslash, double quote and newline (exposition format spec).
fn escape_label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The agent's families in the Prometheus text format (without the endpoint's own).
#[cfg(test)]
pub fn prometheus(snapshot: &Snapshot) -> String {
    let mut e = Exposition {
        out: String::with_capacity(4096),
        format: Format::Prometheus,
    };
    agent_families(&mut e, snapshot);
    e.out
}

/// The whole /metrics page in `format`.
pub fn exposition(snapshot: &Snapshot, server: &ServerSnapshot, format: Format) -> String {
    let mut e = Exposition {
        out: String::with_capacity(8192),
        format,
    };
    agent_families(&mut e, snapshot);
    server_families(&mut e, server);
    if format == Format::OpenMetrics {
        e.out.push_str("# EOF\n");
    }
    e.out
}

fn agent_families(e: &mut Exposition, snapshot: &Snapshot) {
    let p = &snapshot.probes;

    let ready = snapshot.readiness.as_ref().is_some_and(|r| r.ready);
    e.family(
        "agent_ready",
        Kind::Gauge,
        "1 when probes are attached and the agent serves.",
    )
    .sample(&[], u8::from(ready));
    e.family("build_info", Kind::Gauge, "Agent version; always 1.")
        .sample(&[("version", env!("CARGO_PKG_VERSION"))], 1);

    {
        let mut f = e.family(
            "probe_attached",
            Kind::Gauge,
            "1 for each kernel program attached, by the hook that serves it.",
        );
        for a in &snapshot.attached {
            f.sample(&[("program", a.program), ("hook", a.hook)], 1);
        }
    }
    {
        let mut f = e.family(
            "probe_events_total",
            Kind::Counter,
            "Runs of each kernel program.",
        );
        for s in &p.programs {
            f.sample(&[("program", s.program)], s.events);
        }
    }
    {
        let mut f = e.family(
            "probe_run_seconds_total",
            Kind::Counter,
            "Time spent in each kernel program (kernel BPF stats; 0 unless kernel.bpf_stats_enabled).",
        );
        for s in &p.programs {
            f.sample(&[("program", s.program)], s.run_time.as_secs_f64());
        }
    }
    {
        let mut f = e.family(
            "probe_errors_total",
            Kind::Counter,
            "Failures inside kernel programs, by kind (programs fail open).",
        );
        for (kind, n) in &p.errors {
            f.sample(&[("kind", kind)], n);
        }
    }
    {
        let mut f = e.family(
            "map_entries",
            Kind::Gauge,
            "Entries in each bounded kernel map.",
        );
        for m in &p.maps {
            f.sample(&[("map", m.map)], m.entries);
        }
    }
    {
        let mut f = e.family(
            "map_capacity",
            Kind::Gauge,
            "Capacity of each bounded kernel map.",
        );
        for m in &p.maps {
            f.sample(&[("map", m.map)], m.capacity);
        }
    }

    let listener_labels = |l: &crate::probes::sockets::ListenerStats| {
        (l.key.netns.to_string(), l.key.port.to_string())
    };
    for (name, kind, help, value) in [
        (
            "connections_accepted_total",
            Kind::Counter,
            "TCP connections accepted (passive opens) per network namespace and local port.",
            (|c: &brokerscope_common::sockets::ListenerCounters| c.accepted)
                as fn(&brokerscope_common::sockets::ListenerCounters) -> u64,
        ),
        (
            "connections_active",
            Kind::Gauge,
            "Accepted TCP connections not yet closed.",
            |c| c.active(),
        ),
        (
            "connections_closed_total",
            Kind::Counter,
            "Accepted TCP connections that have closed.",
            |c| c.closed,
        ),
    ] {
        let mut f = e.family(name, kind, help);
        for l in &p.listeners {
            let (netns, port) = listener_labels(l);
            f.sample(&[("netns", &netns), ("port", &port)], value(&l.counters));
        }
    }
}

/// The endpoint's own families: its requests, connections and TLS material.
fn server_families(e: &mut Exposition, s: &ServerSnapshot) {
    {
        let mut f = e.family(
            "http_requests_total",
            Kind::Counter,
            "Requests answered by the endpoint, by route template (`other` when none matched) and status code.",
        );
        for (path, code, n) in &s.requests {
            f.sample(&[("path", path), ("code", &code.to_string())], n);
        }
    }
    {
        let mut f = e.family(
            "http_request_duration_seconds",
            Kind::Histogram,
            "Time from request to response headers, by route template.",
        );
        for (path, h) in &s.durations {
            let mut cumulative = 0;
            for (i, count) in h.counts.iter().enumerate() {
                cumulative += count;
                let le = DURATION_BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), |b| format!("{b:?}"));
                f.sample_suffixed("_bucket", &[("path", path), ("le", &le)], cumulative);
            }
            f.sample_suffixed("_sum", &[("path", path)], h.sum);
            f.sample_suffixed("_count", &[("path", path)], cumulative);
        }
    }
    e.family(
        "http_connections_active",
        Kind::Gauge,
        "Connections to the endpoint being served (handshaking included).",
    )
    .sample(&[], s.connections_active);
    e.family(
        "http_connections_rejected_total",
        Kind::Counter,
        "Connections closed right after accept because the connection limit was reached.",
    )
    .sample(&[], s.connections_rejected);
    e.family(
        "tls_cert_expiry_timestamp_seconds",
        Kind::Gauge,
        "notAfter of the server certificate in use, Unix seconds.",
    )
    .sample(&[], s.tls_cert_expiry);
    e.family(
        "tls_reloads_total",
        Kind::Counter,
        "Changed TLS material loaded and put in use without a restart.",
    )
    .sample(&[], s.tls_reloads);
    e.family(
        "tls_reload_failures_total",
        Kind::Counter,
        "Changed TLS material refused (the previous material stays in use).",
    )
    .sample(&[], s.tls_reload_failures);
}

#[cfg(test)]
mod tests {
    use brokerscope_common::sockets::{ListenerCounters, ListenerKey};

    use super::*;
    use crate::{
        model::Readiness,
        probes::{Attachment, MapStats, ProbeSnapshot, ProgramStats, sockets::ListenerStats},
    };

    fn snapshot() -> Snapshot {
        Snapshot {
            readiness: Some(Readiness {
                ready: true,
                reasons: vec![],
            }),
            attached: vec![Attachment {
                program: "sock_state",
                hook: "tracepoint/sock/inet_sock_set_state",
                id: 7,
            }],
            probes: ProbeSnapshot {
                listeners: vec![ListenerStats {
                    key: ListenerKey::new(4026531840, 9092),
                    counters: ListenerCounters {
                        accepted: 10,
                        closed: 4,
                        untracked: 1,
                    },
                }],
                programs: vec![ProgramStats {
                    program: "sock_state",
                    events: 123,
                    run_time: std::time::Duration::from_micros(1500),
                }],
                errors: vec![("connections_map_full", 1)],
                maps: vec![MapStats {
                    map: "connections",
                    entries: 5,
                    capacity: 64,
                }],
            },
        }
    }

    #[test]
    fn renders_listener_counters_exactly() {
        let text = prometheus(&snapshot());
        for line in [
            r#"brokerscope_connections_accepted_total{netns="4026531840",port="9092"} 10"#,
            r#"brokerscope_connections_active{netns="4026531840",port="9092"} 5"#,
            r#"brokerscope_connections_closed_total{netns="4026531840",port="9092"} 4"#,
            r#"brokerscope_probe_attached{program="sock_state",hook="tracepoint/sock/inet_sock_set_state"} 1"#,
            r#"brokerscope_probe_events_total{program="sock_state"} 123"#,
            r#"brokerscope_probe_run_seconds_total{program="sock_state"} 0.0015"#,
            r#"brokerscope_probe_errors_total{kind="connections_map_full"} 1"#,
            r#"brokerscope_map_entries{map="connections"} 5"#,
            r#"brokerscope_map_capacity{map="connections"} 64"#,
            "brokerscope_agent_ready 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }

    #[test]
    fn every_family_has_help_and_type_once() {
        let text = prometheus(&snapshot());
        let mut types = std::collections::HashSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(types.insert(name.to_string()), "duplicate TYPE for {name}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(types.contains(name), "sample {name} without TYPE");
        }
    }

    fn server_snapshot() -> ServerSnapshot {
        let stats = crate::server::stats::ServerStats::default();
        stats.record("/metrics", 200, std::time::Duration::from_millis(3));
        stats.record("/metrics", 200, std::time::Duration::from_millis(30));
        stats.record("other", 404, std::time::Duration::from_micros(100));
        stats
            .tls_cert_expiry
            .store(1_900_000_000, std::sync::atomic::Ordering::Relaxed);
        stats
            .tls_reload_failures
            .store(2, std::sync::atomic::Ordering::Relaxed);
        stats.snapshot()
    }

    #[test]
    fn renders_the_endpoint_families_exactly() {
        let text = exposition(&snapshot(), &server_snapshot(), Format::Prometheus);
        for line in [
            "# TYPE brokerscope_http_requests_total counter",
            r#"brokerscope_http_requests_total{path="/metrics",code="200"} 2"#,
            r#"brokerscope_http_requests_total{path="other",code="404"} 1"#,
            "# TYPE brokerscope_http_request_duration_seconds histogram",
            r#"brokerscope_http_request_duration_seconds_bucket{path="/metrics",le="0.001"} 0"#,
            r#"brokerscope_http_request_duration_seconds_bucket{path="/metrics",le="0.005"} 1"#,
            r#"brokerscope_http_request_duration_seconds_bucket{path="/metrics",le="0.05"} 2"#,
            r#"brokerscope_http_request_duration_seconds_bucket{path="/metrics",le="10.0"} 2"#,
            r#"brokerscope_http_request_duration_seconds_bucket{path="/metrics",le="+Inf"} 2"#,
            r#"brokerscope_http_request_duration_seconds_sum{path="/metrics"} 0.033"#,
            r#"brokerscope_http_request_duration_seconds_count{path="/metrics"} 2"#,
            r#"brokerscope_http_request_duration_seconds_count{path="other"} 1"#,
            "brokerscope_tls_cert_expiry_timestamp_seconds 1900000000",
            "brokerscope_tls_reload_failures_total 2",
            "brokerscope_tls_reloads_total 0",
            "brokerscope_http_connections_rejected_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn openmetrics_names_counter_families_without_total_and_ends_with_eof() {
        let text = exposition(&snapshot(), &server_snapshot(), Format::OpenMetrics);
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        for line in [
            "# TYPE brokerscope_http_requests counter",
            "# HELP brokerscope_http_requests Requests answered by the endpoint, by route template (`other` when none matched) and status code.",
            r#"brokerscope_http_requests_total{path="/metrics",code="200"} 2"#,
            "# TYPE brokerscope_probe_events counter",
            r#"brokerscope_probe_events_total{program="sock_state"} 123"#,
            "# TYPE brokerscope_tls_reload_failures counter",
            "brokerscope_tls_reload_failures_total 2",
            "# TYPE brokerscope_connections_accepted counter",
            "# TYPE brokerscope_connections_active gauge",
            "# TYPE brokerscope_http_request_duration_seconds histogram",
            "# TYPE brokerscope_tls_cert_expiry_timestamp_seconds gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        // No metadata line names a counter family with its sample suffix.
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(!name.ends_with("_total"), "{line}");
        }
        // The same samples as the text format, in the same order.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(String::from)
                .collect()
        };
        let plain = exposition(&snapshot(), &server_snapshot(), Format::Prometheus);
        assert_eq!(samples(&text), samples(&plain));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        escape_label(&mut out, "a\"b\\c\nd");
        assert_eq!(out, r#"a\"b\\c\nd"#);
    }
}
