//! The endpoint's own families: its requests and their durations, its connections, its TLS
//! material, live configuration changes and what slow readers of events and logs lost.

use super::text::{Exposition, Kind};
use crate::stats::{DURATION_BUCKETS, ServerSnapshot};

/// The endpoint's own families: its requests, connections and TLS material.
pub(super) fn families(e: &mut Exposition, s: &ServerSnapshot) {
    http_requests(e, s);
    http_connections(e, s);
    tls(e, s);
    changes_and_losses(e, s);
}

/// `http_requests_total` and `http_request_duration_seconds`, by route template.
fn http_requests(e: &mut Exposition, s: &ServerSnapshot) {
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
}

/// Connections to the endpoint: active, pending (handshaking) and rejected.
fn http_connections(e: &mut Exposition, s: &ServerSnapshot) {
    e.family(
        "http_connections_active",
        Kind::Gauge,
        "Connections to the endpoint being served (handshaking included).",
    )
    .sample(&[], s.connections_active);
    e.family(
        "http_connections_pending",
        Kind::Gauge,
        "Connections to the endpoint still in the TLS handshake (no verified client certificate yet).",
    )
    .sample(&[], s.connections_pending);
    e.family(
        "http_connections_rejected_total",
        Kind::Counter,
        "Connections closed because a connection limit was reached: handshakes shed (per peer or in total) and authenticated connections over the cap.",
    )
    .sample(&[], s.connections_rejected);
}

/// TLS: failed handshakes by reason, the certificate's expiry, reloads and refused reloads.
fn tls(e: &mut Exposition, s: &ServerSnapshot) {
    {
        let mut f = e.family(
            "tls_handshake_failures_total",
            Kind::Counter,
            "Connections that ended without completing the TLS handshake with a verified client certificate, by reason.",
        );
        for (reason, n) in &s.handshake_failures {
            f.sample(&[("reason", reason)], n);
        }
    }
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

/// Live configuration changes, and events and log lines that slow readers lost.
fn changes_and_losses(e: &mut Exposition, s: &ServerSnapshot) {
    e.family(
        "config_generation",
        Kind::Gauge,
        "Live configuration changes accepted since start (PATCH /v1/config, config file reloads).",
    )
    .sample(&[], s.config_generation);
    e.family(
        "events_dropped_total",
        Kind::Counter,
        "Events a slow /v1/events subscriber lost (each told by a `dropped` event).",
    )
    .sample(&[], s.events_dropped);
    e.family(
        "log_lines_dropped_total",
        Kind::Counter,
        "Log lines pushed out of the in-memory ring behind /v1/logs.",
    )
    .sample(&[], s.log_lines_dropped);
}
