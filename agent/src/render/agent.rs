//! The agent's own families: whether it serves and since when, its kernel programs and
//! maps, the walk of the open sockets and the workers that read brokers' files.

use super::text::{Exposition, Kind};
use crate::model::Snapshot;

/// `at` as Unix seconds (fractions kept).
fn unix_seconds(at: std::time::SystemTime) -> f64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `agent_ready`, `build_info` and when the agent and its kernel counters started.
pub(super) fn process(e: &mut Exposition, snapshot: &Snapshot) {
    let p = &snapshot.probes;

    let ready = snapshot.readiness.as_ref().is_some_and(|r| r.ready);
    e.family(
        "agent_ready",
        Kind::Gauge,
        "1 when probes are attached and the agent serves.",
    )
    .sample(&[], u8::from(ready));
    e.family("build_info", Kind::Gauge, "Agent version; always 1.")
        .sample(&[("version", env!("CARGO_PKG_VERSION"))], 1);
    e.family(
        "agent_start_time_seconds",
        Kind::Gauge,
        "When this agent process started, Unix seconds.",
    )
    .sample(&[], unix_seconds(*crate::STARTED));
    if let Some((since, pinned)) = p.counting_since {
        e.family(
            "counters_start_time_seconds",
            Kind::Gauge,
            "Since when the kernel counters count, Unix seconds: when their maps were created. Earlier than agent_start_time_seconds when this agent adopted the pinned maps of an earlier one (the counters continued); it changes only when they start over. pinned=\"false\": they start over with each agent.",
        )
        .sample(&[("pinned", if pinned { "true" } else { "false" })], unix_seconds(since));
    }
}

/// The kernel programs: where each is attached, its runs, time, misses and failures.
pub(super) fn programs(e: &mut Exposition, snapshot: &Snapshot) {
    let p = &snapshot.probes;
    {
        let mut f = e.family(
            "probe_attached",
            Kind::Gauge,
            "1 for each kernel program attached, by the hook that serves it.",
        );
        for a in &snapshot.attached {
            f.sample(&[("program", a.program), ("hook", a.hook)], 1);
        }
    }
    {
        let mut f = e.family(
            "probe_events_total",
            Kind::Counter,
            "Runs of each kernel program.",
        );
        for s in &p.programs {
            f.sample(&[("program", s.program)], s.events);
        }
    }
    {
        let mut f = e.family(
            "probe_run_seconds_total",
            Kind::Counter,
            "Time spent in each kernel program (kernel BPF stats; 0 unless kernel.bpf_stats_enabled).",
        );
        for s in &p.programs {
            f.sample(&[("program", s.program)], s.run_time.as_secs_f64());
        }
    }
    {
        let mut f = e.family(
            "probe_misses_total",
            Kind::Counter,
            "Runs the kernel skipped because a BPF program was already running on that CPU: events the counters did not see.",
        );
        for s in &p.programs {
            if let Some(misses) = s.misses {
                f.sample(&[("program", s.program)], misses);
            }
        }
    }
    {
        let mut f = e.family(
            "probe_errors_total",
            Kind::Counter,
            "Failures inside kernel programs, by kind (programs fail open).",
        );
        for (kind, n) in &p.errors {
            f.sample(&[("kind", kind)], n);
        }
    }
}

/// The bounded kernel maps: entries, capacity and evictions.
pub(super) fn maps(e: &mut Exposition, maps: &[crate::probes::MapStats]) {
    {
        let mut f = e.family(
            "map_entries",
            Kind::Gauge,
            "Entries in each bounded kernel map.",
        );
        for m in maps {
            f.sample(&[("map", m.map)], m.entries);
        }
    }
    {
        let mut f = e.family(
            "map_capacity",
            Kind::Gauge,
            "Capacity of each bounded kernel map.",
        );
        for m in maps {
            f.sample(&[("map", m.map)], m.capacity);
        }
    }
    {
        let mut f = e.family(
            "map_evictions_total",
            Kind::Counter,
            "Entries replaced while still live, in maps that count it (the LRU maps evict \
             silently; the connection map refuses rather than evicts).",
        );
        for m in maps {
            if let Some(n) = m.evictions {
                f.sample(&[("map", m.map)], n);
            }
        }
    }
}

/// The walk of the open sockets behind this scrape's byte and drop counters.
pub(super) fn open_sockets_walk(e: &mut Exposition, w: &crate::probes::WalkStats) {
    e.family(
        "open_sockets_walk_seconds",
        Kind::Gauge,
        "How long the last walk of the open sockets took (the map iterators, or the watched namespaces' socket tables where the kernel refuses them).",
    )
    .sample(&[], w.took.as_secs_f64());
    e.family(
        "open_sockets_walk_age_seconds",
        Kind::Gauge,
        "How old the walk of the open sockets behind this scrape's bytes_*_total and listen_drops_total is. A walk costing more than 1 ms runs in the background, at least once a second and at most 1/50 of a CPU (period: the larger of 1 s and 50 walks), while scrapes come; else each scrape walks.",
    )
    .sample(&[], w.age.as_secs_f64());
    e.family(
        "open_sockets_walk_background",
        Kind::Gauge,
        "1 when the open sockets are walked in the background rather than by each scrape.",
    )
    .sample(&[], u8::from(w.background));
}

/// The file workers that read brokers' own files (see `files::workers`).
pub(super) fn file_work(e: &mut Exposition, w: &crate::files::workers::WorkStats) {
    e.family(
        "file_workers",
        Kind::Gauge,
        "Threads reading brokers' own files (properties, log dirs).",
    )
    .sample(&[], w.threads);
    e.family(
        "file_workers_stalled",
        Kind::Gauge,
        "Reads of brokers' own files running past their deadline now: a hung filesystem holds them (see /ready `stalled`).",
    )
    .sample(&[], w.stalled);
    e.family(
        "file_work_timeouts_total",
        Kind::Counter,
        "Reads of brokers' own files that passed their deadline; the agent went on without them.",
    )
    .sample(&[], w.timeouts);
    e.family(
        "file_work_refused_total",
        Kind::Counter,
        "Reads of brokers' own files not started: an earlier one of the same process still ran, or every worker was busy.",
    )
    .sample(&[], w.refused);
}
