//! The per-listener socket families: connections, bytes, drops, retransmits and resets, RTT
//! and connection lifetime histograms, labelled by the broker and listener that own the port.

use super::text::{Exposition, Kind};
use crate::{broker::ListenerIndex, probes::sockets::ListenerStats};

/// Reads one listener family's value from a listener's stats.
pub(super) type CounterOf = fn(&ListenerStats) -> u64;

/// Labels of one listener: `broker`, `listener`, `port` when a running broker owns it; `netns`
/// and `port` otherwise (only in watch-all mode, which counts every listener on the node).
pub(super) fn listener_labels(
    l: &ListenerStats,
    index: &ListenerIndex,
) -> Vec<(&'static str, String)> {
    let port = ("port", l.key.port.to_string());
    match index.get(l.key.netns, l.key.port) {
        Some((broker, listener)) => {
            vec![
                ("broker", broker.to_string()),
                ("listener", listener.to_string()),
                port,
            ]
        }
        None => vec![("netns", l.key.netns.to_string()), port],
    }
}

fn as_refs<'a>(labels: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The listener families with one sample per listener: name, type, help, value.
pub(super) const LISTENER_SCALARS: [(&str, Kind, &str, CounterOf); 8] = [
    (
        "connections_accepted_total",
        Kind::Counter,
        "TCP connections accepted (passive opens) on the listener.",
        |l| l.counters.accepted,
    ),
    (
        "connections_active",
        Kind::Gauge,
        "Connections on the listener open now (accepted or found open at start, not closed).",
        |l| l.counters.active(),
    ),
    (
        "connections_closed_total",
        Kind::Counter,
        "Tracked connections on the listener that have closed.",
        |l| l.counters.closed,
    ),
    (
        "bytes_received_total",
        Kind::Counter,
        "Payload bytes received on the listener's connections (SYN/FIN excluded): exact for closed connections; open ones as of the last walk of the open sockets (see brokerscope_open_sockets_walk_age_seconds).",
        |l| l.bytes_received,
    ),
    (
        "bytes_sent_total",
        Kind::Counter,
        "Payload bytes sent and acknowledged on the listener's connections (SYN/FIN excluded): exact for closed connections; open ones as of the last walk of the open sockets (see brokerscope_open_sockets_walk_age_seconds).",
        |l| l.bytes_sent,
    ),
    (
        "tcp_retransmits_total",
        Kind::Counter,
        "Segments retransmitted on the listener's connections.",
        |l| l.counters.retransmits,
    ),
    (
        "tcp_resets_sent_total",
        Kind::Counter,
        "RSTs sent on the listener's connections.",
        |l| l.counters.resets_sent,
    ),
    (
        "tcp_resets_received_total",
        Kind::Counter,
        "RSTs received on the listener's connections.",
        |l| l.counters.resets_received,
    ),
];

pub(super) const LISTEN_DROPS_HELP: &str = "Connections dropped by the listening socket (SYN or accept \
     queue overflow), as the socket counts them since it started listening, as of the last walk \
     of the open sockets.";
pub(super) const RTT_HELP: &str =
    "Smoothed RTT of the listener's connections, observed when each closes.";
pub(super) const DURATION_HELP: &str =
    "Lifetime of the listener's accepted connections, observed when each closes.";

/// Per-listener socket families with one sample per listener (in page order, before the
/// histograms).
pub(super) fn counters(e: &mut Exposition, listeners: &[ListenerStats], index: &ListenerIndex) {
    let owned = labels_of(listeners, index);
    let labels: Vec<Vec<(&'static str, &str)>> = owned.iter().map(|l| as_refs(l)).collect();
    for (name, kind, help, value) in LISTENER_SCALARS {
        let mut f = e.family(name, kind, help);
        for (l, labels) in listeners.iter().zip(&labels) {
            f.sample(labels, value(l));
        }
    }
    let mut f = e.family("listen_drops_total", Kind::Counter, LISTEN_DROPS_HELP);
    for (l, labels) in listeners.iter().zip(&labels) {
        if let Some(drops) = l.listen_drops {
            f.sample(labels, drops);
        }
    }
}

/// The per-listener histograms: RTT and connection lifetime.
pub(super) fn histograms(e: &mut Exposition, listeners: &[ListenerStats], index: &ListenerIndex) {
    let owned = labels_of(listeners, index);
    let labels: Vec<Vec<(&'static str, &str)>> = owned.iter().map(|l| as_refs(l)).collect();
    {
        let mut f = e.family("tcp_rtt_seconds", Kind::Histogram, RTT_HELP);
        for (l, labels) in listeners.iter().zip(&labels) {
            let c = &l.counters;
            f.log2_histogram(labels, &c.rtt, c.rtt_sum_us, 1);
        }
    }
    let mut f = e.family(
        "connection_duration_seconds",
        Kind::Histogram,
        DURATION_HELP,
    );
    for (l, labels) in listeners.iter().zip(&labels) {
        let c = &l.counters;
        f.log2_histogram(labels, &c.duration, c.duration_sum_us, 2);
    }
}

fn labels_of(
    listeners: &[ListenerStats],
    index: &ListenerIndex,
) -> Vec<Vec<(&'static str, String)>> {
    listeners
        .iter()
        .map(|l| listener_labels(l, index))
        .collect()
}
