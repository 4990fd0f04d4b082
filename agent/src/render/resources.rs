//! The per-broker resource families: kernel counters of each running broker (CPU, context
//! switches, run-queue latency, block I/O, fsync) and its /proc and cgroup figures (faults,
//! memory, descriptors, threads, storage bytes, pressure stalls).

use brokerscope_common::resources::ResourceCounters;

use super::text::{Exposition, Kind, Number};
use crate::{model::Snapshot, usage::ProcStats};

/// A running broker's kernel counters, by broker id.
type Kernel<'a> = [(&'a str, &'a ResourceCounters)];

/// Per-broker resources: kernel counters (by the broker's current pid) and /proc figures.
pub(super) fn resources(e: &mut Exposition, snapshot: &Snapshot) {
    let kernel = kernel_counters(snapshot);
    scheduler(e, &kernel);
    disk(e, &kernel);
    let procs = &snapshot.procs;
    page_faults(e, procs);
    proc_figures(e, procs);
    pressure(e, procs);
}

/// The kernel counters of each running broker, found by its current pid.
fn kernel_counters(snapshot: &Snapshot) -> Vec<(&str, &ResourceCounters)> {
    let by_pid: std::collections::HashMap<u32, &str> = snapshot
        .brokers
        .iter()
        .filter(|b| b.is_running())
        .map(|b| (b.pid, b.id.as_str()))
        .collect();
    snapshot
        .probes
        .resources
        .iter()
        .filter_map(|(pid, c)| Some((*by_pid.get(pid)?, c)))
        .collect()
}

/// A counter with one sample per running broker, from its kernel counters.
fn counter(
    e: &mut Exposition,
    kernel: &Kernel<'_>,
    name: &str,
    help: &str,
    f: &dyn Fn(&ResourceCounters) -> Number,
) {
    let mut fam = e.family(name, Kind::Counter, help);
    for (id, c) in kernel {
        fam.sample(&[("broker", id)], f(c));
    }
}

/// The scheduler's families: on-CPU time, context switches, run-queue latency.
fn scheduler(e: &mut Exposition, kernel: &Kernel<'_>) {
    counter(
        e,
        kernel,
        "cpu_seconds_total",
        "On-CPU time of the broker's threads (sched_switch).",
        &|c| Number::Float(c.sched.on_cpu_ns as f64 / 1e9),
    );
    {
        let mut f = e.family(
            "context_switches_total",
            Kind::Counter,
            "Context switches of the broker's threads: voluntary (blocked or slept) or involuntary (preempted).",
        );
        for (id, c) in kernel {
            f.sample(&[("broker", id), ("kind", "voluntary")], c.sched.voluntary);
            f.sample(
                &[("broker", id), ("kind", "involuntary")],
                c.sched.involuntary,
            );
        }
    }
    {
        let mut f = e.family(
            "runqueue_latency_seconds",
            Kind::Histogram,
            "Time the broker's threads waited on a run queue, from wake-up or preemption to running.",
        );
        for (id, c) in kernel {
            f.log2_histogram(&[("broker", id)], &c.sched.runq, c.sched.runq_sum_us, 1);
        }
    }
}

/// The block I/O families: bytes read and written, request latency, fsync calls and duration.
fn disk(e: &mut Exposition, kernel: &Kernel<'_>) {
    counter(
        e,
        kernel,
        "disk_read_bytes_total",
        "Bytes of block read requests the broker issued (direct and synchronous reads).",
        &|c| Number::Int(c.io.read_bytes),
    );
    counter(
        e,
        kernel,
        "disk_written_bytes_total",
        "Bytes of block write requests the broker issued (direct I/O; page-cache writeback is issued by kernel threads).",
        &|c| Number::Int(c.io.written_bytes),
    );
    {
        let mut f = e.family(
            "disk_io_latency_seconds",
            Kind::Histogram,
            "Issue-to-completion latency of block requests the broker issued.",
        );
        for (id, c) in kernel {
            f.log2_histogram(&[("broker", id)], &c.io.io, c.io.io_sum_us, 1);
        }
    }
    counter(
        e,
        kernel,
        "fsync_total",
        "fsync and fdatasync calls (and msync(MS_SYNC), O_SYNC writes) the broker made, exact on \
         ext4, xfs and btrfs files (their fsync tracepoints; other filesystems are not measured, \
         see /v1/brokers' log_dir_fsync).",
        &|c| Number::Int(c.io.fsyncs),
    );
    {
        let mut f = e.family(
            "fsync_duration_seconds",
            Kind::Histogram,
            "Duration of the broker's fsync and fdatasync calls of ext4 files (xfs and btrfs \
             fsyncs are counted in fsync_total without a duration: their tracepoints have no \
             exit).",
        );
        for (id, c) in kernel {
            f.log2_histogram(&[("broker", id)], &c.io.fsync, c.io.fsync_sum_us, 1);
        }
    }
}

/// `page_faults_total`, major and minor, from /proc/<pid>/stat.
fn page_faults(e: &mut Exposition, procs: &[(String, ProcStats)]) {
    let mut f = e.family(
        "page_faults_total",
        Kind::Counter,
        "Page faults of the broker process (/proc/<pid>/stat): major needed I/O, minor did not.",
    );
    for (id, p) in procs {
        if let Some(v) = p.major_faults {
            f.sample(&[("broker", id), ("kind", "major")], v);
        }
        if let Some(v) = p.minor_faults {
            f.sample(&[("broker", id), ("kind", "minor")], v);
        }
    }
}

/// Reads one figure from a broker's /proc and cgroup stats, when it could be read.
type Getter = fn(&ProcStats) -> Option<u64>;

/// The /proc and cgroup figures with one sample per broker: name, type, help, value (none when
/// it could not be read).
const PROC_FIGURES: [(&str, Kind, &str, Getter); 7] = [
    (
        "memory_rss_bytes",
        Kind::Gauge,
        "Resident set size of the broker process.",
        |p| p.rss_bytes,
    ),
    (
        "open_fds",
        Kind::Gauge,
        "Open file descriptors of the broker process.",
        |p| p.open_fds,
    ),
    (
        "max_fds",
        Kind::Gauge,
        "Soft limit on the broker's open file descriptors.",
        |p| p.max_fds,
    ),
    (
        "threads",
        Kind::Gauge,
        "Threads of the broker process.",
        |p| p.threads,
    ),
    (
        "storage_read_bytes_total",
        Kind::Counter,
        "Bytes the broker made the storage layer read (/proc/<pid>/io read_bytes).",
        |p| p.storage_read_bytes,
    ),
    (
        "storage_written_bytes_total",
        Kind::Counter,
        "Bytes the broker made the storage layer write, writeback included (/proc/<pid>/io write_bytes).",
        |p| p.storage_written_bytes,
    ),
    (
        "cgroup_memory_bytes",
        Kind::Gauge,
        "memory.current of the broker's cgroup v2.",
        |p| p.cgroup_memory_bytes,
    ),
];

/// The /proc and cgroup figures of each broker that has them.
fn proc_figures(e: &mut Exposition, procs: &[(String, ProcStats)]) {
    for (name, kind, help, get) in PROC_FIGURES {
        let mut f = e.family(name, kind, help);
        for (id, p) in procs {
            if let Some(v) = get(p) {
                f.sample(&[("broker", id)], v);
            }
        }
    }
}

/// `pressure_stall_seconds_total`: the broker cgroup's PSI totals.
fn pressure(e: &mut Exposition, procs: &[(String, ProcStats)]) {
    let mut f = e.family(
        "pressure_stall_seconds_total",
        Kind::Counter,
        "Time tasks of the broker's cgroup v2 stalled on a resource (PSI total): some or all (full) of them.",
    );
    for (id, p) in procs {
        for (resource, kind, secs) in &p.pressure {
            f.sample(
                &[("broker", id), ("resource", resource), ("kind", kind)],
                secs,
            );
        }
    }
}
