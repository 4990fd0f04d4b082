//! The endpoint's own counters: requests by route and status, latency histograms, connections,
//! handshake failures by [`Failure`] reason, and the TLS material's state. Written by `server`,
//! read by `render` through [`ServerSnapshot`]; below both, it knows neither.
//!
//! Bounded: request series are keyed by route *template* (or `other`) and status code, never by
//! the raw path.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::locks::Recover as _;

/// Why a handshake did not end with a verified client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Not done within the handshake timeout (silent or slow clients).
    Timeout,
    /// The client sent no certificate.
    NoCertificate,
    /// The client's certificate was refused: unknown or foreign CA, bad signature, expired,
    /// not yet valid, wrong key usage, unparsable.
    BadCertificate,
    /// Not TLS, or TLS the server does not speak: a bad record or message, TLS 1.1 or older, no
    /// shared cipher suite, group or ALPN protocol.
    Protocol,
    /// The client closed or reset the connection, or sent an alert (for instance because it
    /// does not trust the server's certificate), before the handshake was done.
    PeerClosed,
    /// Shed while pending: its peer had `MAX_PENDING_PER_PEER` pending handshakes.
    ShedPerPeer,
    /// Shed while pending: `MAX_PENDING` were pending and its peer had the most; or closed at
    /// accept because the process's socket budget was spent.
    ShedTotal,
}

impl Failure {
    pub const ALL: [Failure; 7] = [
        Failure::Timeout,
        Failure::NoCertificate,
        Failure::BadCertificate,
        Failure::Protocol,
        Failure::PeerClosed,
        Failure::ShedPerPeer,
        Failure::ShedTotal,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::NoCertificate => "no_certificate",
            Failure::BadCertificate => "bad_certificate",
            Failure::Protocol => "protocol",
            Failure::PeerClosed => "peer_closed",
            Failure::ShedPerPeer => "shed_per_peer",
            Failure::ShedTotal => "shed_total",
        }
    }

    /// Position in [`Failure::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Shed by a connection limit (also counted in `http_connections_rejected_total`).
    pub fn is_shed(self) -> bool {
        matches!(self, Failure::ShedPerPeer | Failure::ShedTotal)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Upper bounds (seconds) of the request duration histogram.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The `path` label of requests that matched no route.
pub const OTHER_PATH: &str = "other";

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Non-cumulative counts per bucket of [`DURATION_BUCKETS`]; the last slot is `+Inf`.
    pub counts: [u64; DURATION_BUCKETS.len() + 1],
    pub sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        let slot = DURATION_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(DURATION_BUCKETS.len());
        self.counts[slot] += 1;
        self.sum += seconds;
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

#[derive(Default)]
struct Requests {
    by_code: BTreeMap<(String, u16), u64>,
    durations: BTreeMap<String, Histogram>,
}

/// Live counters, shared by the accept loop, the request middleware and the TLS reloader.
#[derive(Default)]
pub struct ServerStats {
    requests: Mutex<Requests>,
    /// Sockets held, every state (handshaking, served, closing).
    pub connections_active: AtomicU64,
    /// Connections in the TLS handshake (kept by `admission::PendingPool`).
    pub connections_pending: AtomicU64,
    /// Connections closed by a connection limit: shed pending ones, authenticated ones over
    /// `MAX_CONNECTIONS`.
    pub connections_rejected: AtomicU64,
    /// By [`Failure::index`].
    handshake_failures: [AtomicU64; Failure::ALL.len()],
    /// Server certificate notAfter, Unix seconds; 0 until loaded.
    pub tls_cert_expiry: AtomicI64,
    pub tls_reloads: AtomicU64,
    pub tls_reload_failures: AtomicU64,
    /// Accepted live config changes (PATCH /v1/config, file reloads).
    pub config_generation: AtomicU64,
    /// Events a slow `/v1/events` subscriber lost.
    pub events_dropped: AtomicU64,
}

/// What the renderer reads, taken at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerSnapshot {
    /// (path template, status code, requests).
    pub requests: Vec<(String, u16, u64)>,
    pub durations: Vec<(String, Histogram)>,
    pub connections_active: u64,
    pub connections_pending: u64,
    pub connections_rejected: u64,
    /// Every reason of [`Failure::ALL`], in that order, zeros included.
    pub handshake_failures: Vec<(&'static str, u64)>,
    pub tls_cert_expiry: i64,
    pub tls_reloads: u64,
    pub tls_reload_failures: u64,
    pub config_generation: u64,
    pub events_dropped: u64,
    /// Filled by the caller from the log ring.
    pub log_lines_dropped: u64,
}

impl ServerStats {
    /// Counts a connection that ended without completing its handshake; a shed one is also a
    /// rejected connection.
    pub fn handshake_failed(&self, failure: Failure) {
        self.handshake_failures[failure.index()].fetch_add(1, Ordering::Relaxed);
        if failure.is_shed() {
            self.connections_rejected.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one answered request. `path` must be a route template or [`OTHER_PATH`].
    pub fn record(&self, path: &str, code: u16, elapsed: Duration) {
        let mut r = self.requests.lock().recover();
        *r.by_code.entry((path.to_string(), code)).or_default() += 1;
        r.durations
            .entry(path.to_string())
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    pub fn snapshot(&self) -> ServerSnapshot {
        let r = self.requests.lock().recover();
        ServerSnapshot {
            requests: r
                .by_code
                .iter()
                .map(|((p, c), n)| (p.clone(), *c, *n))
                .collect(),
            durations: r
                .durations
                .iter()
                .map(|(p, h)| (p.clone(), h.clone()))
                .collect(),
            connections_active: self.connections_active.load(Ordering::Relaxed),
            connections_pending: self.connections_pending.load(Ordering::Relaxed),
            connections_rejected: self.connections_rejected.load(Ordering::Relaxed),
            handshake_failures: Failure::ALL
                .iter()
                .map(|f| {
                    let n = self.handshake_failures[f.index()].load(Ordering::Relaxed);
                    (f.label(), n)
                })
                .collect(),
            tls_cert_expiry: self.tls_cert_expiry.load(Ordering::Relaxed),
            tls_reloads: self.tls_reloads.load(Ordering::Relaxed),
            tls_reload_failures: self.tls_reload_failures.load(Ordering::Relaxed),
            config_generation: self.config_generation.load(Ordering::Relaxed),
            events_dropped: self.events_dropped.load(Ordering::Relaxed),
            log_lines_dropped: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_by_template_and_code_into_buckets() {
        let stats = ServerStats::default();
        stats.record("/metrics", 200, Duration::from_micros(500));
        stats.record("/metrics", 200, Duration::from_millis(30));
        stats.record("/metrics", 429, Duration::from_secs(20));
        stats.record(OTHER_PATH, 404, Duration::from_millis(1));
        let s = stats.snapshot();
        assert_eq!(
            s.requests,
            [
                ("/metrics".to_string(), 200, 2),
                ("/metrics".to_string(), 429, 1),
                ("other".to_string(), 404, 1),
            ]
        );
        let (_, h) = &s.durations[0];
        let mut want = [0; DURATION_BUCKETS.len() + 1];
        want[0] = 1; // 0.5 ms <= 1 ms
        want[5] = 1; // 30 ms <= 50 ms
        want[DURATION_BUCKETS.len()] = 1; // 20 s: +Inf only
        assert_eq!(h.counts, want);
        assert_eq!(h.count(), 3);
        assert!((h.sum - 20.0305).abs() < 1e-9, "{}", h.sum);
        // Exactly on a bound counts in that bucket (le is inclusive).
        assert_eq!(s.durations[1].1.counts[0], 1);
    }

    #[test]
    fn handshake_failures_by_reason_and_shed_ones_are_rejected_too() {
        let stats = ServerStats::default();
        stats.handshake_failed(Failure::NoCertificate);
        stats.handshake_failed(Failure::NoCertificate);
        stats.handshake_failed(Failure::ShedPerPeer);
        stats.handshake_failed(Failure::ShedTotal);
        let s = stats.snapshot();
        assert_eq!(
            s.handshake_failures,
            [
                ("timeout", 0),
                ("no_certificate", 2),
                ("bad_certificate", 0),
                ("protocol", 0),
                ("peer_closed", 0),
                ("shed_per_peer", 1),
                ("shed_total", 1),
            ]
        );
        assert_eq!(s.connections_rejected, 2);
    }
}
