//! Brokers' Kafka states: the state tracker behind the model's lock, following the broker
//! table lazily, and the broker views `/v1/brokers` shows.

use super::Model;
use super::views::BrokerView;
use crate::locks::lock;
use crate::{
    broker::Broker,
    probes::state::StateSignal,
    strimzi::{StateTracker, StateView},
};

impl Model {
    /// Marks the broker table changed for the state tracker (cheap: discovery's thread).
    pub(super) fn sync_states(&self) {
        self.states_stale
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// A kernel open/SIGTERM event for the state tracker.
    pub fn on_state_signal(&self, signal: &StateSignal) {
        let id = self.states().on_signal(signal);
        if let Some(broker) = id.and_then(|id| self.broker(&id)) {
            self.states().evaluate(&broker, true);
        }
    }

    /// Derives every broker's state again (listeners that started listening, quiet recovery),
    /// polling the open descriptors of the brokers still starting (log recovery). Whether some
    /// are: the tracker's thread then ticks every [`crate::strimzi::POLL_TICK`].
    pub fn tick_states(&self) -> bool {
        let brokers = self.brokers();
        let mut states = self.states();
        for b in &brokers {
            states.tick(b);
        }
        let polling = states.polling();
        drop(states);
        self.sync_demand();
        polling
    }

    /// The broker's Kafka state now.
    pub fn broker_state(&self, broker: &Broker) -> StateView {
        self.states().evaluate(broker, false)
    }

    /// Every broker with its state, sorted by id.
    pub fn broker_views(&self) -> Vec<BrokerView> {
        self.brokers()
            .into_iter()
            .map(|b| self.broker_view(b))
            .collect()
    }

    pub fn broker_view(&self, broker: Broker) -> BrokerView {
        let mut states = self.states();
        let broker_state = states.evaluate(&broker, false);
        let state_changes = states.changes(&broker.id);
        drop(states);
        let cover = self.status().fsync_cover;
        let log_dir_fsync = broker
            .log_dir_filesystems
            .iter()
            .map(|fs| cover.measures(fs))
            .collect();
        let pod_listener = self.pod_listener(&broker.id);
        BrokerView {
            broker,
            broker_state,
            state_changes,
            log_dir_fsync,
            pod_listener,
        }
    }

    /// The state tracker, following the broker table first if it changed.
    fn states(&self) -> std::sync::MutexGuard<'_, StateTracker> {
        let mut states = lock(&self.states);
        if self
            .states_stale
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            states.sync(&self.brokers());
        }
        states
    }
}
