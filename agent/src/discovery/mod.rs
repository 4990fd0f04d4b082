//! Broker discovery: which processes on this node are Kafka brokers, and who each one is.
//!
//! Owns the broker table: finding broker processes by `discovery.cmdline_patterns` over
//! `/proc/<pid>/cmdline`, reading each one's `server.properties` (through `/proc/<pid>/root`, so
//! brokers in containers are read from their own filesystem) with `--override` arguments on top,
//! and the process facts around it (network namespace, cgroup, pod name, start time). It
//! publishes every change to the [`Model`] as a sorted snapshot.
//!
//! Must not touch: kernel maps or programs (`probes/`), the HTTP side (`server/`). It never
//! writes anything under /proc or into a broker's files.
//!
//! Event-driven by design: [`Discovery::scan_all`] once at start, then [`Discovery::on_exec`] and
//! [`Discovery::on_exit`] per `sched_process_exec`/`sched_process_exit` event, each a handful of
//! small reads of one pid. [`Discovery::spawn_fallback_rescan`] rescans every
//! [`SAFETY_RESCAN`] besides, or every [`FALLBACK_RESCAN`] when the events are unavailable.

pub mod broker;
mod cmdline;
pub mod listeners;
mod proc;
pub mod properties;
mod table;

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

pub use broker::ListenerIndex;
pub use broker::{Broker, BrokerState};
pub use cmdline::PatternError;
pub use table::MAX_BROKERS;

use self::{
    broker::{Cgroup, Evidence, IdSource},
    cmdline::{Cmdline, Patterns},
    proc::{ProcError, ProcFs},
    properties::{BrokerSettings, ListenersSource, Properties},
    table::{BrokerTable, Observed},
};
use crate::model::Model;

/// How often the rescan task walks /proc when kernel exec/exit events are unavailable (the
/// probes did not attach).
pub const FALLBACK_RESCAN: Duration = Duration::from_secs(2);
/// How often it walks /proc when the events drive discovery: only a safety net.
pub const SAFETY_RESCAN: Duration = Duration::from_secs(30);

/// Longest path, and longest override key, kept as evidence.
const MAX_PATH_EVIDENCE: usize = 1024;
const MAX_KEY_EVIDENCE: usize = 128;

/// Why discovery could not run at all (one process that cannot be read is evidence, not this).
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error("cannot list processes: {source}")]
    ListProcesses {
        #[source]
        source: ProcError,
    },
}

/// Why a broker's properties file was not used (shown as evidence).
#[derive(Debug, thiserror::Error)]
enum PropertiesFileError {
    #[error("properties file {path} not read: {source}")]
    Read {
        path: String,
        #[source]
        source: ProcError,
    },
    #[error("properties file {path} not parsed: {source}")]
    Parse {
        path: String,
        #[source]
        source: properties::PropertiesError,
    },
}

/// What discovery needs to start.
#[derive(Clone, Debug)]
pub struct Settings {
    pub cmdline_patterns: Vec<String>,
    pub listener_ports: Vec<u16>,
    /// The cgroup v2 mount (`KernelFacts::cgroup2`), for cgroup ids.
    pub cgroup2: Option<PathBuf>,
}

/// One full scan's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanSummary {
    /// Processes looked at.
    pub processes: usize,
    /// Brokers running after the scan.
    pub running: usize,
}

struct State {
    proc: ProcFs,
    patterns: Patterns,
    listener_ports: Vec<u16>,
    cgroup2: Option<PathBuf>,
    own_pid: u32,
    boot_time: Option<u64>,
    clock_ticks: u64,
    table: BrokerTable,
}

/// The broker finder. Cheap to share (`Arc`); every method takes `&self`.
pub struct Discovery {
    model: Arc<Model>,
    state: Mutex<State>,
}

impl Discovery {
    /// Compiles the patterns; reads nothing yet.
    pub fn new(settings: Settings, model: Arc<Model>) -> Result<Self, DiscoveryError> {
        Self::with_proc(settings, model, ProcFs::default())
    }

    fn with_proc(
        settings: Settings,
        model: Arc<Model>,
        proc: ProcFs,
    ) -> Result<Self, DiscoveryError> {
        let patterns = Patterns::new(&settings.cmdline_patterns)?;
        let boot_time = proc::boot_time(&proc);
        Ok(Self {
            model,
            state: Mutex::new(State {
                proc,
                patterns,
                listener_ports: settings.listener_ports,
                cgroup2: settings.cgroup2,
                own_pid: std::process::id(),
                boot_time,
                clock_ticks: proc::clock_ticks(),
                table: BrokerTable::default(),
            }),
        })
    }

    /// Looks at every process: new brokers are examined, known ones only have their start time
    /// checked, and brokers whose process is gone stop. Publishes the table to the model (the
    /// first successful scan makes discovery count as run for `/ready`).
    pub fn scan_all(&self) -> Result<ScanSummary, DiscoveryError> {
        let mut st = self.lock();
        let pids = match st.proc.pids() {
            Ok(pids) => pids,
            Err(source) => {
                let e = DiscoveryError::ListProcesses { source };
                self.model.set_discovery_error(e.to_string());
                return Err(e);
            }
        };
        let mut seen = HashSet::new();
        for &pid in &pids {
            if let Some(process) = st.visit(pid, false) {
                seen.insert(process);
            }
        }
        for id in st.table.stop_unseen(&seen) {
            tracing::info!(broker = %id, "broker process gone");
        }
        let snapshot = st.table.snapshot();
        let found: Vec<u32> = snapshot
            .iter()
            .filter(|b| b.is_running())
            .map(|b| b.pid)
            .collect();
        self.model.set_brokers(snapshot);
        let running = found.len() - self.settle(&mut st, &found);
        Ok(ScanSummary {
            processes: pids.len(),
            running,
        })
    }

    /// A process called execve (kernel `sched_process_exec`; pass the thread group id, which
    /// the exec'ing thread becomes). Examines that process alone, always afresh; a tracked broker
    /// that exec'd into something else stops.
    ///
    /// Like every method here it takes the discovery lock and reads a few small /proc files:
    /// call it from a blocking context (the event reader's thread, or `spawn_blocking`).
    pub fn on_exec(&self, pid: u32) {
        let mut st = self.lock();
        let before = st.table.running_pid(pid).map(|b| b.id.clone());
        let now = st.visit(pid, true);
        if before.is_none() && now.is_none() {
            // Most execs on a node: not a broker before, not one now.
            return;
        }
        if let (Some(id), None) = (&before, now) {
            st.table.exited(pid);
            tracing::info!(broker = %id, pid, "broker process exec'd into something else");
        }
        let snapshot = st.table.snapshot();
        self.model.update_brokers(snapshot);
        if now.is_some() {
            self.settle(&mut st, &[pid]);
        }
    }

    /// The kernel reports the exit of registered broker pids only, and a pid is registered when
    /// the table above reaches the model. A broker that ended before that (a crash right after
    /// start) would stay `running` until the next rescan: so once the pids are registered, any
    /// of `pids` that is gone or a zombie is taken as exited here. An exit event that does come
    /// finds it already stopped. Returns how many it stopped.
    fn settle(&self, st: &mut State, pids: &[u32]) -> usize {
        let mut stopped = 0;
        for &pid in pids {
            let gone = match st.proc.stat(pid) {
                Ok(stat) => stat.state == 'Z' || stat.state == 'X',
                Err(ProcError::Io { source, .. }) => {
                    source.kind() == std::io::ErrorKind::NotFound
                        || source.raw_os_error() == Some(libc::ESRCH)
                }
                Err(_) => false,
            };
            if gone && let Some(id) = st.table.exited(pid) {
                tracing::info!(broker = %id, pid, "broker process exited before its exit could be reported");
                stopped += 1;
            }
        }
        if stopped > 0 {
            self.model.update_brokers(st.table.snapshot());
        }
        stopped
    }

    /// A process exited: call it when the whole thread group is gone (`sched_process_exit` of
    /// the last thread, or of the leader when `pid == tgid`). Only a lookup, no /proc read; a
    /// pid that is no broker is ignored.
    pub fn on_exit(&self, pid: u32) {
        let mut st = self.lock();
        if let Some(id) = st.table.exited(pid) {
            tracing::info!(broker = %id, pid, "broker process exited");
            let snapshot = st.table.snapshot();
            self.model.update_brokers(snapshot);
        }
    }

    /// Replaces `discovery.cmdline_patterns` (live config). Call [`Discovery::scan_all`] after
    /// it: that scan examines every process again, so brokers the new patterns no longer match
    /// stop and newly matching ones appear.
    pub fn set_patterns(&self, patterns: &[String]) -> Result<(), DiscoveryError> {
        let compiled = Patterns::new(patterns)?;
        let mut st = self.lock();
        st.patterns = compiled;
        // Forget the command lines: the next scan re-reads every known broker.
        st.table.update_running(|b| b.cmdline_hash = 0);
        Ok(())
    }

    /// Replaces `discovery.listener_ports` (live config); brokers whose config could not be
    /// read take the new ports at once.
    pub fn set_listener_ports(&self, ports: &[u16]) {
        let mut st = self.lock();
        st.listener_ports = ports.to_vec();
        let fallback = listeners::from_ports(ports);
        st.table.update_running(|b| {
            if b.evidence.listeners_source == Some(ListenersSource::ConfiguredPorts) {
                b.listeners = fallback.clone();
            }
        });
        let snapshot = st.table.snapshot();
        self.model.update_brokers(snapshot);
    }

    /// The fallback until kernel exec/exit events drive discovery: a full rescan every
    /// `period`, off the async workers.
    pub fn spawn_fallback_rescan(self: Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let this = self.clone();
                match tokio::task::spawn_blocking(move || this.scan_all()).await {
                    Ok(Ok(summary)) => tracing::trace!(?summary, "rescan"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "rescan failed"),
                    Err(e) => tracing::warn!(error = %e, "rescan task failed"),
                }
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// Examines `pid` unless it is a broker process already known. Returns its process key
    /// when it is a running broker now.
    /// `force` re-examines a known broker process too (after an exec).
    fn visit(&mut self, pid: u32, force: bool) -> Option<(u32, u64)> {
        if pid == self.own_pid {
            return None;
        }
        if let Some(known) = self.table.running_pid(pid).filter(|_| !force) {
            let process = (known.pid, known.start_time_ticks);
            // Same pid and start time is the same process, but exec keeps both: a wrapper
            // (`ip netns exec`, `nsenter`, `taskset`) whose command line matched may have
            // become the broker since. An unchanged command line means nothing to re-read.
            if let Ok(stat) = self.proc.stat(pid)
                && stat.state != 'Z'
                && stat.start_ticks == process.1
                && self
                    .proc
                    .cmdline(pid)
                    .is_ok_and(|bytes| cmdline_hash(&bytes) == known.cmdline_hash)
            {
                return Some(process);
            }
        }
        match self.examine(pid) {
            Ok(Some(broker)) => {
                let process = (broker.pid, broker.start_time_ticks);
                let proc = self.proc.clone();
                match self.table.observe(broker, |(p, start)| {
                    proc.stat(p)
                        .is_ok_and(|s| s.start_ticks == start && s.state != 'Z')
                }) {
                    Observed::New { id } => tracing::info!(broker = %id, pid, "broker found"),
                    Observed::Restarted { id, restarts } => {
                        tracing::info!(broker = %id, pid, restarts, "broker restarted")
                    }
                    Observed::Known { .. } => {}
                    Observed::Full => {
                        tracing::warn!(pid, max = MAX_BROKERS, "broker table full; not tracked");
                        return None;
                    }
                }
                Some(process)
            }
            Ok(None) => None,
            Err(e) => {
                if !e.is_gone() {
                    tracing::debug!(pid, error = %e, "cannot examine process");
                }
                None
            }
        }
    }

    /// Reads one process. `Ok(None)`: not a broker. `Err`: it could not be identified (gone,
    /// or its basic /proc files unreadable); anything past that becomes evidence.
    fn examine(&self, pid: u32) -> Result<Option<Broker>, ProcError> {
        let bytes = self.proc.cmdline(pid)?;
        let cmdline = Cmdline::from_proc(&bytes);
        let Some(matched) = self.patterns.matches(&cmdline) else {
            return Ok(None);
        };
        if self.proc.tgid(pid)? != pid {
            return Ok(None);
        }
        let stat = self.proc.stat(pid)?;
        if stat.state == 'Z' {
            return Ok(None);
        }

        let mut evidence = Evidence {
            matched_pattern: matched.pattern,
            cmdline: cmdline.excerpt(),
            properties_path: matched
                .kafka
                .properties
                .as_deref()
                .map(|p| properties::excerpt(p, MAX_PATH_EVIDENCE)),
            ..Evidence::default()
        };
        for problem in &matched.kafka.problems {
            evidence.error(problem.clone());
        }

        let (mut props, read) = match &matched.kafka.properties {
            Some(path) => match self.read_properties(pid, path) {
                Ok(props) => (props, true),
                Err(e) => {
                    evidence.error(e.to_string());
                    (Properties::default(), false)
                }
            },
            None => (Properties::default(), false),
        };
        evidence.properties_read = read;
        evidence.overrides = properties::apply_overrides(&mut props, &matched.kafka.overrides)
            .iter()
            .map(|k| properties::excerpt(k, MAX_KEY_EVIDENCE))
            .collect();
        let mut settings = BrokerSettings::from_properties(&props);
        if !read {
            // Kafka's defaults describe a broker whose file we did read; without it, only
            // overrides and the configured fallback ports are known.
            settings
                .errors
                .retain(|e| e != "neither node.id nor broker.id is set");
            if props.get("listeners").is_none() {
                settings.listeners = listeners::from_ports(&self.listener_ports);
                settings.listeners_source = Some(ListenersSource::ConfiguredPorts);
            }
            if props.get("log.dirs").is_none() && props.get("log.dir").is_none() {
                settings.log_dirs.clear();
            }
        }
        for e in settings.errors {
            evidence.error(e);
        }
        evidence.listeners_source = settings.listeners_source;

        let pod = match self.proc.env_var(pid, "HOSTNAME") {
            Ok(pod) => pod
                .filter(|p| !p.is_empty())
                .map(|p| properties::excerpt(&p, 253)),
            Err(e) => {
                evidence.error(format!("pod name: {e}"));
                None
            }
        };
        let netns = self
            .proc
            .netns(pid)
            .map_err(|e| evidence.error(format!("network namespace: {e}")))
            .ok();
        let cgroup = self.cgroup(pid, &mut evidence);
        let log_dir_filesystems = settings
            .log_dirs
            .iter()
            .map(|dir| match self.proc.filesystem_in(pid, dir) {
                Ok(fs) => fs.name(),
                Err(e) => {
                    evidence.error(format!("filesystem of log dir {dir}: {e}"));
                    "unknown".into()
                }
            })
            .collect();

        let (id, source) = match (settings.id, &pod) {
            (Some((id, "node.id")), _) => (id, IdSource::NodeId),
            (Some((id, _)), _) => (id, IdSource::BrokerId),
            (None, Some(pod)) => (pod.clone(), IdSource::Pod),
            (None, None) => (format!("pid-{pid}"), IdSource::Pid),
        };
        evidence.id_source = Some(source);

        Ok(Some(Broker {
            id,
            state: BrokerState::Running,
            pid,
            pod,
            netns,
            cgroup,
            start_time_ticks: stat.start_ticks,
            started_at: self
                .boot_time
                .map(|boot| boot + stat.start_ticks / self.clock_ticks),
            restarts: 0,
            cmdline_hash: cmdline_hash(&bytes),
            process_roles: settings.process_roles,
            listeners: settings.listeners,
            log_dirs: settings.log_dirs,
            log_dir_filesystems,
            evidence,
        }))
    }

    fn read_properties(&self, pid: u32, path: &str) -> Result<Properties, PropertiesFileError> {
        let bytes = self
            .proc
            .read_file_in(pid, path, properties::MAX_PROPERTIES_BYTES)
            .map_err(|source| PropertiesFileError::Read {
                path: path.into(),
                source,
            })?;
        // Java reads .properties as ISO-8859-1; every key discovery uses is ASCII, so UTF-8
        // with replacement loses nothing it needs.
        Properties::parse(&String::from_utf8_lossy(&bytes)).map_err(|source| {
            PropertiesFileError::Parse {
                path: path.into(),
                source,
            }
        })
    }

    fn cgroup(&self, pid: u32, evidence: &mut Evidence) -> Cgroup {
        let path = match self.proc.cgroup2_path(pid) {
            Ok(path) => path,
            Err(e) => {
                evidence.error(format!("cgroup: {e}"));
                return Cgroup::default();
            }
        };
        let id = match &self.cgroup2 {
            Some(mount) => proc::cgroup_id(mount, &path)
                .map_err(|e| evidence.error(format!("cgroup id: {e}")))
                .ok(),
            None => None,
        };
        Cgroup {
            path: Some(properties::excerpt(&path, MAX_PATH_EVIDENCE)),
            id,
        }
    }
}

fn cmdline_hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests;
