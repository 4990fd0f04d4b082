//! The agent's state as the rest of the program reads it: probes, readiness, kernel facts.
//!
//! Data flows one way: kernel maps -> [`Model::snapshot`] -> renderers. Routes read snapshots
//! and never touch a map.

use std::sync::{Mutex, RwLock};

use crate::{
    kernel::KernelFacts,
    probes::{Attachment, ProbeSnapshot, Probes},
};

/// Why the agent is not ready, or that it is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub reasons: Vec<String>,
}

#[derive(Default)]
struct Status {
    kernel: Option<KernelFacts>,
    /// Why the probes are not attached (None while loading or once attached).
    probe_error: Option<String>,
    attached: Vec<Attachment>,
}

/// Shared state. One per process.
#[derive(Default)]
pub struct Model {
    probes: Mutex<Option<Probes>>,
    status: RwLock<Status>,
}

/// What a renderer needs, read at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub readiness: Option<Readiness>,
    pub attached: Vec<Attachment>,
    pub probes: ProbeSnapshot,
}

impl Model {
    pub fn set_kernel(&self, facts: KernelFacts) {
        self.status_mut().kernel = Some(facts);
    }

    /// Installs the attached probes.
    pub fn set_probes(&self, probes: Probes) {
        {
            let mut status = self.status_mut();
            status.attached = probes.attached().to_vec();
            status.probe_error = None;
        }
        *self.probes.lock().unwrap_or_else(|p| p.into_inner()) = Some(probes);
    }

    /// Keeps the agent's own endpoint out of every counter, even in watch-all mode.
    pub fn ignore_own_listener(&self, port: u16) {
        let netns = match std::fs::metadata("/proc/self/ns/net") {
            Ok(meta) => std::os::unix::fs::MetadataExt::ino(&meta) as u32,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the agent's network namespace");
                return;
            }
        };
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Err(e)) = probes.as_mut().map(|p| p.ignore_listener(netns, port)) {
            tracing::warn!(error = %e, netns, port, "cannot exclude the agent's own listener");
        }
    }

    /// Records why the probes could not be attached; readiness reports it.
    pub fn set_probe_error(&self, error: String) {
        self.status_mut().probe_error = Some(error);
    }

    /// Detaches everything (shutdown).
    pub fn take_probes(&self) -> Option<Probes> {
        self.status_mut().attached.clear();
        self.probes.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn readiness(&self) -> Readiness {
        let status = self.status();
        let mut reasons = Vec::new();
        if status.attached.is_empty() {
            reasons.push(match &status.probe_error {
                Some(error) => format!("probes not attached: {error}"),
                None => "probes not attached yet".to_string(),
            });
        }
        Readiness {
            ready: reasons.is_empty(),
            reasons,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let probes = self
            .probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .map(|p| p.snapshot(&[]))
            .unwrap_or_default();
        Snapshot {
            readiness: Some(self.readiness()),
            attached: self.status().attached.clone(),
            probes,
        }
    }

    fn status(&self) -> std::sync::RwLockReadGuard<'_, Status> {
        self.status.read().unwrap_or_else(|p| p.into_inner())
    }

    fn status_mut(&self) -> std::sync::RwLockWriteGuard<'_, Status> {
        self.status.write().unwrap_or_else(|p| p.into_inner())
    }
}
