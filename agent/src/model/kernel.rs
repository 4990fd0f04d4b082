//! The kernel side of the model: the kernel check's facts, the attached programs and their
//! status, the event streams they feed, and what they are told of the running brokers.

use super::Model;
use crate::locks::lock;
use crate::{
    kernel::KernelFacts,
    probes::{Probes, state::StateSignal},
};

impl Model {
    pub fn set_kernel(&self, facts: KernelFacts) {
        self.status_mut().kernel = Some(facts);
    }

    /// What the kernel check found, once it ran.
    pub fn kernel(&self) -> Option<KernelFacts> {
        self.status().kernel.clone()
    }

    /// Installs the attached probes.
    pub fn set_probes(&self, probes: Probes) {
        {
            let mut status = self.status_mut();
            status.attached = probes.attached().to_vec();
            status.degraded = probes.degraded().iter().map(|d| d.describe()).collect();
            status.verifier_logs = probes
                .degraded()
                .iter()
                .filter_map(|d| Some((d.program.name(), d.verifier_log.clone()?)))
                .collect();
            status.missing = probes.missing();
            status.fsync_cover = probes.fsync_cover();
            status.standby = probes
                .standby()
                .filter_map(|p| {
                    let when = p.standby()?.describe();
                    Some(format!(
                        "{} ({}): {when}: a syscalls tracepoint sends every syscall of every \
                         task on the node through the kernel's slow path",
                        p.name(),
                        p.hook()
                    ))
                })
                .collect();
            status.probe_error = None;
        }
        let signals = probes
            .attached()
            .iter()
            .any(|a| a.program == brokerscope_common::telemetry::Program::StateSignal.name());
        lock(&self.states).set_sigterm_observed(signals);
        *lock(&self.probes) = Some(probes);
    }

    /// As if the probes had attached `signal_deliver` (tests that run no kernel programs).
    #[cfg(test)]
    pub fn assume_sigterm_observed(&self) {
        lock(&self.states).set_sigterm_observed(true);
    }

    /// Keeps the agent's own endpoint out of every counter, even in watch-all mode.
    pub fn ignore_own_listener(&self, port: u16) {
        let netns = match crate::proc::ProcFs::default().own_netns() {
            Ok(inode) => inode,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the agent's network namespace");
                return;
            }
        };
        let mut probes = lock(&self.probes);
        if let Some(Err(e)) = probes.as_mut().map(|p| p.ignore_listener(netns, port)) {
            tracing::warn!(error = %e, netns, port, "cannot exclude the agent's own listener");
        }
    }

    /// `probes.watch_all_listeners`, live. Without probes there is nothing to switch.
    pub fn set_watch_all(&self, on: bool) -> Result<(), String> {
        let mut probes = lock(&self.probes);
        match probes.as_mut() {
            Some(p) => p.set_watch_all(on).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// The kernel's connection event ring, once.
    pub fn take_conn_events(&self) -> Option<crate::probes::sockets_events::ConnEventRing> {
        lock(&self.probes)
            .as_mut()
            .and_then(Probes::take_conn_events)
    }

    /// Kernel connection events on or off (on while `/v1/events` has a subscriber).
    pub fn set_conn_events(&self, on: bool) {
        let mut probes = lock(&self.probes);
        if let Some(Err(e)) = probes.as_mut().map(|p| p.set_conn_events(on)) {
            tracing::warn!(error = %e, on, "cannot switch kernel connection events");
        } else {
            tracing::debug!(on, "kernel connection events switched");
        }
    }

    /// Publishes kernel connection events, each attributed to its broker and listener.
    pub fn publish_conn_events(&self, events: &[brokerscope_common::sockets::ConnEvent]) {
        if !self.events.has_subscribers() {
            return;
        }
        let index = crate::broker::ListenerIndex::new(&self.brokers_state().brokers);
        for e in events {
            let (broker, listener) = match index.get(e.netns, e.port) {
                Some((b, l)) => (Some(b.to_string()), Some(l.to_string())),
                None => (None, None),
            };
            let mut event = crate::events::conn_event(e, broker);
            event.listener = listener;
            self.events.publish(event);
        }
    }

    /// Records why the probes could not be attached; readiness reports it.
    pub fn set_probe_error(&self, error: String) {
        self.status_mut().probe_error = Some(error);
    }

    /// Detaches everything (shutdown).
    pub fn take_probes(&self) -> Option<Probes> {
        self.status_mut().attached.clear();
        lock(&self.probes).take()
    }

    /// The verifier's log of each program it refused, for the diagnostics bundle.
    pub fn verifier_logs(&self) -> Vec<(&'static str, String)> {
        self.status().verifier_logs.clone()
    }

    /// The broker state stream, once.
    pub fn take_state_events(&self) -> Option<tokio::sync::mpsc::Receiver<StateSignal>> {
        lock(&self.probes)
            .as_mut()
            .and_then(Probes::take_state_events)
    }

    /// The kernel's exec/exit events for discovery, once.
    pub fn take_process_events(
        &self,
    ) -> Option<tokio::sync::mpsc::Receiver<crate::probes::processes::ProcessSignal>> {
        lock(&self.probes)
            .as_mut()
            .and_then(Probes::take_process_events)
    }

    /// Tells the kernel programs which listeners to count and which pids' exits to report:
    /// those of running brokers.
    pub(super) fn sync_kernel(&self) {
        let (listeners, pids, records) = {
            let brokers = self.brokers_state();
            let records: Vec<crate::broker::Remembered> = brokers
                .brokers
                .iter()
                .map(crate::broker::Remembered::of)
                .collect();
            let running = brokers.brokers.iter().filter(|b| b.is_running());
            let mut listeners = Vec::new();
            let mut pids = Vec::new();
            for b in running {
                pids.push(b.pid);
                if let Some(netns) = b.netns {
                    listeners.extend(b.listeners.iter().map(|l| (netns, l.port)));
                }
            }
            (listeners, pids, records)
        };
        let records = serde_json::to_vec(&records).unwrap_or_default();
        {
            let mut probes = lock(&self.probes);
            let Some(probes) = probes.as_mut() else {
                return;
            };
            probes.set_broker_records(&records);
            if let Err(e) = probes.set_watched(&listeners) {
                tracing::warn!(error = %e, "cannot update the watched listeners");
            }
            if let Err(e) = probes.set_broker_pids(&pids) {
                tracing::warn!(error = %e, "cannot update the broker pids");
            }
        }
        self.sync_demand();
    }

    /// The broker records an earlier agent kept with the pinned maps (none if the maps are
    /// new, or the records unreadable: said in the log).
    pub fn remembered_brokers(&self) -> Vec<crate::broker::Remembered> {
        let bytes = match lock(&self.probes).as_ref() {
            Some(probes) => probes.broker_records(),
            None => return Vec::new(),
        };
        if bytes.is_empty() {
            return Vec::new();
        }
        match serde_json::from_slice(&bytes) {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(error = %e, "the kept broker records are unreadable: restart counts start over");
                Vec::new()
            }
        }
    }
}
