//! Whether the agent is ready, and why not: the probes, discovery, and the file workers.

use super::Model;
use super::views::Readiness;

impl Model {
    pub fn readiness(&self) -> Readiness {
        let status = self.status();
        let mut reasons = Vec::new();
        if status.attached.is_empty() {
            reasons.push(match &status.probe_error {
                Some(error) => format!("probes not attached: {error}"),
                None => "probes not attached yet".to_string(),
            });
        }
        let degraded = status.degraded.clone();
        let missing = status.missing.clone();
        let hooks = status.attached.clone();
        let standby = status.standby.clone();
        drop(status);
        let brokers = self.brokers_state();
        if !brokers.scanned {
            reasons.push(match &brokers.error {
                Some(error) => format!("discovery has not run yet: {error}"),
                None => "discovery has not run yet".to_string(),
            });
        }
        let stalled = crate::files::workers::files()
            .stalled()
            .into_iter()
            .map(|s| format!("{}: running for {} s", s.what, s.running_for.as_secs()))
            .collect();
        Readiness {
            ready: reasons.is_empty(),
            reasons,
            degraded,
            missing,
            hooks,
            standby,
            stalled,
        }
    }
}
