//! The state tracker: per-broker state, fed by the broker table, kernel events and a periodic
//! tick, with each broker's history of changes.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use brokerscope_common::state::AT_FDCWD;

use super::derive::derive;
use super::fds;
use super::history::{self, StateChange};
use super::listing::Listing;
use super::polling::FdWatch;
use super::process::Process;
use super::view::{KafkaState, StateView};
use crate::{broker::Broker, probes::state::StateSignal};

#[derive(Debug, Default)]
pub(super) struct Tracked {
    pub(super) process: Option<Process>,
    pub(super) current: Option<KafkaState>,
    pub(super) changes: VecDeque<StateChange>,
}

/// Per-broker state, fed by the broker table, kernel events and a periodic tick.
#[derive(Debug)]
pub struct StateTracker {
    pub(super) by_id: HashMap<String, Tracked>,
    /// Running pid -> broker id.
    pub(super) by_pid: HashMap<u32, String>,
    /// Descriptor polls are paced ([`POLL_PACE`](super::polling::POLL_PACE)); tests tick back
    /// to back without.
    pub(super) pace: bool,
    /// How long `sync` waits for a new process's log dirs to be listed, under the tracker's
    /// lock: [`LISTING_WAIT`] (a listing that takes longer goes on without holding anything);
    /// tests wait longer, to tick deterministically.
    pub(super) wait_listing: Duration,
    /// Where the listings run.
    pub(super) files: crate::files::Workers,
    /// Whether a SIGTERM to a broker can be seen (the `signal_deliver` program is attached).
    /// Without it a RUNNING broker that is told to stop would go on reading RUNNING: such a
    /// broker reads UNKNOWN instead ([`SIGTERM_UNSEEN`]).
    pub(super) sigterm_observed: bool,
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
        history::record(
            &mut tracked.current,
            &mut tracked.changes,
            broker,
            view.state,
        );
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
    /// every [`POLL_TICK`](super::polling::POLL_TICK).
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

/// A listening broker while the agent cannot see SIGTERMs: it may be shutting down.
const SIGTERM_UNSEEN: &str =
    "listening, but a SIGTERM would not be seen (the signal_deliver probe is not attached)";

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
