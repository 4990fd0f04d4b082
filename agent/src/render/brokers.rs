//! The broker table's families: `broker_info` and `broker_restarts_total`.

use super::text::{Exposition, Kind};

/// `broker_info` for running brokers; `broker_restarts_total` for every tracked broker (a
/// stopped broker keeps its count so it stays monotonic across the restart).
pub(super) fn brokers(e: &mut Exposition, brokers: &[crate::broker::Broker]) {
    {
        let mut f = e.family(
            "broker_info",
            Kind::Gauge,
            "1 per running broker: its process, pod, network namespace inode and cgroup v2 path.",
        );
        for b in brokers.iter().filter(|b| b.is_running()) {
            let pid = b.pid.to_string();
            let netns = b.netns.map(|n| n.to_string()).unwrap_or_default();
            f.sample(
                &[
                    ("broker", &b.id),
                    ("pid", &pid),
                    ("pod", b.pod.as_deref().unwrap_or("")),
                    ("netns", &netns),
                    ("cgroup", b.cgroup.path.as_deref().unwrap_or("")),
                ],
                1,
            );
        }
    }
    let mut f = e.family(
        "broker_restarts_total",
        Kind::Counter,
        "Times a new process took over a broker id since the agent started.",
    );
    for b in brokers {
        f.sample(&[("broker", &b.id)], b.restarts);
    }
}
