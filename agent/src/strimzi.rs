//! Kafka broker state in Strimzi's numbering, derived from /proc and the kernel (never from the
//! broker's own metrics): what `/v1/broker-state`, `/v1/ready`, `brokerscope_broker_state` and
//! the `broker_state` of `/v1/brokers` report.
//!
//! Owns the per-process facts the derivation needs (log segment inventory, segments seen opened,
//! SIGTERM, listening) and a bounded history of state changes per broker. It reads /proc, never a
//! map: kernel facts arrive as [`StateSignal`](crate::probes::state::StateSignal)s from
//! `probes::state`.
//!
//! Log recovery is seen by polling the broker's open descriptors ([`fds`]) on every tick while
//! the process is starting (not yet seen RUNNING, recovery not over, no SIGTERM), and never after:
//! Kafka keeps each loaded segment's `.log` open, so a recovering broker's segments accumulate
//! there. No kernel hook is needed for it; the opt-in `openat` hooks, when attached, feed the same
//! inventory through [`StateSignal::Open`](crate::probes::state::StateSignal::Open).
//!
//! The heuristics, in order (first match wins), and their limits are in docs/broker-state.md:
//! no process → NOT_RUNNING; SIGTERM delivered → SHUTTING_DOWN; segments under `log.dirs` seen
//! opened → RECOVERY; every listener in LISTEN → RUNNING (latched); else STARTING.
//!
//! Its parts: [`view`] (the states and what they read as), [`tracker`] (per broker, fed by the
//! broker table, kernel events and the tick), [`process`] (what is known of one process),
//! [`derive`](mod@derive) (the heuristics), [`inventory`] and [`listing`] (the log segments and their
//! listing on a file worker), [`polling`] and [`fds`] (the descriptor poll), [`listen`]
//! (listening sockets), [`history`] (the changes logged).

mod derive;
pub(crate) mod fds;
mod history;
mod inventory;
mod listen;
mod listing;
mod polling;
mod process;
mod tracker;
mod view;

pub use self::history::StateChange;
pub(crate) use self::listen::{MAX_TCP_LINES, listen_port};
pub use self::polling::POLL_TICK;
pub use self::tracker::StateTracker;
/// Named outside this module by tests only (others read it through [`StateView`]).
#[cfg(test)]
pub use self::view::KafkaState;
pub use self::view::{Recovery, StateView};

/// A live process's start time in clock ticks (tests building brokers of this process).
#[cfg(test)]
pub fn start_ticks_of_pid(pid: u32) -> Option<u64> {
    fds::start_ticks(pid).ok()
}

#[cfg(test)]
mod tests;
