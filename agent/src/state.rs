//! Kafka broker state in Strimzi's numbering, derived from the kernel and /proc (never from the
//! broker's own metrics): what `/v1/broker-state`, `/v1/ready`, `brokerscope_broker_state` and
//! the `broker_state` of `/v1/brokers` report.
//!
//! Owns the per-process facts the derivation needs (log segment inventory, opens seen, SIGTERM,
//! listening) and a bounded history of state changes per broker. It reads /proc, never a map:
//! kernel facts arrive as [`StateSignal`]s from `probes::state`.
//!
//! The heuristics, in order (first match wins), and their limits are in the README:
//! no process → NOT_RUNNING; SIGTERM delivered → SHUTTING_DOWN; segments under `log.dirs` being
//! opened → RECOVERY; every listener in LISTEN → RUNNING (latched); else STARTING.

use std::{
    collections::{HashMap, VecDeque},
    io::BufRead as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use brokerscope_common::state::AT_FDCWD;
use serde::Serialize;

use crate::{discovery::Broker, probes::state::StateSignal};

/// Kafka's broker states with Strimzi's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaState {
    NotRunning,
    Starting,
    Recovery,
    Running,
    /// Never derived: the kernel cannot tell a controlled shutdown is pending (listed for
    /// completeness of the numbering).
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "not observable from the kernel")
    )]
    PendingControlledShutdown,
    ShuttingDown,
    #[cfg_attr(not(test), expect(dead_code, reason = "every state here is derived"))]
    Unknown,
}

impl KafkaState {
    pub const fn number(self) -> u8 {
        match self {
            KafkaState::NotRunning => 0,
            KafkaState::Starting => 1,
            KafkaState::Recovery => 2,
            KafkaState::Running => 3,
            KafkaState::PendingControlledShutdown => 6,
            KafkaState::ShuttingDown => 7,
            KafkaState::Unknown => 127,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            KafkaState::NotRunning => "NOT_RUNNING",
            KafkaState::Starting => "STARTING",
            KafkaState::Recovery => "RECOVERY",
            KafkaState::Running => "RUNNING",
            KafkaState::PendingControlledShutdown => "PENDING_CONTROLLED_SHUTDOWN",
            KafkaState::ShuttingDown => "SHUTTING_DOWN",
            KafkaState::Unknown => "UNKNOWN",
        }
    }

    /// Strimzi's readiness: 3 ≤ state ≠ 127.
    pub const fn is_ready(self) -> bool {
        let n = self.number();
        n >= 3 && n != 127
    }
}

/// Recovery progress, summed over every log dir. Each value fits a Java int.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Recovery {
    pub remaining_logs_to_recover: i32,
    pub remaining_segments_to_recover: i32,
}

/// A broker's state at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateView {
    pub state: KafkaState,
    /// Present in RECOVERY only.
    pub recovery: Option<Recovery>,
}

impl Serialize for StateView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("StateView", 3)?;
        st.serialize_field("name", self.state.name())?;
        st.serialize_field("number", &self.state.number())?;
        if let Some(r) = &self.recovery {
            st.serialize_field("recovery", r)?;
        }
        st.end()
    }
}

/// One logged state change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StateChange {
    /// RFC 3339, UTC.
    pub at: String,
    pub pid: u32,
    pub from: Option<&'static str>,
    pub to: &'static str,
    pub number: u8,
}

/// State changes kept per broker (oldest dropped first).
pub const MAX_CHANGES: usize = 32;
/// Segments tracked by path per process; beyond it the rest are counted but cannot be seen
/// opened (recovery then ends by [`QUIET`]).
pub const MAX_SEGMENTS: usize = 200_000;
/// Directory entries read per log dir and per partition dir while taking the inventory.
const MAX_DIR_ENTRIES: usize = 200_000;
/// A listening broker that opened no tracked segment for this long is past recovery even if
/// the estimate says segments remain (estimate wrong, events lost, segments deleted).
pub const QUIET: Duration = Duration::from_secs(5);
/// Lines of `/proc/<pid>/net/tcp{,6}` read per check (a broker with more sockets than this is
/// checked on the first ones; listeners come first in the kernel's hash order only by chance).
const MAX_TCP_LINES: usize = 200_000;

/// Log segments found under a process's log dirs when the agent first saw it.
#[derive(Debug, Default)]
struct Inventory {
    /// Segment path as the broker sees it -> index of its log.
    segments: HashMap<String, usize>,
    /// Unopened segments per log.
    remaining_per_log: Vec<u32>,
    logs_remaining: u32,
    segments_remaining: u32,
    /// Log dirs as configured, without a trailing slash.
    log_dirs: Vec<String>,
}

impl Inventory {
    /// Partition directories (logs) holding at least one `*.log` file (segments), under every
    /// log dir, read through `root` (`/proc/<pid>/root`).
    fn take(root: &Path, log_dirs: &[String]) -> Self {
        let mut inv = Inventory {
            log_dirs: log_dirs
                .iter()
                .map(|d| {
                    let t = d.trim_end_matches('/');
                    if t.is_empty() { "/".into() } else { t.into() }
                })
                .collect(),
            ..Inventory::default()
        };
        for dir in inv.log_dirs.clone() {
            let Ok(entries) = std::fs::read_dir(root.join(dir.trim_start_matches('/'))) else {
                continue;
            };
            for part in entries.take(MAX_DIR_ENTRIES).flatten() {
                if !part.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let Ok(files) = std::fs::read_dir(part.path()) else {
                    continue;
                };
                let part_name = part.file_name().to_string_lossy().into_owned();
                let mut count = 0u32;
                for file in files.take(MAX_DIR_ENTRIES).flatten() {
                    let name = file.file_name().to_string_lossy().into_owned();
                    if !name.ends_with(".log") {
                        continue;
                    }
                    if inv.segments.len() < MAX_SEGMENTS {
                        let log = inv.remaining_per_log.len();
                        inv.segments
                            .insert(format!("{dir}/{part_name}/{name}"), log);
                    }
                    count += 1;
                }
                if count > 0 {
                    inv.remaining_per_log.push(count);
                    inv.logs_remaining += 1;
                    inv.segments_remaining += count;
                }
            }
        }
        inv
    }

    /// Marks a segment opened; whether it was one not opened before.
    fn opened(&mut self, path: &str) -> bool {
        let Some(log) = self.segments.remove(path) else {
            return false;
        };
        self.segments_remaining = self.segments_remaining.saturating_sub(1);
        if let Some(left) = self.remaining_per_log.get_mut(log) {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.logs_remaining = self.logs_remaining.saturating_sub(1);
            }
        }
        true
    }

    fn under_log_dirs(&self, path: &str) -> bool {
        self.log_dirs.iter().any(|d| {
            path.strip_prefix(d.as_str())
                .is_some_and(|r| r.starts_with('/'))
        })
    }

    fn recovery(&self) -> Recovery {
        let fit = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        Recovery {
            remaining_logs_to_recover: fit(self.logs_remaining),
            remaining_segments_to_recover: fit(self.segments_remaining),
        }
    }
}

/// What the tracker knows about one broker process.
#[derive(Debug)]
struct Process {
    pid: u32,
    start_time_ticks: u64,
    inventory: Inventory,
    /// A tracked segment was opened: recovery began.
    recovery_seen: bool,
    recovery_over: bool,
    last_open: Option<Instant>,
    sigterm: bool,
    /// Every listener was seen listening once: RUNNING until shutdown.
    running: bool,
    /// The last listening check and its answer (reading `/proc/<pid>/net/tcp` of a namespace
    /// with thousands of sockets takes tens of ms: checked at most every [`LISTEN_RECHECK`]).
    listen_checked: Option<(Instant, bool)>,
}

/// How long a listening check is reused.
pub const LISTEN_RECHECK: Duration = Duration::from_millis(250);

impl Process {
    /// Whether every listener listens. `read`: may read /proc (the tracker's own thread);
    /// otherwise (requests) the last answer is used, "not yet" when there is none.
    fn listening(&mut self, broker: &Broker, read: bool) -> bool {
        if wanted_ports(broker).is_empty() {
            return true;
        }
        match self.listen_checked {
            Some((at, answer)) if !read || at.elapsed() < LISTEN_RECHECK => answer,
            None if !read => false,
            _ => {
                let answer = listening(broker);
                self.listen_checked = Some((Instant::now(), answer));
                answer
            }
        }
    }
}

#[derive(Debug, Default)]
struct Tracked {
    process: Option<Process>,
    current: Option<KafkaState>,
    changes: VecDeque<StateChange>,
}

/// Per-broker state, fed by the broker table, kernel events and a periodic tick.
#[derive(Debug, Default)]
pub struct StateTracker {
    by_id: HashMap<String, Tracked>,
    /// Running pid -> broker id.
    by_pid: HashMap<u32, String>,
}

impl StateTracker {
    /// Follows the broker table: new processes get an inventory, gone ids are forgotten.
    pub fn sync(&mut self, brokers: &[Broker]) {
        self.by_id
            .retain(|id, _| brokers.iter().any(|b| &b.id == id));
        self.by_pid.clear();
        for b in brokers {
            let tracked = self.by_id.entry(b.id.clone()).or_default();
            if !b.is_running() {
                tracked.process = None;
                continue;
            }
            self.by_pid.insert(b.pid, b.id.clone());
            let same = tracked
                .process
                .as_ref()
                .is_some_and(|p| p.pid == b.pid && p.start_time_ticks == b.start_time_ticks);
            if !same {
                let root = PathBuf::from(format!("/proc/{}/root", b.pid));
                let inventory = Inventory::take(&root, &b.log_dirs);
                tracing::info!(
                    broker = %b.id,
                    pid = b.pid,
                    logs = inventory.logs_remaining,
                    segments = inventory.segments_remaining,
                    "broker state: new process, log segments counted"
                );
                tracked.process = Some(Process {
                    pid: b.pid,
                    start_time_ticks: b.start_time_ticks,
                    inventory,
                    recovery_seen: false,
                    recovery_over: false,
                    last_open: None,
                    sigterm: false,
                    running: false,
                    listen_checked: None,
                });
            }
        }
        for b in brokers {
            self.evaluate(b, false);
        }
    }

    /// Applies a kernel event. Returns the broker id it concerned.
    pub fn on_signal(&mut self, signal: &StateSignal) -> Option<String> {
        match signal {
            StateSignal::Open { tgid, dfd, path } => {
                let id = self.by_pid.get(tgid)?.clone();
                let process = self.by_id.get_mut(&id)?.process.as_mut()?;
                let path = absolute(*tgid, *dfd, path)?;
                if process.inventory.opened(&path) {
                    process.recovery_seen = true;
                    process.last_open = Some(Instant::now());
                } else if process.recovery_seen && process.inventory.under_log_dirs(&path) {
                    process.last_open = Some(Instant::now());
                }
                Some(id)
            }
            StateSignal::Sigterm { tgid } => {
                let id = self.by_pid.get(tgid)?.clone();
                self.by_id.get_mut(&id)?.process.as_mut()?.sigterm = true;
                Some(id)
            }
            StateSignal::Lost => {
                tracing::warn!("broker state events were lost; recovery estimates may stall");
                None
            }
        }
    }

    /// Derives the broker's state now, logging a change. `read`: listening sockets may be read
    /// from /proc (tens of ms in a namespace with many sockets): the tracker's thread passes
    /// true, requests false (they reuse its last answer).
    pub fn evaluate(&mut self, broker: &Broker, read: bool) -> StateView {
        let tracked = self.by_id.entry(broker.id.clone()).or_default();
        let view = match tracked.process.as_mut().filter(|_| broker.is_running()) {
            None => StateView {
                state: KafkaState::NotRunning,
                recovery: None,
            },
            Some(p) => derive(p, broker, read),
        };
        if tracked.current != Some(view.state) {
            let change = StateChange {
                at: now_rfc3339(),
                pid: broker.pid,
                from: tracked.current.map(KafkaState::name),
                to: view.state.name(),
                number: view.state.number(),
            };
            tracing::info!(
                broker = %broker.id,
                pid = broker.pid,
                from = change.from.unwrap_or("-"),
                to = change.to,
                "broker state changed"
            );
            if tracked.changes.len() == MAX_CHANGES {
                tracked.changes.pop_front();
            }
            tracked.changes.push_back(change);
            tracked.current = Some(view.state);
        }
        view
    }

    /// Whether this process of broker `id` is past starting: seen RUNNING (which latches) or
    /// told to stop. Until then its file opens matter; a process the tracker has not followed
    /// yet is not settled.
    pub fn settled(&self, id: &str, pid: u32, start_time_ticks: u64) -> bool {
        self.by_id
            .get(id)
            .and_then(|t| t.process.as_ref())
            .is_some_and(|p| {
                p.pid == pid && p.start_time_ticks == start_time_ticks && (p.running || p.sigterm)
            })
    }

    /// The logged changes of a broker, oldest first.
    pub fn changes(&self, id: &str) -> Vec<StateChange> {
        self.by_id
            .get(id)
            .map(|t| t.changes.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The last derived state (without deriving again).
    #[cfg(test)]
    pub fn current(&self, id: &str) -> Option<KafkaState> {
        self.by_id.get(id).and_then(|t| t.current)
    }
}

fn derive(p: &mut Process, broker: &Broker, read: bool) -> StateView {
    let plain = |state| StateView {
        state,
        recovery: None,
    };
    if p.sigterm {
        return plain(KafkaState::ShuttingDown);
    }
    if p.running {
        return plain(KafkaState::Running);
    }
    if p.recovery_seen && !p.recovery_over {
        let quiet = p.last_open.is_none_or(|t| t.elapsed() >= QUIET);
        if p.inventory.segments_remaining == 0 || (quiet && p.listening(broker, read)) {
            p.recovery_over = true;
        } else {
            return StateView {
                state: KafkaState::Recovery,
                recovery: Some(p.inventory.recovery()),
            };
        }
    }
    if p.listening(broker, read) {
        p.running = true;
        return plain(KafkaState::Running);
    }
    if p.recovery_seen {
        // Recovered but not serving yet: Kafka stays in RECOVERY until it starts serving.
        return StateView {
            state: KafkaState::Recovery,
            recovery: Some(p.inventory.recovery()),
        };
    }
    plain(KafkaState::Starting)
}

/// Whether every configured listener port is in LISTEN in the broker's network namespace
/// (`/proc/<pid>/net/tcp{,6}` show the namespace of that process). A broker with no known
/// listener (config unreadable, no `discovery.listener_ports`) counts as listening.
fn listening(broker: &Broker) -> bool {
    let mut wanted = wanted_ports(broker);
    if wanted.is_empty() {
        return true;
    }
    for file in ["tcp", "tcp6"] {
        let path = format!("/proc/{}/net/{file}", broker.pid);
        let Ok(f) = std::fs::File::open(&path) else {
            continue;
        };
        for line in std::io::BufReader::new(f)
            .lines()
            .skip(1)
            .take(MAX_TCP_LINES)
            .map_while(Result::ok)
        {
            if let Some(port) = listen_port(&line) {
                wanted.retain(|&w| w != port);
                if wanted.is_empty() {
                    return true;
                }
            }
        }
    }
    false
}

/// The configured listener ports (0, an ephemeral port, cannot be checked).
fn wanted_ports(broker: &Broker) -> Vec<u16> {
    let mut wanted: Vec<u16> = broker
        .listeners
        .iter()
        .map(|l| l.port)
        .filter(|&p| p != 0)
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    wanted
}

/// The local port of a `/proc/net/tcp{,6}` line in state LISTEN (`0A`).
fn listen_port(line: &str) -> Option<u16> {
    let mut fields = line.split_whitespace();
    let local = fields.nth(1)?;
    let state = fields.nth(1)?;
    if state != "0A" {
        return None;
    }
    let (_, port) = local.rsplit_once(':')?;
    u16::from_str_radix(port, 16).ok()
}

/// The opened path as the broker sees it: relative paths joined to the working directory or
/// the `dfd` directory, read from /proc while the process lives.
fn absolute(pid: u32, dfd: i32, path: &str) -> Option<String> {
    if path.starts_with('/') {
        return Some(path.to_string());
    }
    let base = if dfd == AT_FDCWD {
        std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?
    } else {
        std::fs::read_link(format!("/proc/{pid}/fd/{dfd}")).ok()?
    };
    let joined = base.join(path.trim_start_matches("./"));
    Some(joined.to_string_lossy().into_owned())
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::broker::tests::broker;

    #[test]
    fn numbers_names_and_readiness_follow_strimzi() {
        let all = [
            (KafkaState::NotRunning, 0, false),
            (KafkaState::Starting, 1, false),
            (KafkaState::Recovery, 2, false),
            (KafkaState::Running, 3, true),
            (KafkaState::PendingControlledShutdown, 6, true),
            (KafkaState::ShuttingDown, 7, true),
            (KafkaState::Unknown, 127, false),
        ];
        for (s, n, ready) in all {
            assert_eq!((s.number(), s.is_ready()), (n, ready), "{}", s.name());
        }
    }

    #[test]
    fn listen_lines() {
        let l = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0";
        assert_eq!(listen_port(l), Some(0x1F90));
        let e = "   1: 0100007F:1F90 0100007F:C000 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0";
        assert_eq!(listen_port(e), None);
        assert_eq!(listen_port("garbage"), None);
    }

    #[test]
    fn inventory_counts_logs_and_segments_over_every_dir_and_opens_decrease_them() {
        let root = tempfile::tempdir().unwrap();
        let mk = |p: &str| {
            let p = root.path().join(p.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        };
        mk("/d1/t-0/0.log");
        mk("/d1/t-0/10.log");
        mk("/d1/t-0/0.index");
        mk("/d1/t-1/0.log");
        mk("/d1/meta.properties");
        mk("/d1/empty-0/x.index");
        mk("/d2/u-0/0.log");
        let dirs = vec![
            "/d1/".to_string(),
            "/d2".to_string(),
            "/missing".to_string(),
        ];
        let mut inv = Inventory::take(root.path(), &dirs);
        assert_eq!(inv.recovery(), rec(3, 4));
        assert!(inv.opened("/d1/t-0/0.log"));
        assert!(!inv.opened("/d1/t-0/0.log"), "counted once");
        assert!(!inv.opened("/d1/t-0/0.index"));
        assert_eq!(inv.recovery(), rec(3, 3));
        assert!(inv.opened("/d1/t-0/10.log"));
        assert_eq!(inv.recovery(), rec(2, 2));
        assert!(inv.opened("/d2/u-0/0.log"));
        assert!(inv.opened("/d1/t-1/0.log"));
        assert_eq!(inv.recovery(), rec(0, 0));
        assert!(inv.under_log_dirs("/d1/new-0/5.log"));
        assert!(!inv.under_log_dirs("/d10/x"));
    }

    fn rec(logs: i32, segments: i32) -> Recovery {
        Recovery {
            remaining_logs_to_recover: logs,
            remaining_segments_to_recover: segments,
        }
    }

    #[test]
    fn a_stopped_broker_is_not_running_and_changes_are_bounded() {
        let mut t = StateTracker::default();
        let mut b = broker("1", u32::MAX - 1, 1, &[]);
        for i in 0..(MAX_CHANGES * 2) {
            b.state = if i % 2 == 0 {
                crate::discovery::BrokerState::NotRunning
            } else {
                crate::discovery::BrokerState::Running
            };
            b.start_time_ticks = i as u64;
            t.sync(std::slice::from_ref(&b));
        }
        assert_eq!(t.changes("1").len(), MAX_CHANGES);
        b.state = crate::discovery::BrokerState::NotRunning;
        t.sync(std::slice::from_ref(&b));
        assert_eq!(t.current("1"), Some(KafkaState::NotRunning));
        t.sync(&[]);
        assert_eq!(t.current("1"), None);
    }
}
