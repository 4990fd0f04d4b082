//! The broker table as discovery publishes it, and what follows each change: the kernel
//! programs are told, events published, the state tracker marked stale.

use super::Model;
use crate::broker::Broker;
use crate::locks::write;

impl Model {
    /// Publishes the broker table after a full discovery scan; from then on
    /// discovery counts as run for readiness.
    pub fn set_brokers(&self, brokers: Vec<Broker>) {
        let old = {
            let mut b = write(&self.brokers);
            b.scanned = true;
            b.error = None;
            std::mem::replace(&mut b.brokers, brokers)
        };
        self.follow_brokers(&old);
    }

    /// Publishes the broker table after a single-process change (exec, exit, live config).
    pub fn update_brokers(&self, brokers: Vec<Broker>) {
        let old = std::mem::replace(&mut write(&self.brokers).brokers, brokers);
        self.follow_brokers(&old);
    }

    /// After the broker table changed from `old`: the kernel maps first, then the events, so a
    /// subscriber told of a started broker can rely on its exit being seen. Callers (discovery)
    /// serialize table changes, so `old` is the table this change replaced.
    fn follow_brokers(&self, old: &[Broker]) {
        self.sync_kernel();
        publish_changes(&self.events, old, &self.brokers_state().brokers);
        self.sync_states();
        self.broker_table.notify_one();
    }

    /// Records why a full discovery scan failed; readiness reports it until one succeeds.
    pub fn set_discovery_error(&self, error: String) {
        write(&self.brokers).error = Some(error);
    }

    /// Every tracked broker, running or not, sorted by id.
    pub fn brokers(&self) -> Vec<Broker> {
        self.brokers_state().brokers.clone()
    }

    /// One broker by id.
    pub fn broker(&self, id: &str) -> Option<Broker> {
        self.brokers_state()
            .brokers
            .iter()
            .find(|b| b.id == id)
            .cloned()
    }
}

/// Broker events between two tables: a new running process is `broker_started`, a running one
/// gone is `broker_stopped`, any other state change `broker_state`.
fn publish_changes(bus: &crate::events::EventBus, old: &[Broker], new: &[Broker]) {
    use crate::events::Event;
    if !bus.has_subscribers() {
        return;
    }
    for b in new {
        let before = old.iter().find(|o| o.id == b.id);
        let was_running = before.is_some_and(|o| o.is_running());
        let detail =
            || serde_json::json!({ "pid": b.pid, "state": b.state, "restarts": b.restarts });
        let kind = match (was_running, b.is_running()) {
            (false, true) => "broker_started",
            (true, false) => "broker_stopped",
            (true, true) if before.is_some_and(|o| o.pid != b.pid) => "broker_started",
            _ if before.is_some_and(|o| o.state != b.state) => "broker_state",
            _ => continue,
        };
        bus.publish(Event::new(kind, Some(b.id.clone()), detail()));
    }
    for o in old.iter().filter(|o| o.is_running()) {
        if !new.iter().any(|b| b.id == o.id) {
            bus.publish(Event::new(
                "broker_stopped",
                Some(o.id.clone()),
                serde_json::json!({ "pid": o.pid, "state": "gone", "restarts": o.restarts }),
            ));
        }
    }
}
