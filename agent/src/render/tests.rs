//! The renderer's unit tests: exact lines of every family group, HELP/TYPE once, OpenMetrics
//! against the text format, value formatting and label escaping.

use brokerscope_common::sockets::{ListenerCounters, ListenerKey};

use super::{
    text::{SampleValue, escape_label},
    *,
};
use crate::{
    model::Readiness,
    probes::{Attachment, MapStats, ProbeSnapshot, ProgramStats, sockets::ListenerStats},
};

fn snapshot() -> Snapshot {
    Snapshot {
        readiness: Some(Readiness {
            ready: true,
            reasons: vec![],
            degraded: vec![],
            missing: vec![],
            hooks: vec![],
            standby: vec![],
            stalled: vec![],
        }),
        attached: vec![Attachment {
            program: "sock_state",
            hook: "tracepoint/sock/inet_sock_set_state",
            id: 7,
            scope: "broker-only",
        }],
        probes: ProbeSnapshot {
            walk: None,
            listeners: vec![ListenerStats {
                key: ListenerKey::new(4026531840, 9092),
                counters: {
                    let mut c = ListenerCounters {
                        accepted: 10,
                        closed: 4,
                        untracked: 1,
                        bytes_received: 1000,
                        bytes_sent: 65536,
                        retransmits: 3,
                        resets_sent: 2,
                        resets_received: 1,
                        rtt_sum_us: 300,
                        duration_sum_us: 3_000_000,
                        ..ListenerCounters::ZERO
                    };
                    // RTTs of 40, 100 and 160 µs: log2 buckets 5, 6 and 7.
                    c.rtt[5] = 1;
                    c.rtt[6] = 1;
                    c.rtt[7] = 1;
                    // Lifetimes of 1 s, 1 s, 1 s and one open-ended.
                    c.duration[19] = 3;
                    c.duration[39] = 1;
                    c
                },
                // Closed connections' 1000/65536 plus what open ones moved.
                bytes_received: 1500,
                bytes_sent: 70000,
                listen_drops: Some(9),
            }],
            programs: vec![ProgramStats {
                program: "sock_state",
                events: 123,
                run_time: std::time::Duration::from_micros(1500),
                misses: Some(2),
            }],
            errors: vec![("connections_map_full", 1)],
            maps: vec![
                MapStats {
                    map: "connections",
                    entries: 5,
                    capacity: 64,
                    evictions: None,
                },
                MapStats {
                    map: "threads",
                    entries: 7,
                    capacity: 16384,
                    evictions: Some(3),
                },
            ],
            resources: vec![],
            counting_since: Some((
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
                true,
            )),
        },
        ..Snapshot::default()
    }
}

#[test]
fn sample_values_print_as_the_format_wants() {
    let text = |v: &dyn Fn(&mut String)| {
        let mut out = String::new();
        v(&mut out);
        out
    };
    assert_eq!(text(&|o| 0u64.write_to(o)), "0");
    assert_eq!(text(&|o| u64::MAX.write_to(o)), "18446744073709551615");
    assert_eq!(text(&|o| 1_000_000u32.write_to(o)), "1000000");
    assert_eq!(text(&|o| (-42i64).write_to(o)), "-42");
    assert_eq!(text(&|o| i64::MIN.write_to(o)), "-9223372036854775808");
    assert_eq!(text(&|o| 0.0015f64.write_to(o)), "0.0015");
    let seven = 7u8;
    assert_eq!(text(&|o| SampleValue::write_to(&&seven, o)), "7");
}

#[test]
fn renders_broker_info_and_restarts() {
    use crate::broker::{ProcessStatus, tests::broker};
    let mut running = broker("1", 4242, 4026532000, &[("PLAINTEXT", 9092)]);
    running.pod = Some("kafka-1".into());
    running.cgroup.path = Some("/kubepods/pod\"x\"".into());
    running.restarts = 2;
    let mut stopped = broker("2", 77, 4026532001, &[]);
    stopped.state = ProcessStatus::NotRunning;
    stopped.restarts = 1;
    let text = prometheus(&Snapshot {
        brokers: vec![running, stopped],
        ..snapshot()
    });
    let info: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("brokerscope_broker_info{"))
        .collect();
    assert_eq!(
        info,
        vec![
            r#"brokerscope_broker_info{broker="1",pid="4242",pod="kafka-1",netns="4026532000",cgroup="/kubepods/pod\"x\""} 1"#
        ]
    );
    for line in [
        r#"brokerscope_broker_restarts_total{broker="1"} 2"#,
        r#"brokerscope_broker_restarts_total{broker="2"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
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
        r#"brokerscope_probe_misses_total{program="sock_state"} 2"#,
        r#"brokerscope_probe_run_seconds_total{program="sock_state"} 0.0015"#,
        r#"brokerscope_probe_errors_total{kind="connections_map_full"} 1"#,
        r#"brokerscope_map_entries{map="connections"} 5"#,
        r#"brokerscope_map_capacity{map="connections"} 64"#,
        r#"brokerscope_map_evictions_total{map="threads"} 3"#,
        "brokerscope_agent_ready 1",
        r#"brokerscope_counters_start_time_seconds{pinned="true"} 1700000000"#,
        r#"brokerscope_bytes_received_total{netns="4026531840",port="9092"} 1500"#,
        r#"brokerscope_bytes_sent_total{netns="4026531840",port="9092"} 70000"#,
        r#"brokerscope_listen_drops_total{netns="4026531840",port="9092"} 9"#,
        r#"brokerscope_tcp_retransmits_total{netns="4026531840",port="9092"} 3"#,
        r#"brokerscope_tcp_resets_sent_total{netns="4026531840",port="9092"} 2"#,
        r#"brokerscope_tcp_resets_received_total{netns="4026531840",port="9092"} 1"#,
        // Bucket 5 is [32, 64) µs: le = 64 µs.
        r#"brokerscope_tcp_rtt_seconds_bucket{netns="4026531840",port="9092",le="0.000032"} 0"#,
        r#"brokerscope_tcp_rtt_seconds_bucket{netns="4026531840",port="9092",le="0.000064"} 1"#,
        r#"brokerscope_tcp_rtt_seconds_bucket{netns="4026531840",port="9092",le="0.000128"} 2"#,
        r#"brokerscope_tcp_rtt_seconds_bucket{netns="4026531840",port="9092",le="0.000256"} 3"#,
        r#"brokerscope_tcp_rtt_seconds_bucket{netns="4026531840",port="9092",le="+Inf"} 3"#,
        r#"brokerscope_tcp_rtt_seconds_sum{netns="4026531840",port="9092"} 0.0003"#,
        r#"brokerscope_tcp_rtt_seconds_count{netns="4026531840",port="9092"} 3"#,
        // Bucket 19 is [0.52, 1.05) s; every other boundary is rendered.
        r#"brokerscope_connection_duration_seconds_bucket{netns="4026531840",port="9092",le="0.262144"} 0"#,
        r#"brokerscope_connection_duration_seconds_bucket{netns="4026531840",port="9092",le="1.048576"} 3"#,
        r#"brokerscope_connection_duration_seconds_bucket{netns="4026531840",port="9092",le="+Inf"} 4"#,
        r#"brokerscope_connection_duration_seconds_count{netns="4026531840",port="9092"} 4"#,
        r#"brokerscope_connection_duration_seconds_sum{netns="4026531840",port="9092"} 3"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
    }
    // A map that does not count evictions has no such series, rather than a zero.
    assert!(!text.contains(r#"brokerscope_map_evictions_total{map="connections"}"#));
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
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains(*f)))
            .unwrap_or(name);
        assert!(types.contains(family), "sample {name} without TYPE");
    }
}

fn server_snapshot() -> ServerSnapshot {
    use crate::stats::Failure;
    let stats = crate::stats::ServerStats::default();
    stats.record("/metrics", 200, std::time::Duration::from_millis(3));
    stats.record("/metrics", 200, std::time::Duration::from_millis(30));
    stats.record("other", 404, std::time::Duration::from_micros(100));
    stats
        .tls_cert_expiry
        .store(1_900_000_000, std::sync::atomic::Ordering::Relaxed);
    stats
        .tls_reload_failures
        .store(2, std::sync::atomic::Ordering::Relaxed);
    for failure in [
        Failure::NoCertificate,
        Failure::NoCertificate,
        Failure::ShedPerPeer,
    ] {
        stats.handshake_failed(failure);
    }
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
        "brokerscope_http_connections_rejected_total 1",
        "brokerscope_http_connections_pending 0",
        "# TYPE brokerscope_tls_handshake_failures_total counter",
        r#"brokerscope_tls_handshake_failures_total{reason="timeout"} 0"#,
        r#"brokerscope_tls_handshake_failures_total{reason="no_certificate"} 2"#,
        r#"brokerscope_tls_handshake_failures_total{reason="shed_per_peer"} 1"#,
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
