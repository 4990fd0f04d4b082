//! What the model hands out: readiness, the snapshot renderers read, a broker as `/v1/brokers`
//! shows it and its pod listener.

use crate::{
    broker::Broker,
    probes::{Attachment, ProbeSnapshot},
    strimzi::{StateChange, StateView},
};

/// Why the agent is not ready, or that it is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub reasons: Vec<String>,
    /// Optional programs this kernel refused and what covers for them (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
    /// Capabilities this kernel allows no hook for (absent when none): the agent serves the
    /// rest, and says here what it cannot see.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// Every attached hook with its scope (`broker-only`, or `node-wide` for the hooks that
    /// slow every process while attached; those need `probes.node_wide_hooks`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Attachment>,
    /// Programs attached only while needed, and when (absent when none);
    /// `brokerscope_probe_attached` says whether each is attached now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub standby: Vec<String>,
    /// Reads of brokers' own files running past their deadline (absent when none): a hung
    /// filesystem holds a worker. The brokers concerned say UNKNOWN where it matters; the agent
    /// serves everything else, so this does not make it unready.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stalled: Vec<String>,
}

/// A broker's listener inside its pod's network namespace, as `/v1/brokers` and the
/// `brokerscope_pod_listener` metric show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PodListener {
    /// Listening, with the broker's own certificate; `certificate_error`: the files on disk
    /// changed and could not be loaded (the certificate in use is kept), naming them by their
    /// paths in the broker's container.
    Serving {
        port: u16,
        pod: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        certificate_error: Option<String>,
    },
    /// Something else listens on the port there (Strimzi's in-JVM agent): left alone.
    PortTaken { port: u16, pod: String },
    /// Not opened: why (no pod name, no certificate, a bind error); retried. `pod` is empty
    /// when the broker has none.
    Failed {
        port: u16,
        pod: String,
        reason: String,
    },
}

impl PodListener {
    pub fn state(&self) -> &'static str {
        match self {
            PodListener::Serving { .. } => "serving",
            PodListener::PortTaken { .. } => "port_taken",
            PodListener::Failed { .. } => "failed",
        }
    }

    /// The pod's name (empty when the broker has none).
    pub fn pod(&self) -> &str {
        match self {
            PodListener::Serving { pod, .. }
            | PodListener::PortTaken { pod, .. }
            | PodListener::Failed { pod, .. } => pod,
        }
    }
}

/// A broker as `/v1/brokers` shows it: discovery's record, its derived Kafka state and the
/// last state changes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BrokerView {
    #[serde(flatten)]
    pub broker: Broker,
    pub broker_state: StateView,
    pub state_changes: Vec<StateChange>,
    /// How each of `log_dirs`' fsyncs are measured on this node: `count+duration`, `count`
    /// (xfs and btrfs) or `not measured`.
    pub log_dir_fsync: Vec<&'static str>,
    /// Its pod listener, when `server.pod_listeners` is on and it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_listener: Option<PodListener>,
}

/// What a renderer needs, read at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub readiness: Option<Readiness>,
    pub attached: Vec<Attachment>,
    pub probes: ProbeSnapshot,
    /// Every tracked broker, sorted by id.
    pub brokers: Vec<Broker>,
    /// (broker id, Strimzi state number), as `brokers`.
    pub broker_states: Vec<(String, u8)>,
    /// (broker id, pod listener), sorted by id; empty while `server.pod_listeners` is off.
    pub pod_listeners: Vec<(String, PodListener)>,
    /// /proc and cgroup figures of running brokers, by broker id.
    pub procs: Vec<(String, crate::usage::ProcStats)>,
    /// The workers reading brokers' own files.
    pub file_work: crate::files::workers::WorkStats,
}
