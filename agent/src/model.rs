//! The agent's state as the rest of the program reads it: probes, readiness, kernel facts, and
//! the brokers discovery found.
//!
//! Data flows one way: kernel maps -> [`Model::snapshot`] -> renderers. Routes read snapshots
//! and never touch a map.

mod locks;

use std::sync::{Mutex, RwLock};

use self::locks::{lock, read, recover, write};

use crate::{
    broker::Broker,
    kernel::KernelFacts,
    probes::{Attachment, ProbeSnapshot, Probes, state::StateSignal},
    strimzi::{StateChange, StateTracker, StateView},
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

/// A standby program stays attached this long after the last time it was wanted, so a broker
/// that comes and goes does not make the agent attach and detach each time (detaching waits
/// for an RCU grace period per program: 72-80 ms each, measured here).
pub const STANDBY_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// How often the walk thread looks whether a background walk is due.
const WALK_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// How often the demand thread passes without being asked.
const DEMAND_RECHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// When each standby condition last held (None: not since the agent started).
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
        let netns = match std::fs::metadata("/proc/self/ns/net") {
            Ok(meta) => std::os::unix::fs::MetadataExt::ino(&meta) as u32,
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

    /// The verifier's log of each program it refused, for the diagnostics bundle.
    pub fn verifier_logs(&self) -> Vec<(&'static str, String)> {
        self.status().verifier_logs.clone()
    }

    /// A snapshot for a request that arrived at `arrived`, shared with concurrent requests
    /// (see [`crate::flight`]): concurrent scrapes cost one snapshot and wait at most one.
    pub fn snapshot_since(&self, arrived: std::time::Instant) -> std::sync::Arc<Snapshot> {
        self.snapshots
            .get(arrived, || std::sync::Arc::new(self.snapshot()))
    }

    pub fn snapshot(&self) -> Snapshot {
        let brokers = self.brokers();
        // Broker pids lead the iterator straight to their namespaces.
        let pids: Vec<u32> = brokers
            .iter()
            .filter(|b| b.is_running())
            .map(|b| b.pid)
            .collect();
        let cgroup2 = self.kernel().and_then(|k| k.cgroup2);
        let read_procs = || {
            let mut files = lock(&self.proc_files);
            files.retain(&pids);
            brokers
                .iter()
                .filter(|b| b.is_running())
                .map(|b| {
                    let cgroup = cgroup2
                        .as_ref()
                        .zip(b.cgroup.path.as_deref())
                        .map(|(mount, path)| mount.join(path.trim_start_matches('/')));
                    (b.id.clone(), files.read(b.pid, cgroup.as_deref()))
                })
                .collect()
        };
        let read_probes = || {
            lock(&self.probes)
                .as_mut()
                .map(|p| p.snapshot(&pids))
                .unwrap_or_default()
        };
        // The kernel maps and /proc are independent reads of about a millisecond each with
        // many brokers: side by side, unless there is only a broker or two.
        let (probes, procs) = if pids.len() > 2 {
            std::thread::scope(|scope| {
                let procs = scope.spawn(read_procs);
                let probes = read_probes();
                (probes, procs.join().unwrap_or_default())
            })
        } else {
            (read_probes(), read_procs())
        };
        let broker_states = brokers
            .iter()
            .map(|b| (b.id.clone(), self.broker_state(b).state.number()))
            .collect();
        Snapshot {
            readiness: Some(self.readiness()),
            attached: self.status().attached.clone(),
            probes,
            brokers,
            broker_states,
            pod_listeners: {
                let mut all: Vec<_> = self.pod_listeners().into_iter().collect();
                all.sort_by(|a, b| a.0.cmp(&b.0));
                all
            },
            procs,
            file_work: crate::files::workers::files().stats(),
        }
    }

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

    /// Marks the broker table changed for the state tracker (cheap: discovery's thread).
    fn sync_states(&self) {
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

    /// The pod listeners now, by broker id.
    pub fn pod_listeners(&self) -> std::collections::HashMap<String, PodListener> {
        read(&self.pod_listeners).clone()
    }

    pub fn pod_listener(&self, id: &str) -> Option<PodListener> {
        read(&self.pod_listeners).get(id).cloned()
    }

    pub fn set_pod_listeners(&self, all: std::collections::HashMap<String, PodListener>) {
        *write(&self.pod_listeners) = all;
    }

    /// The broker state stream, once.
    pub fn take_state_events(&self) -> Option<tokio::sync::mpsc::Receiver<StateSignal>> {
        lock(&self.probes)
            .as_mut()
            .and_then(Probes::take_state_events)
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

    /// Tells the kernel programs which listeners to count and which pids' exits to report:
    /// those of running brokers.
    fn sync_kernel(&self) {
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

    /// Asks the demand thread to attach the standby programs (see
    /// [`brokerscope_common::telemetry::Program::standby`]) a running broker needs now and to
    /// detach those no broker has needed for [`STANDBY_LINGER`]: the file-open hooks while a
    /// broker has not been seen RUNNING yet, the syscall fsync hooks while a broker has a log
    /// dir off ext4 (or the ext4 hooks are not attached). Cheap: callers (discovery, the state
    /// tick) never wait for an attach.
    pub fn sync_demand(&self) {
        *lock(&self.demand.pending) = true;
        self.demand.wake.notify_one();
    }

    /// The thread behind [`Model::sync_demand`]. Each pass works the demand out from the
    /// current broker table and state tracker, so requests coalesce and the last pass's answer
    /// stands; it also passes every [`DEMAND_RECHECK`] to let lingering programs go.
    pub fn spawn_demand_thread(self: &std::sync::Arc<Self>) {
        let model = std::sync::Arc::downgrade(self);
        let spawned = crate::tasks::thread("standby", move || {
            let mut last_wanted = LastWanted::default();
            loop {
                let Some(model) = model.upgrade() else { return };
                {
                    let pending = lock(&model.demand.pending);
                    let (mut pending, _) = recover(model.demand.wake.wait_timeout_while(
                        pending,
                        DEMAND_RECHECK,
                        |p| !*p,
                    ));
                    *pending = false;
                }
                model.apply_demand(&mut last_wanted);
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the standby thread: standby programs stay detached");
        }
    }

    /// The thread that walks the open sockets when a walk is too dear for a scrape to do it
    /// (see [`crate::probes::live`]): it looks every [`WALK_RECHECK`] whether one is due.
    pub fn spawn_walk_thread(self: &std::sync::Arc<Self>) {
        let model = std::sync::Arc::downgrade(self);
        let spawned = crate::tasks::thread("walks", move || {
            loop {
                std::thread::sleep(WALK_RECHECK);
                let Some(model) = model.upgrade() else { return };
                model.walk_if_due();
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the walk thread: scrapes walk the open sockets themselves");
        }
    }

    /// One background walk, if due: its iterators are read without the probes lock, so
    /// scrapes meanwhile read the maps and the previous walk.
    fn walk_if_due(&self) {
        let pids: Vec<u32> = self
            .brokers()
            .iter()
            .filter(|b| b.is_running())
            .map(|b| b.pid)
            .collect();
        let walk = {
            let mut probes = lock(&self.probes);
            let Some(p) = probes.as_mut().filter(|p| p.walk_due()) else {
                return;
            };
            p.begin_walk(&pids)
        };
        let (walked, failed) = walk.read();
        if let Some(p) = lock(&self.probes).as_mut() {
            p.finish_walk(walked, &failed);
        }
    }

    fn apply_demand(&self, last_wanted: &mut LastWanted) {
        let cover = {
            let mut probes = lock(&self.probes);
            let Some(p) = probes.as_mut() else { return };
            // A filesystem mounted after the start loads its module, and with it its fsync
            // tracepoint: its program attaches then.
            if p.attach_appeared_tracepoints() {
                let mut status = self.status_mut();
                status.attached = p.attached().to_vec();
                status.degraded = p.degraded().iter().map(|d| d.describe()).collect();
                status.missing = p.missing();
                status.fsync_cover = p.fsync_cover();
            }
            p.fsync_cover()
        };
        let wanted = {
            // Copied out first: `states()` takes the tracker's lock and then the table's, so
            // the table's must not be held while waiting for the tracker's.
            let running: Vec<Broker> = self
                .brokers_state()
                .brokers
                .iter()
                .filter(|b| b.is_running())
                .cloned()
                .collect();
            // The tracker as it is: a broker it has not followed yet counts as starting.
            let states = lock(&self.states);
            crate::probes::Demand {
                broker_starting: running
                    .iter()
                    .any(|b| !states.settled(&b.id, b.pid, b.start_time_ticks)),
                fsync_uncovered: running
                    .iter()
                    .any(|b| !b.log_dirs_covered(|fs| cover.covers(fs))),
            }
        };
        let now = std::time::Instant::now();
        let linger = |want: bool, last: &mut Option<std::time::Instant>| {
            if want {
                *last = Some(now);
            }
            last.is_some_and(|t| now.duration_since(t) < STANDBY_LINGER)
        };
        let demand = crate::probes::Demand {
            broker_starting: linger(wanted.broker_starting, &mut last_wanted.broker_starting),
            fsync_uncovered: linger(wanted.fsync_uncovered, &mut last_wanted.fsync_uncovered),
        };
        let (attached, detached) = {
            let mut probes = lock(&self.probes);
            let Some(p) = probes.as_mut() else { return };
            let (changed, detached) = p.set_demand(demand);
            if !changed {
                return;
            }
            (p.attached().to_vec(), detached)
        };
        self.status_mut().attached = attached;
        // Detached here, with no lock held: each waits for an RCU grace period.
        drop(detached);
    }

    /// The kernel's exec/exit events for discovery, once.
    pub fn take_process_events(
        &self,
    ) -> Option<tokio::sync::mpsc::Receiver<crate::probes::processes::ProcessSignal>> {
        lock(&self.probes)
            .as_mut()
            .and_then(Probes::take_process_events)
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

    fn brokers_state(&self) -> std::sync::RwLockReadGuard<'_, Brokers> {
        read(&self.brokers)
    }

    fn status(&self) -> std::sync::RwLockReadGuard<'_, Status> {
        read(&self.status)
    }

    fn status_mut(&self) -> std::sync::RwLockWriteGuard<'_, Status> {
        write(&self.status)
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
