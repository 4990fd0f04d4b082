//! The broker domain: the record discovery produces and everyone else reads (what `/v1/brokers`
//! shows and metrics are labelled by), its listeners, what a restarted agent remembers of it,
//! and the `(network namespace, local port) -> (broker, listener)` attribution over it.
//!
//! Pure data and pure functions: no /proc, no locks, no other module of the agent. Discovery
//! (`discovery/`) fills it in; the model, the state tracker, renderers and routes read it.

use std::collections::HashMap;

use serde::Serialize;

/// One listener of a broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub name: String,
    /// Empty means every interface (Kafka's `PLAINTEXT://:9092`); IPv6 without brackets.
    pub host: String,
    pub port: u16,
    /// From `listener.security.protocol.map`, or the name itself when it is a protocol name.
    pub security_protocol: Option<String>,
}

/// Where a listener's port came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenersSource {
    /// The broker's `listeners` property.
    Properties,
    /// No `listeners` property: Kafka's default `PLAINTEXT://:9092`.
    KafkaDefault,
    /// The config could not be read: `discovery.listener_ports`.
    ConfiguredPorts,
}

/// What a restarted agent needs of a broker to keep its identity: kept with the kernel maps
/// (see `probes::records`) and read back at start.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Remembered {
    pub id: String,
    pub pid: u32,
    pub start_time_ticks: u64,
    pub restarts: u64,
    pub running: bool,
}

impl Remembered {
    pub fn of(broker: &Broker) -> Self {
        Self {
            id: broker.id.clone(),
            pid: broker.pid,
            start_time_ticks: broker.start_time_ticks,
            restarts: broker.restarts,
            running: broker.is_running(),
        }
    }
}

/// At most `max` bytes of `s`, cut on a char boundary, with `…` when cut.
pub fn excerpt(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Whether the broker's process exists (`state` in `/v1/brokers`). Not the broker's state in
/// Strimzi's sense, which `crate::strimzi` derives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessStatus {
    /// The process exists.
    Running,
    /// The process exited; the record is kept so a restart keeps the broker's identity.
    NotRunning,
}

/// Where a broker's id came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdSource {
    /// `node.id` (KRaft).
    NodeId,
    /// `broker.id` (ZooKeeper mode).
    BrokerId,
    /// The config gave none: the pod name (`HOSTNAME`), stable across container restarts.
    Pod,
    /// Nothing better: `pid-<pid>`, which a restart does not keep.
    Pid,
}

/// The broker's cgroup v2.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Cgroup {
    /// As in `/proc/<pid>/cgroup` (`0::<path>`).
    pub path: Option<String>,
    /// Inode of the cgroup directory: what `bpf_get_current_cgroup_id` returns.
    pub id: Option<u64>,
}

/// How discovery found the broker and what it could read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// The `discovery.cmdline_patterns` entry that matched.
    pub matched_pattern: String,
    /// The command line, secrets redacted, cut to 512 bytes.
    pub cmdline: String,
    pub id_source: Option<IdSource>,
    /// The properties file as named on the command line.
    pub properties_path: Option<String>,
    pub properties_read: bool,
    /// Keys set by `--override key=value` (values are not shown: they may be secrets).
    pub overrides: Vec<String>,
    pub listeners_source: Option<ListenersSource>,
    /// What could not be read or made sense of; none of it stopped discovery.
    pub errors: Vec<String>,
    /// Reading the broker's own files (properties, log dirs) did not finish in time: its
    /// filesystem may hang. It is read again once that read ends.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub files_stalled: bool,
}

/// Most errors kept per broker, and the longest one.
pub const MAX_EVIDENCE_ERRORS: usize = 32;
const MAX_ERROR_LEN: usize = 300;

impl Evidence {
    pub fn error(&mut self, message: impl Into<String>) {
        if self.errors.len() < MAX_EVIDENCE_ERRORS {
            self.errors.push(excerpt(&message.into(), MAX_ERROR_LEN));
        }
    }
}

/// One broker on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Broker {
    /// `node.id`/`broker.id`, else the pod name, else `pid-<pid>`: the `broker` label.
    pub id: String,
    pub state: ProcessStatus,
    /// The current process, or the last one when not running.
    pub pid: u32,
    /// `HOSTNAME` from the process's environment (the pod name under Kubernetes).
    pub pod: Option<String>,
    /// Inode of the network namespace (as in `/proc/<pid>/ns/net`).
    pub netns: Option<u32>,
    pub cgroup: Cgroup,
    /// Start time in clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_time_ticks: u64,
    /// Start time, seconds since the epoch.
    pub started_at: Option<u64>,
    /// Times a new process took over this id.
    pub restarts: u64,
    /// Hash of the whole command line: exec keeps pid and start time, so this tells a rescan
    /// that the process became something else and must be read again. Not shown.
    #[serde(skip)]
    pub cmdline_hash: u64,
    pub process_roles: Vec<String>,
    pub listeners: Vec<Listener>,
    pub log_dirs: Vec<String>,
    /// The filesystem of each of `log_dirs`, in order ("ext4", "xfs", ..., or its magic
    /// number; "unknown" when it could not be told): whether fsync is timed by the filesystem's
    /// own hooks or needs the syscall tracepoints.
    pub log_dir_filesystems: Vec<String>,
    pub evidence: Evidence,
}

impl Broker {
    pub fn is_running(&self) -> bool {
        self.state == ProcessStatus::Running
    }

    /// Every log dir is known and on a filesystem `covered` says the fsync hooks see, so
    /// they see all of this broker's log syncs.
    pub fn log_dirs_covered(&self, covered: impl Fn(&str) -> bool) -> bool {
        !self.log_dir_filesystems.is_empty() && self.log_dir_filesystems.iter().all(|f| covered(f))
    }
}

/// The broker and listener that own sockets on a (network namespace, port), among running
/// brokers: built once per snapshot, O(1) per lookup (one per kernel listener per scrape).
/// None when no broker listens there, or when two do (two brokers in one namespace on the same
/// port on different addresses): counters are then left unattributed rather than given to the
/// wrong broker.
#[derive(Clone, Debug, Default)]
pub struct ListenerIndex {
    owners: HashMap<(u32, u16), Option<(String, String)>>,
}

impl ListenerIndex {
    pub fn new(brokers: &[Broker]) -> Self {
        let mut owners: HashMap<(u32, u16), Option<(String, String)>> = HashMap::new();
        for b in brokers.iter().filter(|b| b.is_running()) {
            let Some(netns) = b.netns else { continue };
            for l in &b.listeners {
                owners
                    .entry((netns, l.port))
                    // A second owner makes the pair ambiguous.
                    .and_modify(|o| *o = None)
                    .or_insert_with(|| Some((b.id.clone(), l.name.clone())));
            }
        }
        Self { owners }
    }

    /// An index of the given (netns, port, broker, listener) owners.
    #[cfg(test)]
    pub fn from_owners(owners: Vec<(u32, u16, String, String)>) -> Self {
        Self {
            owners: owners
                .into_iter()
                .map(|(netns, port, b, l)| ((netns, port), Some((b, l))))
                .collect(),
        }
    }

    pub fn get(&self, netns: u32, port: u16) -> Option<(&str, &str)> {
        self.owners
            .get(&(netns, port))?
            .as_ref()
            .map(|(b, l)| (b.as_str(), l.as_str()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A running broker with listeners `(name, port)`.
    pub fn broker(id: &str, pid: u32, netns: u32, listeners: &[(&str, u16)]) -> Broker {
        Broker {
            id: id.into(),
            state: ProcessStatus::Running,
            pid,
            pod: None,
            netns: Some(netns),
            cgroup: Cgroup::default(),
            start_time_ticks: 1000 + u64::from(pid),
            started_at: None,
            restarts: 0,
            cmdline_hash: 0,
            process_roles: vec![],
            listeners: listeners
                .iter()
                .map(|&(name, port)| Listener {
                    name: name.into(),
                    host: String::new(),
                    port,
                    security_protocol: None,
                })
                .collect(),
            log_dirs: vec![],
            log_dir_filesystems: vec![],
            evidence: Evidence::default(),
        }
    }

    #[test]
    fn attribution_by_namespace_and_port() {
        let mut stopped = broker("9", 40, 100, &[("PLAINTEXT", 9092)]);
        stopped.state = ProcessStatus::NotRunning;
        let brokers = vec![
            broker("0", 10, 100, &[("PLAINTEXT", 9092), ("CONTROLLER", 9093)]),
            broker("1", 20, 200, &[("PLAINTEXT", 9092)]),
            broker("2", 30, 300, &[("EXTERNAL", 9094)]),
            stopped,
        ];
        let index = ListenerIndex::new(&brokers);
        for (netns, port, want) in [
            (100, 9092, Some(("0", "PLAINTEXT"))),
            (100, 9093, Some(("0", "CONTROLLER"))),
            (200, 9092, Some(("1", "PLAINTEXT"))),
            (300, 9094, Some(("2", "EXTERNAL"))),
            (300, 9092, None),
            (200, 9093, None),
            (999, 9092, None),
        ] {
            assert_eq!(index.get(netns, port), want, "{netns}/{port}");
        }
    }

    #[test]
    fn two_brokers_on_one_namespace_and_port_are_not_guessed() {
        let brokers = vec![
            broker("0", 10, 100, &[("A", 9092)]),
            broker("1", 20, 100, &[("B", 9092)]),
            broker("2", 30, 100, &[("C", 9093)]),
        ];
        let index = ListenerIndex::new(&brokers);
        assert_eq!(index.get(100, 9092), None);
        assert_eq!(index.get(100, 9093), Some(("2", "C")));
    }

    #[test]
    fn a_broker_without_namespace_owns_nothing() {
        let mut b = broker("0", 10, 100, &[("A", 9092)]);
        b.netns = None;
        assert_eq!(ListenerIndex::new(&[b]).get(100, 9092), None);
    }

    #[test]
    fn evidence_errors_are_bounded() {
        let mut e = Evidence::default();
        for i in 0..100 {
            e.error(format!("{i}{}", "x".repeat(1000)));
        }
        assert_eq!(e.errors.len(), MAX_EVIDENCE_ERRORS);
        assert!(e.errors.iter().all(|m| m.len() <= MAX_ERROR_LEN + 3));
    }
}
