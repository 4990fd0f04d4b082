//! The Strimzi families: each broker's state in Strimzi's numbering and the per-pod listener
//! that serves it to Strimzi's Cluster Operator.

use super::text::{Exposition, Kind};

/// `broker_state`: Strimzi's number for every tracked broker (0 once stopped).
pub(super) fn broker_states(e: &mut Exposition, states: &[(String, u8)]) {
    let mut f = e.family(
        "broker_state",
        Kind::Gauge,
        "Kafka broker state derived from the kernel, in Strimzi's numbering: 0 not running, \
         1 starting, 2 recovery, 3 running, 6 pending controlled shutdown, 7 shutting down, \
         127 unknown.",
    );
    for (id, n) in states {
        f.sample(&[("broker", id)], n);
    }
}

/// `pod_listener`: each broker's listener in its pod (`server.pod_listeners`), 1 in its state.
pub(super) fn pod_listeners(e: &mut Exposition, all: &[(String, crate::model::PodListener)]) {
    let mut f = e.family(
        "pod_listener",
        Kind::Gauge,
        "A broker's listener in its own pod's network namespace: 1 in its state (serving, \
         port_taken: left to whoever holds the port, failed: retried).",
    );
    for (id, listener) in all {
        f.sample(
            &[
                ("broker", id),
                ("pod", listener.pod()),
                ("state", listener.state()),
            ],
            1u8,
        );
    }
}
