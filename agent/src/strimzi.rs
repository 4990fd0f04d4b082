//! Kafka broker state in Strimzi's numbering, derived from /proc and the kernel (never from the
//! broker's own metrics): what `/v1/broker-state`, `/v1/ready`, `brokerscope_broker_state` and
//! the `broker_state` of `/v1/brokers` report.
//!
//! Owns the per-process facts the derivation needs (log segment inventory, segments seen opened,
//! SIGTERM, listening) and a bounded history of state changes per broker. It reads /proc, never a
//! map: kernel facts arrive as [`StateSignal`]s from `probes::state`.
//!
//! Log recovery is seen by polling the broker's open descriptors ([`fds`]) on every tick while
//! the process is starting (not yet seen RUNNING, recovery not over, no SIGTERM), and never after:
//! Kafka keeps each loaded segment's `.log` open, so a recovering broker's segments accumulate
//! there. No kernel hook is needed for it; the opt-in `openat` hooks, when attached, feed the same
//! inventory through [`StateSignal::Open`].
//!
//! The heuristics, in order (first match wins), and their limits are in docs/broker-state.md:
//! no process → NOT_RUNNING; SIGTERM delivered → SHUTTING_DOWN; segments under `log.dirs` seen
//! opened → RECOVERY; every listener in LISTEN → RUNNING (latched); else STARTING.

pub(crate) mod fds;

use std::{
    collections::{HashMap, VecDeque},
    io::BufRead as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use brokerscope_common::state::AT_FDCWD;
use serde::Serialize;

use self::fds::{FdPoll, FdPollError};
use crate::files::{ConfinedError, ProcessRoot};
use crate::{broker::Broker, probes::state::StateSignal};
use std::sync::mpsc::Receiver;

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
    /// What the agent cannot observe (see [`StateView::unknown`]).
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
    /// Why the state is UNKNOWN: what the agent cannot observe (present then only).
    pub unknown: Option<&'static str>,
}

impl StateView {
    pub const fn of(state: KafkaState) -> Self {
        StateView {
            state,
            recovery: None,
            unknown: None,
        }
    }

    pub const fn unknown(why: &'static str) -> Self {
        StateView {
            state: KafkaState::Unknown,
            recovery: None,
            unknown: Some(why),
        }
    }

    const fn recovering(recovery: Recovery) -> Self {
        StateView {
            state: KafkaState::Recovery,
            recovery: Some(recovery),
            unknown: None,
        }
    }
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
        if let Some(why) = self.unknown {
            st.serialize_field("unknown", why)?;
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
/// Directory entries read in all for one inventory.
const MAX_LISTED: usize = 2_000_000;
/// How long the tracker waits for an inventory before it says UNKNOWN (the listing goes on, off
/// its lock, and is used when it ends).
pub const INVENTORY_DEADLINE: Duration = Duration::from_secs(2);
/// A listing that could not start (an earlier one of the process still hangs, every file
/// worker busy) is tried again after this long.
const INVENTORY_RETRY: Duration = Duration::from_secs(5);
/// A listening broker that opened no tracked segment for this long is past recovery even if
/// the estimate says segments remain (estimate wrong, events lost, segments deleted).
pub const QUIET: Duration = Duration::from_secs(5);
/// How often the tracker's thread ticks while some process is having its descriptors polled
/// (otherwise every 250 ms): a segment opened is seen within about this long.
pub const POLL_TICK: Duration = Duration::from_millis(100);
/// A process whose descriptors took `d` to list is listed again no sooner than `POLL_PACE·d`
/// after, so the listing, which every poll pays however little changed, takes at most
/// 1/`POLL_PACE` of a core: the kernel lists about one descriptor a µs (10,000 in 9-30 ms here,
/// so every 200-600 ms rather than every tick; [`fds::MAX_FDS`], ~0.3 s, every ~6 s). Listings
/// of up to `POLL_TICK / POLL_PACE` (a few thousand descriptors) run every tick. Link reads are
/// not paced: each new descriptor is read once, at most [`MAX_LINKS_PER_POLL`] a poll.
pub const POLL_PACE: u32 = 20;
/// Descriptor links read per process and poll. A broker that opened more since the last poll
/// has the rest read on the next ones (tens of thousands a second at [`POLL_TICK`]); it bounds
/// how long one poll holds the tracker's lock (4096 links take 15-40 ms here, ~4 µs each).
pub const MAX_LINKS_PER_POLL: usize = 4096;
/// Lines of `/proc/<pid>/net/tcp{,6}` read per check (a broker with more sockets than this is
/// checked on the first ones; listeners come first in the kernel's hash order only by chance).
pub(crate) const MAX_TCP_LINES: usize = 200_000;

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
    /// log dir, listed inside the process's own root (see [`crate::files::confine`]): a log dir
    /// that is a link out of it, or a partition that is a link at all, is not followed. At most
    /// [`MAX_DIR_ENTRIES`] entries per directory and [`MAX_LISTED`] in all. Slow on a large or
    /// hung filesystem: it runs on a file worker, never under the tracker's lock.
    fn take(root: &ProcessRoot, log_dirs: &[String]) -> Self {
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
        let mut listed = 0usize;
        for dir in inv.log_dirs.clone() {
            let Ok(logs) = root.open_dir(&dir) else {
                continue;
            };
            let Ok((parts, _)) = logs.entries(MAX_DIR_ENTRIES.min(MAX_LISTED - listed)) else {
                continue;
            };
            listed += parts.len();
            for part in parts.iter().filter(|p| p.is_dir) {
                if listed >= MAX_LISTED {
                    break;
                }
                let Ok(files) = logs
                    .child_dir(&part.name)
                    .and_then(|d| d.entries(MAX_DIR_ENTRIES.min(MAX_LISTED - listed)))
                else {
                    continue;
                };
                listed += files.0.len();
                let part_name = part.name_lossy();
                let mut count = 0u32;
                for file in &files.0 {
                    if !file.name.ends_with(b".log") {
                        continue;
                    }
                    if inv.segments.len() < MAX_SEGMENTS {
                        let log = inv.remaining_per_log.len();
                        inv.segments
                            .insert(format!("{dir}/{part_name}/{}", file.name_lossy()), log);
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
    /// Empty until `listing` is done.
    inventory: Inventory,
    listing: Listing,
    /// A tracked segment was opened: recovery began.
    recovery_seen: bool,
    recovery_over: bool,
    last_open: Option<Instant>,
    sigterm: bool,
    /// Every listener was seen listening once: RUNNING until shutdown.
    running: bool,
    /// The last listening check and its answer (reading `/proc/<pid>/net/tcp` of a namespace
    /// with thousands of sockets takes tens of ms: checked at most every [`LISTEN_RECHECK`]).
    listen_checked: Option<(Instant, Listening)>,
    /// The poll of its open descriptors.
    fds: FdWatch,
    /// The descriptor poll failed for a reason other than the process's exit (no privilege to
    /// inspect it): recovery cannot be seen.
    fds_unreadable: bool,
}

/// Whether every listener of a broker listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listening {
    Yes,
    No,
    /// Cannot be told: why.
    Unknown(&'static str),
}

/// Where the inventory of a process's log dirs is: listed on a file worker
/// ([`crate::files::workers::files`]), so a huge or hung log dir never holds the tracker.
#[derive(Debug)]
enum Listing {
    Pending {
        since: Instant,
        done: Receiver<Result<Inventory, ConfinedError>>,
    },
    Done,
    /// Could not be listed (`retry`: the listing could not start, tried again after
    /// [`INVENTORY_RETRY`]).
    Failed {
        at: Instant,
        retry: bool,
    },
}

/// Where a process's descriptor poll is.
#[derive(Debug)]
enum FdWatch {
    /// Not polled yet: the first tick that finds the process starting begins.
    Idle,
    Polling(Box<Watching>),
    /// Never again for this process.
    Stopped,
}

/// A descriptor poll in progress, and what it saw (for its last log line).
#[derive(Debug)]
struct Watching {
    /// None until `/proc/<pid>/fd` could be opened (retried every tick).
    poll: Option<FdPoll>,
    since: Instant,
    /// No poll before (see [`POLL_PACE`]).
    not_before: Option<Instant>,
    polls: u64,
    /// Time spent polling.
    busy: Duration,
    /// Tracked segments this poll saw opened first.
    segments_opened: u64,
    /// The last error was logged (debug) once.
    error_logged: bool,
}

/// How long a listening check is reused.
pub const LISTEN_RECHECK: Duration = Duration::from_millis(250);

impl Process {
    fn new(broker: &Broker, files: &crate::files::Workers) -> Self {
        Process {
            pid: broker.pid,
            start_time_ticks: broker.start_time_ticks,
            inventory: Inventory::default(),
            listing: start_listing(broker, files),
            recovery_seen: false,
            recovery_over: false,
            last_open: None,
            sigterm: false,
            running: false,
            listen_checked: None,
            fds: FdWatch::Idle,
            fds_unreadable: false,
        }
    }

    /// Takes the inventory if its listing ended (waiting at most `wait`), or starts the listing
    /// again after a failure to start. Whether it is done.
    fn collect_listing(
        &mut self,
        broker: &Broker,
        id: &str,
        files: &crate::files::Workers,
        wait: Duration,
    ) -> bool {
        let (since, done) = match &self.listing {
            Listing::Done => return true,
            Listing::Failed { at, retry } => {
                if *retry && at.elapsed() >= INVENTORY_RETRY {
                    self.listing = start_listing(broker, files);
                }
                return false;
            }
            Listing::Pending { since, done } => (since, done),
        };
        let result = if wait.is_zero() {
            done.try_recv()
                .map_err(|e| e == std::sync::mpsc::TryRecvError::Disconnected)
        } else {
            done.recv_timeout(wait)
                .map_err(|e| e == std::sync::mpsc::RecvTimeoutError::Disconnected)
        };
        let took = since.elapsed();
        match result {
            Ok(Ok(inventory)) => {
                tracing::info!(
                    broker = %id,
                    pid = self.pid,
                    logs = inventory.logs_remaining,
                    segments = inventory.segments_remaining,
                    listing_ms = took.as_millis() as u64,
                    "broker state: log segments counted"
                );
                self.inventory = inventory;
                self.listing = Listing::Done;
                true
            }
            Ok(Err(e)) => {
                tracing::info!(broker = %id, pid = self.pid, error = %e, "broker state: cannot list the log dirs; recovery cannot be seen");
                self.listing = Listing::Failed {
                    at: Instant::now(),
                    retry: false,
                };
                false
            }
            // The worker ended without an answer (it panicked).
            Err(true) => {
                tracing::warn!(broker = %id, pid = self.pid, "broker state: listing the log dirs failed; tried again later");
                self.listing = Listing::Failed {
                    at: Instant::now(),
                    retry: true,
                };
                false
            }
            Err(false) => false,
        }
    }

    /// Why recovery cannot be seen for this process, if it cannot.
    fn recovery_unseen(&self, broker: &Broker) -> Option<&'static str> {
        if broker.log_dirs.is_empty() {
            Some("log dirs unknown (properties not read)")
        } else if matches!(self.listing, Listing::Pending { .. }) {
            Some("log dirs not listed yet")
        } else if matches!(self.listing, Listing::Failed { .. }) {
            Some("log dirs could not be listed")
        } else if self.fds_unreadable {
            Some("open descriptors unreadable")
        } else {
            None
        }
    }

    /// Counts an open of `path` (as the broker sees it) against the inventory, from the
    /// descriptor poll or an `openat` hook; whether it told something new.
    fn saw_open(&mut self, path: &str) -> bool {
        if self.inventory.opened(path) {
            self.recovery_seen = true;
            self.last_open = Some(Instant::now());
            true
        } else if self.recovery_seen && self.inventory.under_log_dirs(path) {
            self.last_open = Some(Instant::now());
            true
        } else {
            false
        }
    }

    /// Past the point where its opens matter: RUNNING (latched), recovery over, or SIGTERM.
    fn past_recovery(&self) -> Option<&'static str> {
        if self.sigterm {
            Some("SIGTERM delivered")
        } else if self.running {
            Some("RUNNING")
        } else if self.recovery_over {
            Some("recovery over")
        } else {
            None
        }
    }

    /// Polls the open descriptors while the process is starting (stopping for good once it is
    /// not), paced by [`POLL_PACE`] when `pace`; whether a segment was seen opened.
    fn poll_fds(&mut self, id: &str, pace: bool) -> bool {
        if let Some(reason) = self.past_recovery() {
            self.stop_polling(id, reason);
            return false;
        }
        if !matches!(self.listing, Listing::Done) {
            // Opens seen before the inventory would be lost: each descriptor is read once.
            return false;
        }
        let mut watch = match std::mem::replace(&mut self.fds, FdWatch::Stopped) {
            FdWatch::Stopped => return false,
            FdWatch::Polling(watch) => {
                if pace && watch.not_before.is_some_and(|t| Instant::now() < t) {
                    self.fds = FdWatch::Polling(watch);
                    return false;
                }
                watch
            }
            FdWatch::Idle => {
                tracing::info!(
                    broker = %id,
                    pid = self.pid,
                    logs = self.inventory.logs_remaining,
                    segments = self.inventory.segments_remaining,
                    "broker state: polling open descriptors while the broker starts"
                );
                Box::new(Watching {
                    poll: None,
                    since: Instant::now(),
                    not_before: None,
                    polls: 0,
                    busy: Duration::ZERO,
                    segments_opened: 0,
                    error_logged: false,
                })
            }
        };
        let started = Instant::now();
        let result = match watch.poll.as_mut() {
            Some(poll) => Ok(poll),
            None => FdPoll::open(self.pid, self.start_time_ticks).map(|p| watch.poll.insert(p)),
        }
        .and_then(|poll| {
            let mut opened = 0;
            let mut news = false;
            poll.poll(MAX_LINKS_PER_POLL, |path| {
                let first = self.inventory.segments.contains_key(path);
                news |= self.saw_open(path);
                opened += u64::from(first);
            })
            .map(|stats| (opened, news, stats.listing))
        });
        watch.polls += 1;
        watch.busy += started.elapsed();
        let news = match result {
            Ok((opened, news, listing)) => {
                self.fds_unreadable = false;
                watch.segments_opened += opened;
                watch.not_before = paced(started, listing);
                news
            }
            Err(FdPollError::Gone { .. }) => {
                self.fds = FdWatch::Polling(watch);
                self.stop_polling(id, "process gone");
                return false;
            }
            // Denied (a process the agent may not inspect) or odd: not worth more than a debug
            // line, once; retried on the next tick.
            Err(e) => {
                self.fds_unreadable = true;
                if !watch.error_logged {
                    tracing::debug!(
                        broker = %id,
                        pid = self.pid,
                        error = %e,
                        "broker state: cannot poll open descriptors"
                    );
                    watch.error_logged = true;
                }
                false
            }
        };
        self.fds = FdWatch::Polling(watch);
        news
    }

    /// Ends the descriptor poll for good, logging what it saw if it ran.
    fn stop_polling(&mut self, id: &str, reason: &'static str) {
        if let FdWatch::Polling(w) = std::mem::replace(&mut self.fds, FdWatch::Stopped) {
            tracing::info!(
                broker = %id,
                pid = self.pid,
                reason,
                segments_opened = w.segments_opened,
                segments_remaining = self.inventory.segments_remaining,
                polls = w.polls,
                poll_ms = %format_args!("{:.1}", w.busy.as_secs_f64() * 1e3),
                polled_for_ms = w.since.elapsed().as_millis() as u64,
                "broker state: stopped polling open descriptors"
            );
        }
    }

    /// Whether every listener listens. `read`: may read /proc (the tracker's own thread);
    /// otherwise (requests) the last answer is used, "not yet" when there is none.
    fn listening(&mut self, broker: &Broker, read: bool) -> Listening {
        if wanted_ports(broker).is_empty() {
            return Listening::Unknown("no listener port known");
        }
        match self.listen_checked {
            Some((at, answer)) if !read || at.elapsed() < LISTEN_RECHECK => answer,
            None if !read => Listening::Unknown("listening not checked yet"),
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
#[derive(Debug)]
pub struct StateTracker {
    by_id: HashMap<String, Tracked>,
    /// Running pid -> broker id.
    by_pid: HashMap<u32, String>,
    /// Descriptor polls are paced ([`POLL_PACE`]); tests tick back to back without.
    pace: bool,
    /// How long `sync` waits for a new process's log dirs to be listed, under the tracker's
    /// lock: [`LISTING_WAIT`] (a listing that takes longer goes on without holding anything);
    /// tests wait longer, to tick deterministically.
    wait_listing: Duration,
    /// Where the listings run.
    files: crate::files::Workers,
    /// Whether a SIGTERM to a broker can be seen (the `signal_deliver` program is attached).
    /// Without it a RUNNING broker that is told to stop would go on reading RUNNING: such a
    /// broker reads UNKNOWN instead ([`SIGTERM_UNSEEN`]).
    sigterm_observed: bool,
}

/// How long a new process's listing is waited for before its state is first derived: enough
/// for an ordinary log dir (a few ms), so a broker start does not log UNKNOWN first.
const LISTING_WAIT: Duration = Duration::from_millis(20);

impl Default for StateTracker {
    fn default() -> Self {
        Self {
            by_id: HashMap::new(),
            by_pid: HashMap::new(),
            pace: true,
            wait_listing: LISTING_WAIT,
            files: crate::files::workers::files().clone(),
            sigterm_observed: false,
        }
    }
}

impl StateTracker {
    /// Says whether the kernel reports SIGTERMs delivered to brokers (the probes attached
    /// `signal_deliver`, or not).
    pub fn set_sigterm_observed(&mut self, observed: bool) {
        self.sigterm_observed = observed;
    }

    /// Follows the broker table: new processes get an inventory, gone ids are forgotten.
    pub fn sync(&mut self, brokers: &[Broker]) {
        self.by_id.retain(|id, tracked| {
            let known = brokers.iter().any(|b| &b.id == id);
            if let (false, Some(p)) = (known, tracked.process.as_mut()) {
                p.stop_polling(id, "broker gone");
            }
            known
        });
        self.by_pid.clear();
        let mut fresh = Vec::new();
        for b in brokers {
            let tracked = self.by_id.entry(b.id.clone()).or_default();
            if !b.is_running() {
                if let Some(mut p) = tracked.process.take() {
                    p.stop_polling(&b.id, "process exited");
                }
                continue;
            }
            self.by_pid.insert(b.pid, b.id.clone());
            if self.follow(b) {
                fresh.push(b.pid);
            }
        }
        for b in brokers {
            // A new process's listeners are read now, so its first state is not a guess.
            self.evaluate(b, fresh.contains(&b.pid));
        }
    }

    /// Follows running broker `b`'s process unless it already does; whether it began to.
    fn follow(&mut self, b: &Broker) -> bool {
        let followed = self.by_id.get(&b.id).and_then(|t| t.process.as_ref());
        if followed.is_some_and(|p| p.pid == b.pid && p.start_time_ticks == b.start_time_ticks) {
            return false;
        }
        self.by_pid.insert(b.pid, b.id.clone());
        let tracked = self.by_id.entry(b.id.clone()).or_default();
        if let Some(old) = tracked.process.as_mut() {
            old.stop_polling(&b.id, "process replaced");
        }
        let mut process = Process::new(b, &self.files);
        process.collect_listing(b, &b.id, &self.files, self.wait_listing);
        tracked.process = Some(process);
        true
    }

    /// Applies a kernel event (opens come from the opt-in `openat` hooks only). Returns the
    /// broker id it concerned.
    pub fn on_signal(&mut self, signal: &StateSignal) -> Option<String> {
        match signal {
            StateSignal::Open { tgid, dfd, path } => {
                let id = self.by_pid.get(tgid)?.clone();
                let process = self.by_id.get_mut(&id)?.process.as_mut()?;
                let path = absolute(*tgid, *dfd, path)?;
                process.saw_open(&path);
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
        // A broker table newer than the one last followed (a request's copy can be): a running
        // process not followed yet is followed now, never taken as not running.
        if broker.is_running() {
            self.follow(broker);
        }
        let tracked = self.by_id.entry(broker.id.clone()).or_default();
        let view = match tracked.process.as_mut().filter(|_| broker.is_running()) {
            None => StateView::of(KafkaState::NotRunning),
            Some(p) => {
                p.collect_listing(broker, &broker.id, &self.files, Duration::ZERO);
                match derive(p, broker, read) {
                    v if v.state == KafkaState::Running && !self.sigterm_observed => {
                        StateView::unknown(SIGTERM_UNSEEN)
                    }
                    v => v,
                }
            }
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

    /// The tracker thread's pass over one broker: derives its state, then, while its process is
    /// starting, polls the process's open descriptors and derives again if that saw a segment
    /// opened. Deriving first lets a broker already listening when first seen (the agent started
    /// after it) latch RUNNING without its descriptors ever being read. The poll runs under the
    /// tracker's lock, as the listening check does: a request waits for one poll at most.
    pub fn tick(&mut self, broker: &Broker) -> StateView {
        let view = self.evaluate(broker, true);
        let process = self
            .by_id
            .get_mut(&broker.id)
            .and_then(|t| t.process.as_mut())
            .filter(|p| broker.is_running() && p.pid == broker.pid);
        if process.is_some_and(|p| p.poll_fds(&broker.id, self.pace)) {
            self.evaluate(broker, true)
        } else {
            view
        }
    }

    /// Whether some process is having its descriptors polled: the tracker's thread then ticks
    /// every [`POLL_TICK`].
    pub fn polling(&self) -> bool {
        self.by_id.values().any(|t| {
            t.process.as_ref().is_some_and(|p| {
                matches!(p.fds, FdWatch::Polling(_)) || matches!(p.listing, Listing::Pending { .. })
            })
        })
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
    if p.sigterm {
        return StateView::of(KafkaState::ShuttingDown);
    }
    if p.running {
        return StateView::of(KafkaState::Running);
    }
    if p.recovery_seen && !p.recovery_over {
        let quiet = p.last_open.is_none_or(|t| t.elapsed() >= QUIET);
        if p.inventory.segments_remaining == 0
            || (quiet && p.listening(broker, read) == Listening::Yes)
        {
            p.recovery_over = true;
        } else {
            return StateView::recovering(p.inventory.recovery());
        }
    }
    let listening = p.listening(broker, read);
    if listening == Listening::Yes {
        p.running = true;
        return StateView::of(KafkaState::Running);
    }
    if p.recovery_seen {
        // Recovered but not serving yet: Kafka stays in RECOVERY until it starts serving.
        return StateView::recovering(p.inventory.recovery());
    }
    if broker.evidence.files_stalled {
        // The root of what cannot be told: its listeners and log dirs are in those files.
        return StateView::unknown(FILES_STALLED);
    }
    if let Listening::Unknown(why) = listening {
        return StateView::unknown(why);
    }
    // Not listening: STARTING, unless a recovery could be going on unseen.
    match p.recovery_unseen(broker) {
        Some(why) => StateView::unknown(why),
        None => StateView::of(KafkaState::Starting),
    }
}

/// A live process's start time in clock ticks (tests building brokers of this process).
#[cfg(test)]
pub fn start_ticks_of_pid(pid: u32) -> Option<u64> {
    fds::start_ticks(pid).ok()
}

/// Lists the log dirs of `broker`'s process on a file worker (see [`Inventory::take`]).
fn start_listing(broker: &Broker, files: &crate::files::Workers) -> Listing {
    let (pid, start, dirs) = (broker.pid, broker.start_time_ticks, broker.log_dirs.clone());
    let spawned = files.spawn(
        LISTING_KEY | u64::from(pid),
        format!("listing the log dirs of broker {} (pid {pid})", broker.id),
        INVENTORY_DEADLINE,
        move || {
            let dir = PathBuf::from(format!("/proc/{pid}"));
            ProcessRoot::open(&dir, pid, Some(start)).map(|root| Inventory::take(&root, &dirs))
        },
    );
    match spawned {
        Ok(done) => Listing::Pending {
            since: Instant::now(),
            done,
        },
        Err(e) => {
            tracing::info!(broker = %broker.id, pid, error = %e, "broker state: cannot list the log dirs now; tried again later");
            Listing::Failed {
                at: Instant::now(),
                retry: true,
            }
        }
    }
}

const FILES_STALLED: &str = "the broker's files could not be read in time";
/// A listening broker while the agent cannot see SIGTERMs: it may be shutting down.
const SIGTERM_UNSEEN: &str =
    "listening, but a SIGTERM would not be seen (the signal_deliver probe is not attached)";

/// File-worker keys of log-dir listings (a pid's own reads, by discovery, use the pid).
const LISTING_KEY: u64 = 1 << 32;

/// When a poll that began at `started` and listed in `listing` lets the next one run: None
/// (next tick) when the listing was cheap.
fn paced(started: Instant, listing: Duration) -> Option<Instant> {
    (listing > POLL_TICK / POLL_PACE).then(|| started + listing * POLL_PACE)
}

/// Kept over procfs 0.18 `tcp()`/`tcp6()`: as fast (6.68 ms both, the kernel's walk of the
/// socket table dominates) but it collects every line with no bound and cannot stop once the
/// ports are found; measured 2026-12-05 by `cargo xtask bench --procfs-only`.
///
/// Whether every configured listener port is in LISTEN in the broker's network namespace
/// (`/proc/<pid>/net/tcp{,6}` show the namespace of that process). A broker with no known
/// listener (config unreadable, no `discovery.listener_ports`) cannot be told.
fn listening(broker: &Broker) -> Listening {
    let mut wanted = wanted_ports(broker);
    if wanted.is_empty() {
        return Listening::Unknown("no listener port known");
    }
    let mut read = false;
    for file in ["tcp", "tcp6"] {
        let path = format!("/proc/{}/net/{file}", broker.pid);
        let Ok(f) = std::fs::File::open(&path) else {
            continue;
        };
        read = true;
        for line in std::io::BufReader::new(f)
            .lines()
            .skip(1)
            .take(MAX_TCP_LINES)
            .map_while(Result::ok)
        {
            if let Some(port) = listen_port(&line) {
                wanted.retain(|&w| w != port);
                if wanted.is_empty() {
                    return Listening::Yes;
                }
            }
        }
    }
    if read {
        Listening::No
    } else {
        Listening::Unknown("listening sockets unreadable")
    }
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
pub(crate) fn listen_port(line: &str) -> Option<u16> {
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
/// the `dfd` directory, read from /proc while the process lives and taken inside the process's
/// root (a chroot's links are printed from the node's root: see [`fds`]).
fn absolute(pid: u32, dfd: i32, path: &str) -> Option<String> {
    use std::os::unix::ffi::OsStrExt as _;
    if path.starts_with('/') {
        return Some(path.to_string());
    }
    let base = if dfd == AT_FDCWD {
        std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?
    } else {
        std::fs::read_link(format!("/proc/{pid}/fd/{dfd}")).ok()?
    };
    let root = fds::root_link(pid).ok()?;
    let base = fds::inside_root(&root, base.as_os_str().as_bytes()).and_then(fds::target_path)?;
    let joined = std::path::Path::new(base).join(path.trim_start_matches("./"));
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
    use crate::broker::tests::broker;
    use fds::tests::Placed;

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
        let confined = ProcessRoot::at(root.path(), None, crate::files::confine::Resolver::Auto);
        let mut inv = Inventory::take(&confined, &dirs);
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

    /// Log dirs `d1` (logs t-0 with 3 segments, t-1 with 2) and `d2` (u-0 with 3) under `dir`,
    /// each segment with an index beside it; the 8 segments in the order the tests open them.
    fn log_dirs(dir: &std::path::Path) -> (Vec<String>, Vec<PathBuf>) {
        let mut segments = Vec::new();
        for (part, n) in [("d1/t-0", 3), ("d1/t-1", 2), ("d2/u-0", 3)] {
            let part = dir.join(part);
            std::fs::create_dir_all(&part).unwrap();
            for i in 0..n {
                let segment = part.join(format!("{:020}.log", i * 100));
                std::fs::write(&segment, b"segment").unwrap();
                std::fs::write(segment.with_extension("index"), b"").unwrap();
                segments.push(segment);
            }
        }
        std::fs::write(dir.join("d1/meta.properties"), b"node.id=7\n").unwrap();
        let dirs = vec![
            format!("{}/d1", dir.display()),
            format!("{}/d2/", dir.display()),
        ];
        (dirs, segments)
    }

    /// This test process as a broker with `log_dirs` and one listener on a port nobody listens
    /// on (until the test does): the port, to listen on.
    fn own_broker(log_dirs: Vec<String>) -> (Broker, u16) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let pid = std::process::id();
        let mut b = broker("7", pid, 1, &[("PLAINTEXT", port)]);
        b.start_time_ticks = fds::start_ticks(pid).unwrap();
        b.log_dirs = log_dirs;
        (b, port)
    }

    /// A tracker that polls on every tick, however long a poll took (ticks here come back to
    /// back, on a machine maybe loaded).
    fn unpaced() -> StateTracker {
        StateTracker {
            pace: false,
            wait_listing: Duration::from_secs(10),
            files: crate::files::Workers::new("test-files", 4),
            sigterm_observed: true,
            ..StateTracker::default()
        }
    }

    #[test]
    fn slow_polls_are_paced() {
        let now = Instant::now();
        assert_eq!(paced(now, Duration::from_millis(1)), None);
        assert_eq!(paced(now, POLL_TICK / POLL_PACE), None);
        // 10,000 descriptors listed in 9 ms: the next poll 180 ms after this one began.
        assert_eq!(
            paced(now, Duration::from_millis(9)),
            Some(now + Duration::from_millis(180))
        );
    }

    fn recovering(logs: i32, segments: i32) -> StateView {
        StateView::recovering(rec(logs, segments))
    }

    fn plain(state: KafkaState) -> StateView {
        StateView::of(state)
    }

    fn watch(t: &StateTracker) -> &'static str {
        match t.by_id["7"].process.as_ref().map(|p| &p.fds) {
            None => "no process",
            Some(FdWatch::Idle) => "idle",
            Some(FdWatch::Polling(_)) => "polling",
            Some(FdWatch::Stopped) => "stopped",
        }
    }

    fn changes(t: &StateTracker) -> Vec<&'static str> {
        t.changes("7").iter().map(|c| c.to).collect()
    }

    /// Ticks until the broker is RUNNING (the listening check is reused for 250 ms).
    fn tick_until_running(t: &mut StateTracker, b: &Broker) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.tick(b) != plain(KafkaState::Running) {
            assert!(
                Instant::now() < deadline,
                "not RUNNING: {:?}",
                t.current("7")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn recovery_is_seen_from_open_descriptors_with_exact_counts_and_polling_stops_after() {
        let dir = tempfile::tempdir().unwrap();
        let (dirs, segments) = log_dirs(dir.path());
        let (b, port) = own_broker(dirs);
        let mut t = unpaced();
        t.sync(std::slice::from_ref(&b));
        assert_eq!(t.tick(&b), plain(KafkaState::Starting));
        assert_eq!((watch(&t), t.polling()), ("polling", true));

        // Opened one by one, kept open (as Kafka keeps each loaded segment's FileChannel), with
        // the index beside each opened and closed: every tick sees exactly what was opened.
        // Kept ones on numbers of this test's own (see `Placed`).
        let logs_left = [3, 3, 2, 2, 1, 1, 1, 0];
        let mut open = Vec::new();
        for (k, segment) in segments.iter().enumerate() {
            open.push(Placed::new(
                std::fs::File::open(segment).unwrap(),
                940 + k as i32,
            ));
            drop(std::fs::File::open(segment.with_extension("index")).unwrap());
            let left = 8 - (k as i32 + 1);
            assert_eq!(
                t.tick(&b),
                recovering(logs_left[k], left),
                "after {}",
                k + 1
            );
            if k == 2 {
                // Closing a counted segment does not count it back, nor does opening it again.
                drop(open.remove(0));
                assert_eq!(t.tick(&b), recovering(2, 5));
                open.push(Placed::new(std::fs::File::open(&segments[0]).unwrap(), 950));
                assert_eq!(t.tick(&b), recovering(2, 5));
            }
        }
        // Recovered, not listening: RECOVERY 0/0, and the poll stops on the next tick.
        assert!(t.polling());
        assert_eq!(t.tick(&b), recovering(0, 0));
        assert_eq!((watch(&t), t.polling()), ("stopped", false));

        let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        tick_until_running(&mut t, &b);
        assert_eq!(changes(&t), ["STARTING", "RECOVERY", "RUNNING"]);
        assert!(!t.polling());
    }

    #[test]
    fn a_process_seen_mid_recovery_counts_the_segments_it_already_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (dirs, segments) = log_dirs(dir.path());
        let held: Vec<_> = (960..)
            .zip(&segments[..4])
            .map(|(fd, s)| Placed::new(std::fs::File::open(s).unwrap(), fd))
            .collect();
        let (b, _port) = own_broker(dirs);
        let mut t = unpaced();
        t.sync(std::slice::from_ref(&b));
        // The inventory is taken first (8 segments), then the first poll finds 4 held.
        assert_eq!(t.tick(&b), recovering(2, 4));
        // The kernel path (the opt-in openat hooks) feeds the same inventory; an open both saw
        // counts once.
        for path in [&segments[3], &segments[4]] {
            let open = StateSignal::Open {
                tgid: b.pid,
                dfd: AT_FDCWD,
                path: path.display().to_string(),
            };
            assert_eq!(t.on_signal(&open).as_deref(), Some("7"));
        }
        assert_eq!(t.evaluate(&b, true), recovering(1, 3));
        let also = Placed::new(std::fs::File::open(&segments[4]).unwrap(), 965);
        assert_eq!(t.tick(&b), recovering(1, 3));
        assert!(t.polling());
        drop((held, also));
    }

    #[test]
    fn a_broker_listening_when_first_seen_is_running_and_its_descriptors_are_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let (dirs, segments) = log_dirs(dir.path());
        let held: Vec<_> = segments
            .iter()
            .map(|s| std::fs::File::open(s).unwrap())
            .collect();
        let (b, port) = own_broker(dirs);
        let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let mut t = unpaced();
        t.sync(std::slice::from_ref(&b));
        assert_eq!(t.tick(&b), plain(KafkaState::Running));
        assert_eq!((watch(&t), t.polling()), ("stopped", false));
        // Its listeners were read when it was first seen: RUNNING straight away.
        assert_eq!(changes(&t), ["RUNNING"]);
        for _ in 0..3 {
            assert_eq!(t.tick(&b), plain(KafkaState::Running));
        }
        // Every segment is held open, and none was counted: no descriptor was read.
        let p = t.by_id["7"].process.as_ref().unwrap();
        assert_eq!(p.inventory.recovery(), rec(3, 8));
        assert!(!p.recovery_seen);
        drop(held);
    }

    #[test]
    fn sigterm_or_exit_stops_the_poll() {
        let dir = tempfile::tempdir().unwrap();
        let (dirs, segments) = log_dirs(dir.path());
        let (mut b, _port) = own_broker(dirs);
        let mut t = unpaced();
        t.sync(std::slice::from_ref(&b));
        assert_eq!(t.tick(&b), plain(KafkaState::Starting));
        assert!(t.polling());
        t.on_signal(&StateSignal::Sigterm { tgid: b.pid });
        assert_eq!(t.tick(&b), plain(KafkaState::ShuttingDown));
        assert_eq!((watch(&t), t.polling()), ("stopped", false));
        let late = std::fs::File::open(&segments[0]).unwrap();
        assert_eq!(t.tick(&b), plain(KafkaState::ShuttingDown));
        assert_eq!(
            t.by_id["7"]
                .process
                .as_ref()
                .unwrap()
                .inventory
                .segments_remaining,
            8
        );

        // A new process of the broker starts polling again; its exit ends it.
        b.start_time_ticks += 1;
        t.sync(std::slice::from_ref(&b));
        // Its start time is not this process's: the listing refuses it (the pid names another
        // process), so it is never polled, and what it does cannot be seen.
        assert_eq!(
            t.tick(&b),
            StateView::unknown("log dirs could not be listed")
        );
        assert_eq!((watch(&t), t.polling()), ("idle", false));
        b.state = crate::broker::BrokerState::NotRunning;
        t.sync(std::slice::from_ref(&b));
        assert_eq!(t.tick(&b), plain(KafkaState::NotRunning));
        assert_eq!((watch(&t), t.polling()), ("no process", false));
        drop(late);
    }

    #[test]
    fn what_cannot_be_observed_is_unknown_never_running() {
        let dir = tempfile::tempdir().unwrap();
        let (dirs, _segments) = log_dirs(dir.path());
        let (base, _port) = own_broker(dirs);
        let check = |b: &Broker, want: StateView| {
            let mut t = unpaced();
            t.sync(std::slice::from_ref(b));
            assert_eq!(t.tick(b), want, "{b:?}");
            assert!(!t.tick(b).state.is_ready());
        };
        // No listener known (properties unreadable, no configured ports): listening cannot be
        // told, so neither can RUNNING.
        let mut b = base.clone();
        b.listeners.clear();
        check(&b, StateView::unknown("no listener port known"));
        b.listeners = base.listeners.clone();
        b.listeners[0].port = 0;
        check(&b, StateView::unknown("no listener port known"));
        // Not listening, and a recovery could not be seen.
        let mut b = base.clone();
        b.log_dirs.clear();
        check(
            &b,
            StateView::unknown("log dirs unknown (properties not read)"),
        );
        let mut b = base.clone();
        b.evidence.files_stalled = true;
        check(
            &b,
            StateView::unknown("the broker's files could not be read in time"),
        );
        let mut b = base.clone();
        b.pid = u32::MAX - 1;
        check(&b, StateView::unknown("listening sockets unreadable"));
        // All known and not listening: STARTING.
        check(&base, plain(KafkaState::Starting));
    }

    #[test]
    fn unknown_says_why_in_the_brokers_view_only() {
        let v = serde_json::to_value(StateView::unknown("log dirs unknown (properties not read)"))
            .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name": "UNKNOWN", "number": 127, "unknown": "log dirs unknown (properties not read)"})
        );
    }

    /// Not a check: what polling costs for a broker holding 10,000 segments (100 logs of 100),
    /// through the tracker ticking every [`POLL_TICK`] as the agent's thread does (budgeted,
    /// paced polls), and through [`FdPoll`] alone (unbudgeted). Run in release for the agent's
    /// figures.
    #[test]
    #[ignore = "a measurement: cargo test --release fd_poll_cost -- --ignored --nocapture"]
    fn fd_poll_cost_with_10k_open_segments() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut segments = Vec::new();
        for p in 0..100 {
            let part = data.join(format!("topic-{p:03}"));
            std::fs::create_dir_all(&part).unwrap();
            for i in 0..100 {
                let s = part.join(format!("{:020}.log", i * 1000));
                std::fs::write(&s, b"").unwrap();
                segments.push(s);
            }
        }
        let (b, _port) = own_broker(vec![data.display().to_string()]);
        let mut t = StateTracker {
            sigterm_observed: true,
            ..StateTracker::default()
        };
        let at = Instant::now();
        t.sync(std::slice::from_ref(&b));
        let inventory = at.elapsed();
        t.tick(&b);
        // Ticks as the agent's thread runs them; each tick's time, `polled` when it polled.
        let run = |t: &mut StateTracker, until: &dyn Fn(StateView) -> bool, ticks: usize| {
            let mut times = Vec::new();
            let begun = Instant::now();
            for _ in 0..ticks {
                let polls = |t: &StateTracker| match &t.by_id["7"].process.as_ref().unwrap().fds {
                    FdWatch::Polling(w) => w.polls,
                    _ => 0,
                };
                let before = polls(t);
                let at = Instant::now();
                let view = t.tick(&b);
                times.push((at.elapsed(), polls(t) > before));
                if until(view) {
                    break;
                }
                std::thread::sleep(POLL_TICK.saturating_sub(at.elapsed()));
            }
            (begun.elapsed(), times)
        };
        let held: Vec<_> = (970..)
            .zip(&segments)
            .map(|(fd, s)| Placed::new(std::fs::File::open(s).unwrap(), fd))
            .collect();
        let (all_seen, first) = run(&mut t, &|v| v == recovering(0, 0), 100);
        assert_eq!(t.tick(&b), recovering(0, 0));
        // Steady state: the same process, nothing new to read (a second tracker).
        let mut steady = StateTracker {
            sigterm_observed: true,
            ..StateTracker::default()
        };
        let (mut b2, _port) = own_broker(vec![format!("{}/none", dir.path().display())]);
        b2.id = "7".into();
        steady.sync(std::slice::from_ref(&b2));
        run(&mut steady, &|_| false, 30);
        let (over, ticks) = run(&mut steady, &|_| false, 20);
        let polled: Vec<_> = ticks.iter().filter(|(_, p)| *p).map(|(d, _)| *d).collect();
        let first_polled = first.iter().filter(|(_, p)| *p).count();
        let busy: Duration = ticks.iter().map(|(d, _)| *d).sum();

        let pid = std::process::id();
        let mut poll = FdPoll::open(pid, fds::start_ticks(pid).unwrap()).unwrap();
        let at = Instant::now();
        let full = poll.poll(usize::MAX, |_| {}).unwrap();
        let full_time = at.elapsed();
        let rounds = 20;
        let at = Instant::now();
        let mut again = fds::PollStats::default();
        for _ in 0..rounds {
            again = poll.poll(usize::MAX, |_| {}).unwrap();
        }
        let again_time = at.elapsed() / rounds;
        eprintln!(
            "10,000 open segments, {} links a poll at most, pace {POLL_PACE}:\n\
             inventory {inventory:?}\n\
             opened -> all seen in {all_seen:?}, {first_polled} polls; ticks: {first:?}\n\
             steady: {} polls in {} ticks over {over:?}, {polled:?} each, {:.1}% of a core\n\
             FdPoll alone: first unbudgeted poll {full_time:?} ({full:?}), then {again_time:?} \
             ({again:?})",
            MAX_LINKS_PER_POLL,
            polled.len(),
            ticks.len(),
            busy.as_secs_f64() * 100.0 / over.as_secs_f64(),
        );
        drop(held);
    }

    #[test]
    fn a_stopped_broker_is_not_running_and_changes_are_bounded() {
        let mut t = StateTracker {
            sigterm_observed: true,
            ..StateTracker::default()
        };
        let mut b = broker("1", u32::MAX - 1, 1, &[]);
        for i in 0..(MAX_CHANGES * 2) {
            b.state = if i % 2 == 0 {
                crate::broker::BrokerState::NotRunning
            } else {
                crate::broker::BrokerState::Running
            };
            b.start_time_ticks = i as u64;
            t.sync(std::slice::from_ref(&b));
        }
        assert_eq!(t.changes("1").len(), MAX_CHANGES);
        b.state = crate::broker::BrokerState::NotRunning;
        t.sync(std::slice::from_ref(&b));
        assert_eq!(t.current("1"), Some(KafkaState::NotRunning));
        t.sync(&[]);
        assert_eq!(t.current("1"), None);
    }
}
