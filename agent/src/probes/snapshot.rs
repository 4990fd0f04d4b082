//! What the probes know at one instant, as the model reads it: per-program counters, per-listener
//! and per-broker counters, the maps' fill, and the walk of the open sockets behind them.

use std::time::Duration;

use super::{sockets, status::MapStats};

/// Per-program counters at one instant.
#[derive(Clone, Debug, Default)]
pub struct ProgramStats {
    pub program: &'static str,
    pub events: u64,
    /// From the kernel's BPF stats; zero unless `kernel.bpf_stats_enabled` is on.
    pub run_time: Duration,
    /// Runs the kernel skipped because a BPF program was already running on that CPU; None when
    /// the kernel would not say (before 5.12).
    pub misses: Option<u64>,
}

/// Everything the probes know, read at one instant.
#[derive(Clone, Debug, Default)]
pub struct ProbeSnapshot {
    pub listeners: Vec<sockets::ListenerStats>,
    pub programs: Vec<ProgramStats>,
    pub errors: Vec<(&'static str, u64)>,
    pub maps: Vec<MapStats>,
    /// Per-broker resource counters by tgid.
    pub resources: Vec<(u32, brokerscope_common::resources::ResourceCounters)>,
    /// Since when the kernel counters count, and whether they are pinned (survive the agent).
    pub counting_since: Option<(std::time::SystemTime, bool)>,
    /// The walk of the open sockets this snapshot's bytes and drops come from.
    pub walk: Option<WalkStats>,
}

/// The walk of the open sockets behind a snapshot (see [`live`](super::live)).
#[derive(Clone, Copy, Debug, Default)]
pub struct WalkStats {
    /// How long it took.
    pub took: std::time::Duration,
    /// How long before the snapshot it ended.
    pub age: std::time::Duration,
    /// Whether walks run on the background thread (they cost more than a scrape should).
    pub background: bool,
}
