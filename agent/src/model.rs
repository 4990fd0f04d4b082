//! The agent's state as the rest of the program reads it: probes, readiness, kernel facts, and
//! the brokers discovery found.
//!
//! Data flows one way: kernel maps -> [`Model::snapshot`] -> renderers. Routes read snapshots
//! and never touch a map.
//!
//! The state itself and its locks are here; each part of what it does is a module: [`kernel`]
//! (facts, programs, event streams), [`table`] (the broker table), [`states`] (brokers' Kafka
//! states and views), [`pods`] (pod listeners), [`readiness`], [`snapshot`] (what renderers
//! read), [`standby`] (programs attached on demand) and [`walks`] (background socket walks);
//! [`views`] holds the types handed out, [`crate::locks`] the poisoned-lock recovery.

mod kernel;
mod pods;
mod readiness;
mod snapshot;
mod standby;
mod states;
mod table;
mod views;
mod walks;

use std::sync::{Mutex, RwLock};

/// Named outside this module by tests only (others read it through [`Model::readiness`]).
#[cfg(test)]
pub use self::views::Readiness;
pub use self::views::{BrokerView, PodListener, Snapshot};
use crate::locks::{read, write};
use crate::{
    broker::Broker,
    kernel::KernelFacts,
    probes::{Attachment, Probes},
    strimzi::StateTracker,
};

#[derive(Default)]
struct Status {
    kernel: Option<KernelFacts>,
    /// Why the probes are not attached (None while loading or once attached).
    probe_error: Option<String>,
    attached: Vec<Attachment>,
    degraded: Vec<String>,
    /// The verifier's log of each program it refused (diagnostics only: many lines each).
    verifier_logs: Vec<(&'static str, String)>,
    missing: Vec<String>,
    standby: Vec<String>,
    fsync_cover: crate::probes::FsyncCover,
}

/// The broker table as discovery last published it.
#[derive(Default)]
struct Brokers {
    /// Sorted by id.
    brokers: Vec<Broker>,
    /// A full discovery scan completed at least once.
    scanned: bool,
    /// Why the last full scan failed (cleared by the next successful one).
    error: Option<String>,
}

/// Shared state. One per process.
#[derive(Default)]
pub struct Model {
    probes: Mutex<Option<Probes>>,
    status: RwLock<Status>,
    brokers: RwLock<Brokers>,
    /// Broker start/stop/state changes and kernel connection events, for `/v1/events`.
    pub events: crate::events::EventBus,
    states: Mutex<StateTracker>,
    /// The broker table changed since the state tracker last followed it. The tracker follows
    /// lazily, on its own thread or a request's: its reads (log dirs, listening sockets) must
    /// not slow discovery down.
    states_stale: std::sync::atomic::AtomicBool,
    /// Concurrent readers share snapshots (see [`Model::snapshot_since`]).
    snapshots: crate::flight::Flight<std::sync::Arc<Snapshot>>,
    /// The brokers' /proc and cgroup files, open between snapshots.
    proc_files: Mutex<crate::usage::ProcFiles>,
    /// Wakes the thread that attaches and detaches the standby programs (see
    /// [`Model::sync_demand`]).
    demand: DemandSignal,
    /// Woken (one permit kept) each time the broker table changes: the pod listeners follow it.
    pub broker_table: tokio::sync::Notify,
    /// Each broker's pod listener (`server.pod_listeners`), by broker id; set by `server::pods`.
    pod_listeners: RwLock<std::collections::HashMap<String, PodListener>>,
}

/// When each standby condition last held (None: not since the agent started). Kept by the
/// demand thread (see [`standby`]); here because [`Model`]'s methods name it.
#[derive(Default)]
struct LastWanted {
    broker_starting: Option<std::time::Instant>,
    fsync_uncovered: Option<std::time::Instant>,
}

/// "Work the demand out again", set by any thread, taken by the demand thread.
#[derive(Default)]
struct DemandSignal {
    pending: Mutex<bool>,
    wake: std::sync::Condvar,
}

/// The guarded parts, each lock taken as [`crate::locks`] takes them.
impl Model {
    /// The broker table, for reading.
    fn brokers_state(&self) -> std::sync::RwLockReadGuard<'_, Brokers> {
        read(&self.brokers)
    }

    /// The probes' status, for reading.
    fn status(&self) -> std::sync::RwLockReadGuard<'_, Status> {
        read(&self.status)
    }

    /// The probes' status, for writing.
    fn status_mut(&self) -> std::sync::RwLockWriteGuard<'_, Status> {
        write(&self.status)
    }
}
