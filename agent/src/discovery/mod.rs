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

pub(crate) mod cmdline;
pub mod listeners;
pub mod properties;
mod table;

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

pub use cmdline::PatternError;
pub use table::MAX_BROKERS;

use self::{
    cmdline::{Cmdline, Patterns},
    properties::{BrokerSettings, Properties},
    table::{BrokerTable, Observed},
};
use crate::{
    broker::{Broker, Cgroup, Evidence, IdSource, ListenersSource, ProcessStatus, excerpt},
    files::{self, ProcessRoot, WorkError, Workers},
    locks::Recover as _,
    model::Model,
    proc::{self, ProcError, ProcFs},
};

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
    #[error("properties file {source}")]
    Read {
        #[source]
        source: files::ConfinedError,
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

/// What examining a process needs, swapped whole by live config changes: examinations read it
/// without holding the table's lock.
#[derive(Clone)]
struct Reader {
    proc: ProcFs,
    patterns: Patterns,
    listener_ports: Vec<u16>,
    cgroup2: Option<PathBuf>,
    own_pid: u32,
    boot_time: Option<u64>,
    clock_ticks: u64,
    /// The pool a broker's own files are read on, each read bounded by [`FILE_DEADLINE`].
    files: Workers,
}

/// The broker table and the examinations in flight. Held for table updates only: never while a
/// file of a broker is read.
struct Table {
    table: BrokerTable,
    /// Pids being examined after an exec.
    examining: HashSet<u32>,
    /// Pids that exec'd again while examined: examined once more when that ends.
    again: HashSet<u32>,
}

/// A broker's own files (its properties, its log dirs' filesystems) are given this long; then
/// discovery goes on without them and marks the broker [`Evidence::files_stalled`].
pub const FILE_DEADLINE: Duration = Duration::from_secs(2);
/// Examinations after exec events run at once on at most this many threads (each waits at most
/// [`FILE_DEADLINE`] for the broker's files); beyond it the next rescan finds the process.
const MAX_EXAMINERS: usize = 16;

/// The broker finder. Cheap to share (`Arc`); every method takes `&self`.
pub struct Discovery {
    model: Arc<Model>,
    reader: RwLock<Arc<Reader>>,
    table: Mutex<Table>,
    /// Examinations after exec events, so the event reader never waits for one.
    examiners: Workers,
    next_job: AtomicU64,
}

impl Discovery {
    /// Compiles the patterns; reads nothing yet.
    pub fn new(settings: Settings, model: Arc<Model>) -> Result<Self, DiscoveryError> {
        Self::with_proc(
            settings,
            model,
            ProcFs::default(),
            files::workers::files().clone(),
        )
    }

    fn with_proc(
        settings: Settings,
        model: Arc<Model>,
        proc: ProcFs,
        files: Workers,
    ) -> Result<Self, DiscoveryError> {
        let patterns = Patterns::new(&settings.cmdline_patterns)?;
        let boot_time = proc::boot_time(&proc);
        let mut table = BrokerTable::default();
        table.remember(model.remembered_brokers());
        Ok(Self {
            model,
            reader: RwLock::new(Arc::new(Reader {
                proc,
                patterns,
                listener_ports: settings.listener_ports,
                cgroup2: settings.cgroup2,
                own_pid: std::process::id(),
                boot_time,
                clock_ticks: proc::clock_ticks(),
                files,
            })),
            table: Mutex::new(Table {
                table,
                examining: HashSet::new(),
                again: HashSet::new(),
            }),
            examiners: Workers::new("discovery", MAX_EXAMINERS),
            next_job: AtomicU64::new(0),
        })
    }

    /// Looks at every process: new brokers are examined, known ones only have their start time
    /// checked, and brokers whose process is gone stop. Publishes the table to the model (the
    /// first successful scan makes discovery count as run for `/ready`).
    ///
    /// Takes as long as the examinations (each broker's files at most [`FILE_DEADLINE`], once:
    /// a broker whose earlier read still hangs is not waited for again); the table's lock is
    /// held only to record what they found.
    pub fn scan_all(&self) -> Result<ScanSummary, DiscoveryError> {
        let reader = self.reader();
        let pids = match reader.proc.pids() {
            Ok(pids) => pids,
            Err(source) => {
                let e = DiscoveryError::ListProcesses { source };
                self.model.set_discovery_error(e.to_string());
                return Err(e);
            }
        };
        let mut seen = HashSet::new();
        for &pid in &pids {
            if let Some(process) = self.visit(&reader, pid, false) {
                seen.insert(process);
            }
        }
        let mut t = self.lock();
        for id in t.table.stop_unseen(&seen) {
            tracing::info!(broker = %id, "broker process gone");
        }
        let snapshot = t.table.snapshot();
        let found: Vec<u32> = snapshot
            .iter()
            .filter(|b| b.is_running())
            .map(|b| b.pid)
            .collect();
        self.model.set_brokers(snapshot);
        let running = found.len() - self.settle(&reader, &mut t, &found);
        Ok(ScanSummary {
            processes: pids.len(),
            running,
        })
    }

    /// A process called execve (kernel `sched_process_exec`; pass the thread group id, which
    /// the exec'ing thread becomes). Returns at once: a process that is (or was) a broker is
    /// examined afresh on an examiner thread, so one broker whose files hang never delays
    /// another's discovery. The receiver, when there is one, says when that examination ended.
    ///
    /// Reads the process's command line here (most execs on a node are no broker and end
    /// there): call it from a blocking context (the event reader's thread, or `spawn_blocking`).
    pub fn on_exec(self: &Arc<Self>, pid: u32) -> Option<std::sync::mpsc::Receiver<()>> {
        {
            let mut t = self.lock();
            if t.examining.contains(&pid) {
                t.again.insert(pid);
                return None;
            }
            if t.table.running_pid(pid).is_none() {
                drop(t);
                let reader = self.reader();
                let matches = reader.proc.cmdline(pid).is_ok_and(|bytes| {
                    reader
                        .patterns
                        .matches(&Cmdline::from_proc(&bytes))
                        .is_some()
                });
                if !matches || pid == reader.own_pid {
                    return None;
                }
                t = self.lock();
            }
            if !t.examining.insert(pid) {
                t.again.insert(pid);
                return None;
            }
        }
        let this = self.clone();
        let job = self.next_job.fetch_add(1, Ordering::Relaxed);
        let spawned = self.examiners.spawn(
            job,
            format!("examining pid {pid} after its exec"),
            FILE_DEADLINE * 2,
            move || this.examine_exec(pid),
        );
        match spawned {
            Ok(done) => Some(done),
            Err(e) => {
                self.lock().examining.remove(&pid);
                tracing::warn!(pid, error = %e, "cannot examine an exec'd process now; the next rescan will");
                None
            }
        }
    }

    /// The examination behind [`Discovery::on_exec`], repeated while the process exec'd again
    /// meanwhile.
    fn examine_exec(&self, pid: u32) {
        loop {
            let reader = self.reader();
            let before = self.lock().table.running_pid(pid).map(|b| b.id.clone());
            let now = self.visit(&reader, pid, true);
            let mut t = self.lock();
            if let (Some(id), None) = (&before, now) {
                t.table.exited(pid);
                tracing::info!(broker = %id, pid, "broker process exec'd into something else");
            }
            if before.is_some() || now.is_some() {
                self.model.update_brokers(t.table.snapshot());
                if now.is_some() {
                    self.settle(&reader, &mut t, &[pid]);
                }
            }
            if !t.again.remove(&pid) {
                t.examining.remove(&pid);
                return;
            }
        }
    }

    /// The kernel reports the exit of registered broker pids only, and a pid is registered when
    /// the table above reaches the model. A broker that ended before that (a crash right after
    /// start) would stay `running` until the next rescan: so once the pids are registered, any
    /// of `pids` that is gone or a zombie is taken as exited here. An exit event that does come
    /// finds it already stopped. Returns how many it stopped.
    fn settle(&self, reader: &Reader, t: &mut Table, pids: &[u32]) -> usize {
        let mut stopped = 0;
        for &pid in pids {
            let gone = match reader.proc.stat(pid) {
                Ok(stat) => stat.state == 'Z' || stat.state == 'X',
                Err(ProcError::Io { source, .. }) => {
                    source.kind() == std::io::ErrorKind::NotFound
                        || source.raw_os_error() == Some(libc::ESRCH)
                }
                Err(_) => false,
            };
            if gone && let Some(id) = t.table.exited(pid) {
                tracing::info!(broker = %id, pid, "broker process exited before its exit could be reported");
                stopped += 1;
            }
        }
        if stopped > 0 {
            self.model.update_brokers(t.table.snapshot());
        }
        stopped
    }

    /// A process exited: call it when the whole thread group is gone (`sched_process_exit` of
    /// the last thread, or of the leader when `pid == tgid`). Only a lookup, no /proc read; a
    /// pid that is no broker is ignored.
    pub fn on_exit(&self, pid: u32) {
        let mut t = self.lock();
        if let Some(id) = t.table.exited(pid) {
            tracing::info!(broker = %id, pid, "broker process exited");
            let snapshot = t.table.snapshot();
            self.model.update_brokers(snapshot);
        }
    }

    /// Replaces `discovery.cmdline_patterns` (live config). Call [`Discovery::scan_all`] after
    /// it: that scan examines every process again, so brokers the new patterns no longer match
    /// stop and newly matching ones appear.
    pub fn set_patterns(&self, patterns: &[String]) -> Result<(), DiscoveryError> {
        let compiled = Patterns::new(patterns)?;
        self.swap_reader(|r| r.patterns = compiled);
        // Forget the command lines: the next scan re-reads every known broker.
        self.lock().table.update_running(|b| b.cmdline_hash = 0);
        Ok(())
    }

    /// Replaces `discovery.listener_ports` (live config); brokers whose config could not be
    /// read take the new ports at once.
    pub fn set_listener_ports(&self, ports: &[u16]) {
        self.swap_reader(|r| r.listener_ports = ports.to_vec());
        let fallback = listeners::from_ports(ports);
        let mut t = self.lock();
        t.table.update_running(|b| {
            if b.evidence.listeners_source == Some(ListenersSource::ConfiguredPorts) {
                b.listeners = fallback.clone();
            }
        });
        let snapshot = t.table.snapshot();
        self.model.update_brokers(snapshot);
    }

    /// The fallback until kernel exec/exit events drive discovery: a full rescan every
    /// `period`, off the async workers.
    pub fn spawn_fallback_rescan(self: Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        crate::tasks::spawn("discovery-rescan", async move {
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

    /// Examines `pid` unless it is a broker process already known (and read in full). Returns
    /// its process key when it is a running broker now. `force` re-examines a known broker
    /// process too (after an exec). The table's lock is taken only to look and to record.
    fn visit(&self, reader: &Reader, pid: u32, force: bool) -> Option<(u32, u64)> {
        if pid == reader.own_pid {
            return None;
        }
        let known = self.lock().table.running_pid(pid).map(|b| {
            (
                (b.pid, b.start_time_ticks),
                b.cmdline_hash,
                b.evidence.files_stalled,
            )
        });
        if let Some((process, hash, stalled)) = known.filter(|_| !force) {
            // Same pid and start time is the same process, but exec keeps both: a wrapper
            // (`ip netns exec`, `nsenter`, `taskset`) whose command line matched may have
            // become the broker since. An unchanged command line means nothing to re-read,
            // unless its files could not be read last time.
            if !stalled
                && let Ok(stat) = reader.proc.stat(pid)
                && stat.state != 'Z'
                && stat.start_ticks == process.1
                && reader
                    .proc
                    .cmdline(pid)
                    .is_ok_and(|bytes| cmdline_hash(&bytes) == hash)
            {
                return Some(process);
            }
        }
        match reader.examine(pid) {
            Ok(Some(broker)) => {
                let process = (broker.pid, broker.start_time_ticks);
                let mut t = self.lock();
                match t.table.observe(broker, |(p, start)| {
                    reader
                        .proc
                        .stat(p)
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

    fn reader(&self) -> Arc<Reader> {
        self.reader.read().recover().clone()
    }

    fn swap_reader(&self, change: impl FnOnce(&mut Reader)) {
        let mut guard = self.reader.write().recover();
        let mut next = Reader::clone(&guard);
        change(&mut next);
        *guard = Arc::new(next);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().recover()
    }
}

/// What a broker's own files said: read on a file worker, inside the process's root.
struct FileFacts {
    read: bool,
    overrides: Vec<String>,
    settings: BrokerSettings,
    log_dir_filesystems: Vec<String>,
    errors: Vec<String>,
}

impl FileFacts {
    /// Reads the properties file (when named and `root` is there), applies the overrides and
    /// tells the filesystem of each log dir. Without `root` (it could not be opened, or the
    /// read did not finish in time), the overrides and configured ports alone.
    fn gather(
        root: Option<&ProcessRoot>,
        kafka: &cmdline::KafkaArgs,
        listener_ports: &[u16],
    ) -> Self {
        let mut errors = Vec::new();
        let (mut props, read) = match (&kafka.properties, root) {
            (Some(path), Some(root)) => match read_properties(root, path) {
                Ok(props) => (props, true),
                Err(e) => {
                    errors.push(e.to_string());
                    (Properties::default(), false)
                }
            },
            _ => (Properties::default(), false),
        };
        let overrides = properties::apply_overrides(&mut props, &kafka.overrides)
            .iter()
            .map(|k| excerpt(k, MAX_KEY_EVIDENCE))
            .collect();
        let mut settings = BrokerSettings::from_properties(&props);
        if !read {
            // Kafka's defaults describe a broker whose file we did read; without it, only
            // overrides and the configured fallback ports are known.
            settings
                .errors
                .retain(|e| e != "neither node.id nor broker.id is set");
            if props.get("listeners").is_none() {
                settings.listeners = listeners::from_ports(listener_ports);
                settings.listeners_source = Some(ListenersSource::ConfiguredPorts);
            }
            if props.get("log.dirs").is_none() && props.get("log.dir").is_none() {
                settings.log_dirs.clear();
            }
        }
        let log_dir_filesystems = settings
            .log_dirs
            .iter()
            .map(|dir| match root.map(|r| r.filesystem(dir)) {
                Some(Ok(magic)) => proc::Filesystem(magic).name(),
                Some(Err(e)) => {
                    errors.push(format!("filesystem of log dir {e}"));
                    "unknown".into()
                }
                None => "unknown".into(),
            })
            .collect();
        FileFacts {
            read,
            overrides,
            settings,
            log_dir_filesystems,
            errors,
        }
    }
}

/// A broker's id and where it came from: `node.id` or `broker.id`, else the pod's name, else
/// the pid.
fn broker_id(
    configured: Option<(String, &str)>,
    pod: Option<&str>,
    pid: u32,
) -> (String, IdSource) {
    match (configured, pod) {
        (Some((id, "node.id")), _) => (id, IdSource::NodeId),
        (Some((id, _)), _) => (id, IdSource::BrokerId),
        (None, Some(pod)) => (pod.to_string(), IdSource::Pod),
        (None, None) => (format!("pid-{pid}"), IdSource::Pid),
    }
}

fn read_properties(root: &ProcessRoot, path: &str) -> Result<Properties, PropertiesFileError> {
    let bytes = root
        .read_file(path, properties::MAX_PROPERTIES_BYTES)
        .map_err(|source| PropertiesFileError::Read { source })?;
    // Java reads .properties as ISO-8859-1; every key discovery uses is ASCII, so UTF-8
    // with replacement loses nothing it needs.
    Properties::parse(&String::from_utf8_lossy(&bytes)).map_err(|source| {
        PropertiesFileError::Parse {
            path: excerpt(path, MAX_PATH_EVIDENCE),
            source,
        }
    })
}

impl Reader {
    /// Reads one process. `Ok(None)`: not a broker. `Err`: it could not be identified (gone,
    /// or its basic /proc files unreadable); anything past that becomes evidence. Its own files
    /// are read on a file worker, waited for at most [`FILE_DEADLINE`].
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
                .map(|p| excerpt(p, MAX_PATH_EVIDENCE)),
            ..Evidence::default()
        };
        for problem in &matched.kafka.problems {
            evidence.error(problem.clone());
        }

        let facts = self.broker_files(pid, stat.start_ticks, &matched.kafka, &mut evidence);
        evidence.properties_read = facts.read;
        evidence.overrides = facts.overrides;
        for e in facts.errors {
            evidence.error(e);
        }
        let settings = facts.settings;
        for e in settings.errors {
            evidence.error(e);
        }
        evidence.listeners_source = settings.listeners_source;

        let pod = self.pod_name(pid, &mut evidence);
        let netns = self
            .proc
            .netns(pid)
            .map_err(|e| evidence.error(format!("network namespace: {e}")))
            .ok();
        let cgroup = self.cgroup(pid, &mut evidence);

        let (id, source) = broker_id(settings.id, pod.as_deref(), pid);
        evidence.id_source = Some(source);

        Ok(Some(Broker {
            id,
            state: ProcessStatus::Running,
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
            log_dir_filesystems: facts.log_dir_filesystems,
            evidence,
        }))
    }

    /// The pod's name: the process's `HOSTNAME`, if set (unreadable: evidence).
    fn pod_name(&self, pid: u32, evidence: &mut Evidence) -> Option<String> {
        match self.proc.env_var(pid, "HOSTNAME") {
            Ok(pod) => pod.filter(|p| !p.is_empty()).map(|p| excerpt(&p, 253)),
            Err(e) => {
                evidence.error(format!("pod name: {e}"));
                None
            }
        }
    }

    /// [`FileFacts::gather`] on a file worker, inside the process's root; what the command line
    /// alone says when that cannot be had in time (marked [`Evidence::files_stalled`]).
    fn broker_files(
        &self,
        pid: u32,
        start_ticks: u64,
        kafka: &cmdline::KafkaArgs,
        evidence: &mut Evidence,
    ) -> FileFacts {
        if kafka.properties.is_none()
            && kafka
                .overrides
                .iter()
                .all(|(k, _)| k != "log.dirs" && k != "log.dir")
        {
            return FileFacts::gather(None, kafka, &self.listener_ports);
        }
        let dir = self.proc.pid_dir(pid);
        let (args, ports) = (kafka.clone(), self.listener_ports.clone());
        let job = self.files.run(
            u64::from(pid),
            format!("reading the files of broker process {pid}"),
            FILE_DEADLINE,
            move || match ProcessRoot::open(&dir, pid, Some(start_ticks)) {
                Ok(root) => FileFacts::gather(Some(&root), &args, &ports),
                Err(e) => {
                    let mut facts = FileFacts::gather(None, &args, &ports);
                    facts.errors.insert(0, format!("files not read: {e}"));
                    facts
                }
            },
        );
        job.unwrap_or_else(|e| {
            evidence.files_stalled = matches!(e, WorkError::Hung { .. } | WorkError::Busy { .. });
            let mut facts = FileFacts::gather(None, kafka, &self.listener_ports);
            facts
                .errors
                .insert(0, format!("files not read: reading them {e}"));
            facts
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
            path: Some(excerpt(&path, MAX_PATH_EVIDENCE)),
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
