//! JSON views of a [`Snapshot`] for the `/v1` API: each broker with its listeners' counters.
//!
//! Pure, like the Prometheus renderer: a snapshot in, serializable values out.

use serde::Serialize;

use crate::{
    discovery::{Broker, ListenerIndex},
    model::Snapshot,
};

/// One listener's socket counters, as `/v1/brokers` shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListenerCounters {
    pub listener: String,
    pub port: u16,
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub connections_closed: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub tcp_retransmits: u64,
    pub tcp_resets_sent: u64,
    pub tcp_resets_received: u64,
    /// Absent until the live-socket iterator has seen the listening socket.
    pub listen_drops: Option<u64>,
}

/// A broker and its counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BrokerView {
    #[serde(flatten)]
    pub broker: Broker,
    /// One entry per listener that has seen a connection since the agent started.
    pub counters: Vec<ListenerCounters>,
}

/// Every broker in the snapshot, with the counters attributed to it.
pub fn brokers(snapshot: &Snapshot) -> Vec<BrokerView> {
    let index = ListenerIndex::new(&snapshot.brokers);
    let mut views: Vec<BrokerView> = snapshot
        .brokers
        .iter()
        .map(|b| BrokerView {
            broker: b.clone(),
            counters: Vec::new(),
        })
        .collect();
    for l in &snapshot.probes.listeners {
        let Some((broker, listener)) = index.get(l.key.netns, l.key.port) else {
            continue;
        };
        let Some(view) = views.iter_mut().find(|v| v.broker.id == broker) else {
            continue;
        };
        let c = &l.counters;
        view.counters.push(ListenerCounters {
            listener: listener.to_string(),
            port: l.key.port,
            connections_accepted: c.accepted,
            connections_active: c.active(),
            connections_closed: c.closed,
            bytes_received: l.bytes_received,
            bytes_sent: l.bytes_sent,
            tcp_retransmits: c.retransmits,
            tcp_resets_sent: c.resets_sent,
            tcp_resets_received: c.resets_received,
            listen_drops: l.listen_drops,
        });
    }
    views
}

#[cfg(test)]
mod tests {
    use brokerscope_common::sockets::{ListenerCounters as Kernel, ListenerKey};

    use super::*;
    use crate::{discovery::broker::tests::broker, probes::sockets::ListenerStats};

    #[test]
    fn counters_go_to_the_broker_that_owns_the_listener() {
        let mut snapshot = Snapshot {
            brokers: vec![
                broker("1", 10, 100, &[("PLAINTEXT", 9092)]),
                broker("2", 20, 200, &[("PLAINTEXT", 9092)]),
            ],
            ..Snapshot::default()
        };
        let stats = |netns, accepted, sent| ListenerStats {
            key: ListenerKey::new(netns, 9092),
            counters: Kernel {
                accepted,
                closed: 1,
                ..Kernel::ZERO
            },
            bytes_sent: sent,
            bytes_received: 7,
            listen_drops: Some(0),
        };
        // Netns 300 is nobody's (watch-all mode): left out.
        snapshot.probes.listeners = vec![stats(100, 3, 30), stats(200, 5, 50), stats(300, 9, 90)];
        let views = brokers(&snapshot);
        assert_eq!(views.len(), 2);
        assert_eq!(views[0].counters.len(), 1);
        let c = &views[1].counters[0];
        assert_eq!((c.listener.as_str(), c.port), ("PLAINTEXT", 9092));
        assert_eq!(
            (c.connections_accepted, c.connections_active, c.bytes_sent),
            (5, 4, 50)
        );
        let json = serde_json::to_value(&views[0]).unwrap();
        assert_eq!(json["id"], "1");
        assert_eq!(json["counters"][0]["connections_accepted"], 3);
        assert_eq!(json["counters"][0]["listen_drops"], 0);
    }
}
