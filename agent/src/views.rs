//! JSON views for the `/v1` API: each broker (discovery's record and its Kafka state) with its
//! listeners' counters.
//!
//! Pure, like the Prometheus renderer: a snapshot in, serializable values out.

use serde::Serialize;

use crate::{
    broker::ListenerIndex,
    model::{BrokerView, Snapshot},
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

/// A broker and its listeners' counters.
#[derive(Clone, Debug, Serialize)]
pub struct BrokerWithCounters {
    #[serde(flatten)]
    pub view: BrokerView,
    /// One entry per listener that has seen a connection since the agent started.
    pub counters: Vec<ListenerCounters>,
}

/// `views` with the counters the snapshot attributes to each broker.
pub fn with_counters(snapshot: &Snapshot, views: Vec<BrokerView>) -> Vec<BrokerWithCounters> {
    let index = ListenerIndex::new(&snapshot.brokers);
    let mut out: Vec<BrokerWithCounters> = views
        .into_iter()
        .map(|view| BrokerWithCounters {
            view,
            counters: Vec::new(),
        })
        .collect();
    for l in &snapshot.probes.listeners {
        let Some((broker, listener)) = index.get(l.key.netns, l.key.port) else {
            continue;
        };
        let Some(b) = out.iter_mut().find(|b| b.view.broker.id == broker) else {
            continue;
        };
        let c = &l.counters;
        b.counters.push(ListenerCounters {
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
    out
}

#[cfg(test)]
mod tests {
    use brokerscope_common::sockets::{ListenerCounters as Kernel, ListenerKey};

    use super::*;
    use crate::{broker::tests::broker, probes::sockets::ListenerStats};

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
        let views = snapshot
            .brokers
            .iter()
            .map(|b| BrokerView {
                broker: b.clone(),
                broker_state: crate::strimzi::StateView::of(crate::strimzi::KafkaState::Running),
                state_changes: Vec::new(),
                log_dir_fsync: Vec::new(),
                pod_listener: None,
            })
            .collect();
        let out = with_counters(&snapshot, views);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].counters.len(), 1);
        let c = &out[1].counters[0];
        assert_eq!((c.listener.as_str(), c.port), ("PLAINTEXT", 9092));
        assert_eq!(
            (c.connections_accepted, c.connections_active, c.bytes_sent),
            (5, 4, 50)
        );
        let json = serde_json::to_value(&out[0]).unwrap();
        assert_eq!(json["id"], "1");
        assert_eq!(json["broker_state"]["number"], 3);
        assert_eq!(json["counters"][0]["connections_accepted"], 3);
        assert_eq!(json["counters"][0]["listen_drops"], 0);
    }
}
