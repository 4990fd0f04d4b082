//! Renders a [`Snapshot`] (and the endpoint's own [`ServerSnapshot`]) as Prometheus text
//! exposition format 0.0.4, or as OpenMetrics 1.0.0.
//!
//! Pure: takes a snapshot, returns text. Each family gets its HELP and TYPE once, label values
//! are escaped, and output order is stable (sorted keys) so scrapes diff cleanly.

use std::fmt::Write as _;

#[cfg(test)]
mod client_eval;

use brokerscope_common::sockets::log2_bucket_upper_us;

use crate::stats::{DURATION_BUCKETS, ServerSnapshot};
use crate::{broker::ListenerIndex, model::Snapshot, probes::sockets::ListenerStats};

/// `Content-Type` of the text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of OpenMetrics.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The two exposition formats. They differ in three places: the content type, counters'
/// metadata lines (OpenMetrics names the family without `_total`; samples keep it), and the
/// `# EOF` terminator OpenMetrics requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Prometheus,
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => PROMETHEUS_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

const PREFIX: &str = "brokerscope_";

/// Builds the exposition text one family at a time.
struct Exposition {
    out: String,
    format: Format,
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: Kind, help: &str) -> Family<'_> {
        let (kind, meta_name) = match kind {
            Kind::Counter if self.format == Format::OpenMetrics => {
                ("counter", name.strip_suffix("_total").unwrap_or(name))
            }
            Kind::Counter => ("counter", name),
            Kind::Gauge => ("gauge", name),
            Kind::Histogram => ("histogram", name),
        };
        let _ = writeln!(self.out, "# HELP {PREFIX}{meta_name} {help}");
        let _ = writeln!(self.out, "# TYPE {PREFIX}{meta_name} {kind}");
        Family {
            out: &mut self.out,
            name: format!("{PREFIX}{name}"),
        }
    }
}

/// A family's samples. Written with `push_str` and a hand-rolled integer formatter, not
/// `write!`: a page with ten brokers has about 3000 lines, most of them histogram buckets.
struct Family<'a> {
    out: &'a mut String,
    /// The metric name with its prefix.
    name: String,
}

/// A sample's value as the exposition text writes it.
trait SampleValue {
    fn write_to(&self, out: &mut String);
}

macro_rules! unsigned_sample {
    ($($t:ty),*) => {$(
        impl SampleValue for $t {
            fn write_to(&self, out: &mut String) {
                write_u64(out, u64::from(*self));
            }
        }
    )*};
}
unsigned_sample!(u8, u16, u32, u64);

impl SampleValue for usize {
    fn write_to(&self, out: &mut String) {
        write_u64(out, *self as u64);
    }
}

impl SampleValue for i32 {
    fn write_to(&self, out: &mut String) {
        if *self < 0 {
            out.push('-');
        }
        write_u64(out, u64::from(self.unsigned_abs()));
    }
}

impl SampleValue for i64 {
    fn write_to(&self, out: &mut String) {
        if *self < 0 {
            out.push('-');
        }
        write_u64(out, self.unsigned_abs());
    }
}

impl SampleValue for f64 {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl<T: SampleValue + ?Sized> SampleValue for &T {
    fn write_to(&self, out: &mut String) {
        (**self).write_to(out);
    }
}

/// An integer or a float, for code that picks per family.
#[derive(Clone, Copy)]
enum Number {
    Int(u64),
    Float(f64),
}

impl SampleValue for Number {
    fn write_to(&self, out: &mut String) {
        match self {
            Number::Int(n) => n.write_to(out),
            Number::Float(x) => x.write_to(out),
        }
    }
}

/// Decimal digits of `n`.
fn write_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits only.
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or("0"));
}

impl Family<'_> {
    fn sample(&mut self, labels: &[(&str, &str)], value: impl SampleValue) -> &mut Self {
        self.sample_suffixed("", labels, value)
    }

    /// A log2 histogram in microseconds as a Prometheus histogram in seconds: cumulative
    /// `_bucket{le}` at every `stride`-th bucket boundary (plus `+Inf`), `_sum`, `_count`.
    fn log2_histogram(
        &mut self,
        labels: &[(&str, &str)],
        buckets: &[u64],
        sum_us: u64,
        stride: usize,
    ) -> &mut Self {
        // Everything up to the `le` value is the same on every bucket line: written once.
        let mut head = String::with_capacity(160);
        head.push_str(&self.name);
        head.push_str("_bucket{");
        write_labels(&mut head, labels);
        if !labels.is_empty() {
            head.push(',');
        }
        head.push_str("le=\"");
        let bucket = |out: &mut String, le: &str, count: u64| {
            out.push_str(&head);
            out.push_str(le);
            out.push_str("\"} ");
            write_u64(out, count);
            out.push('\n');
        };
        let mut cumulative = 0u64;
        for (i, n) in buckets.iter().enumerate() {
            cumulative += n;
            // The last bucket is open-ended: it only appears as +Inf.
            if i + 1 < buckets.len() && (i + 1) % stride == 0 {
                bucket(self.out, bucket_le(i), cumulative);
            }
        }
        bucket(self.out, "+Inf", cumulative);
        self.sample_suffixed("_sum", labels, sum_us as f64 / 1e6);
        self.sample_suffixed("_count", labels, cumulative)
    }

    /// A sample of the family's `_bucket`, `_sum` or `_count` series (histograms).
    fn sample_suffixed(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        value: impl SampleValue,
    ) -> &mut Self {
        self.out.push_str(&self.name);
        self.out.push_str(suffix);
        if !labels.is_empty() {
            self.out.push('{');
            write_labels(self.out, labels);
            self.out.push('}');
        }
        self.out.push(' ');
        value.write_to(self.out);
        self.out.push('\n');
        self
    }
}

/// `k="v",...` with escaped values, without braces.
fn write_labels(out: &mut String, labels: &[(&str, &str)]) {
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape_label(out, v);
        out.push('"');
    }
}

/// The `le` of log2 bucket `i` (its upper bound) in seconds, formatted once per process.
fn bucket_le(i: usize) -> &'static str {
    static LE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    LE.get_or_init(|| {
        // 1 << 63 is the largest bound a u64 holds.
        (0..63)
            .map(|i| (log2_bucket_upper_us(i) as f64 / 1e6).to_string())
            .collect()
    })
    .get(i)
    .map_or("+Inf", String::as_str)
}

/// Label values escape backslash, double quote and newline (exposition format spec).
fn escape_label(out: &mut String, value: &str) {
    if !value.contains(['\\', '"', '\n']) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The agent's families in the Prometheus text format (without the endpoint's own).
#[cfg(test)]
pub fn prometheus(snapshot: &Snapshot) -> String {
    let mut e = Exposition {
        out: String::with_capacity(4096),
        format: Format::Prometheus,
    };
    agent_families(&mut e, snapshot);
    e.out
}

/// The whole /metrics page in `format`.
pub fn exposition(snapshot: &Snapshot, server: &ServerSnapshot, format: Format) -> String {
    // Sized from the last page: growing a string of hundreds of kilobytes by doubling copies
    // it a dozen times.
    static LAST_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(8192);
    let mut e = Exposition {
        out: String::with_capacity(LAST_LEN.load(std::sync::atomic::Ordering::Relaxed) + 4096),
        format,
    };
    agent_families(&mut e, snapshot);
    server_families(&mut e, server);
    if format == Format::OpenMetrics {
        e.out.push_str("# EOF\n");
    }
    LAST_LEN.store(e.out.len(), std::sync::atomic::Ordering::Relaxed);
    e.out
}

/// `at` as Unix seconds (fractions kept).
fn unix_seconds(at: std::time::SystemTime) -> f64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn agent_families(e: &mut Exposition, snapshot: &Snapshot) {
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
    {
        let mut f = e.family(
            "map_entries",
            Kind::Gauge,
            "Entries in each bounded kernel map.",
        );
        for m in &p.maps {
            f.sample(&[("map", m.map)], m.entries);
        }
    }
    {
        let mut f = e.family(
            "map_capacity",
            Kind::Gauge,
            "Capacity of each bounded kernel map.",
        );
        for m in &p.maps {
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
        for m in &p.maps {
            if let Some(n) = m.evictions {
                f.sample(&[("map", m.map)], n);
            }
        }
    }

    if let Some(w) = &p.walk {
        open_sockets_walk(e, w);
    }
    file_work(e, &snapshot.file_work);
    brokers(e, &snapshot.brokers);
    broker_states(e, &snapshot.broker_states);
    pod_listeners(e, &snapshot.pod_listeners);
    resources(e, snapshot);
    listeners(e, &p.listeners, &ListenerIndex::new(&snapshot.brokers));
}

/// The walk of the open sockets behind this scrape's byte and drop counters.
fn open_sockets_walk(e: &mut Exposition, w: &crate::probes::WalkStats) {
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
fn file_work(e: &mut Exposition, w: &crate::files::workers::WorkStats) {
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

type CounterOf = fn(&ListenerStats) -> u64;

/// Labels of one listener: `broker`, `listener`, `port` when a running broker owns it; `netns`
/// and `port` otherwise (only in watch-all mode, which counts every listener on the node).
fn listener_labels(l: &ListenerStats, index: &ListenerIndex) -> Vec<(&'static str, String)> {
    let port = ("port", l.key.port.to_string());
    match index.get(l.key.netns, l.key.port) {
        Some((broker, listener)) => {
            vec![
                ("broker", broker.to_string()),
                ("listener", listener.to_string()),
                port,
            ]
        }
        None => vec![("netns", l.key.netns.to_string()), port],
    }
}

fn as_refs<'a>(labels: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The listener families with one sample per listener: name, type, help, value.
const LISTENER_SCALARS: [(&str, Kind, &str, CounterOf); 8] = [
    (
        "connections_accepted_total",
        Kind::Counter,
        "TCP connections accepted (passive opens) on the listener.",
        |l| l.counters.accepted,
    ),
    (
        "connections_active",
        Kind::Gauge,
        "Connections on the listener open now (accepted or found open at start, not closed).",
        |l| l.counters.active(),
    ),
    (
        "connections_closed_total",
        Kind::Counter,
        "Tracked connections on the listener that have closed.",
        |l| l.counters.closed,
    ),
    (
        "bytes_received_total",
        Kind::Counter,
        "Payload bytes received on the listener's connections (SYN/FIN excluded): exact for closed connections; open ones as of the last walk of the open sockets (see brokerscope_open_sockets_walk_age_seconds).",
        |l| l.bytes_received,
    ),
    (
        "bytes_sent_total",
        Kind::Counter,
        "Payload bytes sent and acknowledged on the listener's connections (SYN/FIN excluded): exact for closed connections; open ones as of the last walk of the open sockets (see brokerscope_open_sockets_walk_age_seconds).",
        |l| l.bytes_sent,
    ),
    (
        "tcp_retransmits_total",
        Kind::Counter,
        "Segments retransmitted on the listener's connections.",
        |l| l.counters.retransmits,
    ),
    (
        "tcp_resets_sent_total",
        Kind::Counter,
        "RSTs sent on the listener's connections.",
        |l| l.counters.resets_sent,
    ),
    (
        "tcp_resets_received_total",
        Kind::Counter,
        "RSTs received on the listener's connections.",
        |l| l.counters.resets_received,
    ),
];

const LISTEN_DROPS_HELP: &str = "Connections dropped by the listening socket (SYN or accept \
     queue overflow), as the socket counts them since it started listening, as of the last walk \
     of the open sockets.";
const RTT_HELP: &str = "Smoothed RTT of the listener's connections, observed when each closes.";
const DURATION_HELP: &str =
    "Lifetime of the listener's accepted connections, observed when each closes.";

/// Per-listener socket families.
fn listeners(e: &mut Exposition, listeners: &[ListenerStats], index: &ListenerIndex) {
    let owned: Vec<Vec<(&'static str, String)>> = listeners
        .iter()
        .map(|l| listener_labels(l, index))
        .collect();
    let labels: Vec<Vec<(&'static str, &str)>> = owned.iter().map(|l| as_refs(l)).collect();
    for (name, kind, help, value) in LISTENER_SCALARS {
        let mut f = e.family(name, kind, help);
        for (l, labels) in listeners.iter().zip(&labels) {
            f.sample(labels, value(l));
        }
    }
    {
        let mut f = e.family("listen_drops_total", Kind::Counter, LISTEN_DROPS_HELP);
        for (l, labels) in listeners.iter().zip(&labels) {
            if let Some(drops) = l.listen_drops {
                f.sample(labels, drops);
            }
        }
    }
    {
        let mut f = e.family("tcp_rtt_seconds", Kind::Histogram, RTT_HELP);
        for (l, labels) in listeners.iter().zip(&labels) {
            let c = &l.counters;
            f.log2_histogram(labels, &c.rtt, c.rtt_sum_us, 1);
        }
    }
    {
        let mut f = e.family(
            "connection_duration_seconds",
            Kind::Histogram,
            DURATION_HELP,
        );
        for (l, labels) in listeners.iter().zip(&labels) {
            let c = &l.counters;
            f.log2_histogram(labels, &c.duration, c.duration_sum_us, 2);
        }
    }
}

/// `broker_info` for running brokers; `broker_restarts_total` for every tracked broker (a
/// stopped broker keeps its count so it stays monotonic across the restart).
fn brokers(e: &mut Exposition, brokers: &[crate::broker::Broker]) {
    {
        let mut f = e.family(
            "broker_info",
            Kind::Gauge,
            "1 per running broker: its process, pod, network namespace inode and cgroup v2 path.",
        );
        for b in brokers.iter().filter(|b| b.is_running()) {
            let pid = b.pid.to_string();
            let netns = b.netns.map(|n| n.to_string()).unwrap_or_default();
            f.sample(
                &[
                    ("broker", &b.id),
                    ("pid", &pid),
                    ("pod", b.pod.as_deref().unwrap_or("")),
                    ("netns", &netns),
                    ("cgroup", b.cgroup.path.as_deref().unwrap_or("")),
                ],
                1,
            );
        }
    }
    let mut f = e.family(
        "broker_restarts_total",
        Kind::Counter,
        "Times a new process took over a broker id since the agent started.",
    );
    for b in brokers {
        f.sample(&[("broker", &b.id)], b.restarts);
    }
}

/// `broker_state`: Strimzi's number for every tracked broker (0 once stopped).
fn broker_states(e: &mut Exposition, states: &[(String, u8)]) {
    let mut f = e.family(
        "broker_state",
        Kind::Gauge,
        "Kafka broker state derived from the kernel, in Strimzi's numbering: 0 not running, \
         1 starting, 2 recovery, 3 running, 6 pending controlled shutdown, 7 shutting down, \
         127 unknown.",
    );
    for (id, n) in states {
        f.sample(&[("broker", id)], n);
    }
}

/// `pod_listener`: each broker's listener in its pod (`server.pod_listeners`), 1 in its state.
fn pod_listeners(e: &mut Exposition, all: &[(String, crate::model::PodListener)]) {
    let mut f = e.family(
        "pod_listener",
        Kind::Gauge,
        "A broker's listener in its own pod's network namespace: 1 in its state (serving, \
         port_taken: left to whoever holds the port, failed: retried).",
    );
    for (id, listener) in all {
        f.sample(
            &[
                ("broker", id),
                ("pod", listener.pod()),
                ("state", listener.state()),
            ],
            1u8,
        );
    }
}

/// Per-broker resources: kernel counters (by the broker's current pid) and /proc figures.
fn resources(e: &mut Exposition, snapshot: &Snapshot) {
    use brokerscope_common::resources::ResourceCounters;
    let by_pid: std::collections::HashMap<u32, &str> = snapshot
        .brokers
        .iter()
        .filter(|b| b.is_running())
        .map(|b| (b.pid, b.id.as_str()))
        .collect();
    let kernel: Vec<(&str, &ResourceCounters)> = snapshot
        .probes
        .resources
        .iter()
        .filter_map(|(pid, c)| Some((*by_pid.get(pid)?, c)))
        .collect();
    let counter =
        |e: &mut Exposition, name: &str, help: &str, f: &dyn Fn(&ResourceCounters) -> Number| {
            let mut fam = e.family(name, Kind::Counter, help);
            for (id, c) in &kernel {
                fam.sample(&[("broker", id)], f(c));
            }
        };
    counter(
        e,
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
        for (id, c) in &kernel {
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
        for (id, c) in &kernel {
            f.log2_histogram(&[("broker", id)], &c.sched.runq, c.sched.runq_sum_us, 1);
        }
    }
    counter(
        e,
        "disk_read_bytes_total",
        "Bytes of block read requests the broker issued (direct and synchronous reads).",
        &|c| Number::Int(c.io.read_bytes),
    );
    counter(
        e,
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
        for (id, c) in &kernel {
            f.log2_histogram(&[("broker", id)], &c.io.io, c.io.io_sum_us, 1);
        }
    }
    counter(
        e,
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
        for (id, c) in &kernel {
            f.log2_histogram(&[("broker", id)], &c.io.fsync, c.io.fsync_sum_us, 1);
        }
    }
    let procs = &snapshot.procs;
    {
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
    type Getter = fn(&crate::usage::ProcStats) -> Option<u64>;
    let gauges: [(&str, Kind, &str, Getter); 7] = [
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
    for (name, kind, help, get) in gauges {
        let mut f = e.family(name, kind, help);
        for (id, p) in procs {
            if let Some(v) = get(p) {
                f.sample(&[("broker", id)], v);
            }
        }
    }
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

/// The endpoint's own families: its requests, connections and TLS material.
fn server_families(e: &mut Exposition, s: &ServerSnapshot) {
    {
        let mut f = e.family(
            "http_requests_total",
            Kind::Counter,
            "Requests answered by the endpoint, by route template (`other` when none matched) and status code.",
        );
        for (path, code, n) in &s.requests {
            f.sample(&[("path", path), ("code", &code.to_string())], n);
        }
    }
    {
        let mut f = e.family(
            "http_request_duration_seconds",
            Kind::Histogram,
            "Time from request to response headers, by route template.",
        );
        for (path, h) in &s.durations {
            let mut cumulative = 0;
            for (i, count) in h.counts.iter().enumerate() {
                cumulative += count;
                let le = DURATION_BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), |b| format!("{b:?}"));
                f.sample_suffixed("_bucket", &[("path", path), ("le", &le)], cumulative);
            }
            f.sample_suffixed("_sum", &[("path", path)], h.sum);
            f.sample_suffixed("_count", &[("path", path)], cumulative);
        }
    }
    e.family(
        "http_connections_active",
        Kind::Gauge,
        "Connections to the endpoint being served (handshaking included).",
    )
    .sample(&[], s.connections_active);
    e.family(
        "http_connections_pending",
        Kind::Gauge,
        "Connections to the endpoint still in the TLS handshake (no verified client certificate yet).",
    )
    .sample(&[], s.connections_pending);
    e.family(
        "http_connections_rejected_total",
        Kind::Counter,
        "Connections closed because a connection limit was reached: handshakes shed (per peer or in total) and authenticated connections over the cap.",
    )
    .sample(&[], s.connections_rejected);
    {
        let mut f = e.family(
            "tls_handshake_failures_total",
            Kind::Counter,
            "Connections that ended without completing the TLS handshake with a verified client certificate, by reason.",
        );
        for (reason, n) in &s.handshake_failures {
            f.sample(&[("reason", reason)], n);
        }
    }
    e.family(
        "tls_cert_expiry_timestamp_seconds",
        Kind::Gauge,
        "notAfter of the server certificate in use, Unix seconds.",
    )
    .sample(&[], s.tls_cert_expiry);
    e.family(
        "tls_reloads_total",
        Kind::Counter,
        "Changed TLS material loaded and put in use without a restart.",
    )
    .sample(&[], s.tls_reloads);
    e.family(
        "tls_reload_failures_total",
        Kind::Counter,
        "Changed TLS material refused (the previous material stays in use).",
    )
    .sample(&[], s.tls_reload_failures);
    e.family(
        "config_generation",
        Kind::Gauge,
        "Live configuration changes accepted since start (PATCH /v1/config, config file reloads).",
    )
    .sample(&[], s.config_generation);
    e.family(
        "events_dropped_total",
        Kind::Counter,
        "Events a slow /v1/events subscriber lost (each told by a `dropped` event).",
    )
    .sample(&[], s.events_dropped);
    e.family(
        "log_lines_dropped_total",
        Kind::Counter,
        "Log lines pushed out of the in-memory ring behind /v1/logs.",
    )
    .sample(&[], s.log_lines_dropped);
}

#[cfg(test)]
mod tests {
    use brokerscope_common::sockets::{ListenerCounters, ListenerKey};

    use super::*;
    use crate::{
        model::Readiness,
        probes::{Attachment, MapStats, ProbeSnapshot, ProgramStats, sockets::ListenerStats},
    };

    fn snapshot() -> Snapshot {
        Snapshot {
            readiness: Some(Readiness {
                ready: true,
                reasons: vec![],
                degraded: vec![],
                missing: vec![],
                hooks: vec![],
                standby: vec![],
                stalled: vec![],
            }),
            attached: vec![Attachment {
                program: "sock_state",
                hook: "tracepoint/sock/inet_sock_set_state",
                id: 7,
                scope: "broker-only",
            }],
            probes: ProbeSnapshot {
                walk: None,
                listeners: vec![ListenerStats {
                    key: ListenerKey::new(4026531840, 9092),
                    counters: {
                        let mut c = ListenerCounters {
                            accepted: 10,
                            closed: 4,
                            untracked: 1,
                            bytes_received: 1000,
                            bytes_sent: 65536,
                            retransmits: 3,
                            resets_sent: 2,
                            resets_received: 1,
                            rtt_sum_us: 300,
                            duration_sum_us: 3_000_000,
                            ..ListenerCounters::ZERO
                        };
                        // RTTs of 40, 100 and 160 µs: log2 buckets 5, 6 and 7.
                        c.rtt[5] = 1;
                        c.rtt[6] = 1;
                        c.rtt[7] = 1;
                        // Lifetimes of 1 s, 1 s, 1 s and one open-ended.
                        c.duration[19] = 3;
                        c.duration[39] = 1;
                        c
                    },
                    // Closed connections' 1000/65536 plus what open ones moved.
                    bytes_received: 1500,
                    bytes_sent: 70000,
                    listen_drops: Some(9),
                }],
                programs: vec![ProgramStats {
                    program: "sock_state",
                    events: 123,
                    run_time: std::time::Duration::from_micros(1500),
                    misses: Some(2),
                }],
                errors: vec![("connections_map_full", 1)],
                maps: vec![
                    MapStats {
                        map: "connections",
                        entries: 5,
                        capacity: 64,
                        evictions: None,
                    },
                    MapStats {
                        map: "threads",
                        entries: 7,
                        capacity: 16384,
                        evictions: Some(3),
                    },
                ],
                resources: vec![],
                counting_since: Some((
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
                    true,
                )),
            },
            ..Snapshot::default()
        }
    }

    #[test]
    fn sample_values_print_as_the_format_wants() {
        let text = |v: &dyn Fn(&mut String)| {
            let mut out = String::new();
            v(&mut out);
            out
        };
        assert_eq!(text(&|o| 0u64.write_to(o)), "0");
        assert_eq!(text(&|o| u64::MAX.write_to(o)), "18446744073709551615");
        assert_eq!(text(&|o| 1_000_000u32.write_to(o)), "1000000");
        assert_eq!(text(&|o| (-42i64).write_to(o)), "-42");
        assert_eq!(text(&|o| i64::MIN.write_to(o)), "-9223372036854775808");
        assert_eq!(text(&|o| 0.0015f64.write_to(o)), "0.0015");
        let seven = 7u8;
        assert_eq!(text(&|o| SampleValue::write_to(&&seven, o)), "7");
    }

    #[test]
    fn renders_broker_info_and_restarts() {
        use crate::broker::{BrokerState, tests::broker};
        let mut running = broker("1", 4242, 4026532000, &[("PLAINTEXT", 9092)]);
        running.pod = Some("kafka-1".into());
        running.cgroup.path = Some("/kubepods/pod\"x\"".into());
        running.restarts = 2;
        let mut stopped = broker("2", 77, 4026532001, &[]);
        stopped.state = BrokerState::NotRunning;
        stopped.restarts = 1;
        let text = prometheus(&Snapshot {
            brokers: vec![running, stopped],
            ..snapshot()
        });
        let info: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("brokerscope_broker_info{"))
            .collect();
        assert_eq!(
            info,
            vec![
                r#"brokerscope_broker_info{broker="1",pid="4242",pod="kafka-1",netns="4026532000",cgroup="/kubepods/pod\"x\""} 1"#
            ]
        );
        for line in [
            r#"brokerscope_broker_restarts_total{broker="1"} 2"#,
            r#"brokerscope_broker_restarts_total{broker="2"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }

    #[test]
    fn renders_listener_counters_exactly() {
        let text = prometheus(&snapshot());
        for line in [
            r#"brokerscope_connections_accepted_total{netns="4026531840",port="9092"} 10"#,
            r#"brokerscope_connections_active{netns="4026531840",port="9092"} 5"#,
            r#"brokerscope_connections_closed_total{netns="4026531840",port="9092"} 4"#,
            r#"brokerscope_probe_attached{program="sock_state",hook="tracepoint/sock/inet_sock_set_state"} 1"#,
            r#"brokerscope_probe_events_total{program="sock_state"} 123"#,
            r#"brokerscope_probe_misses_total{program="sock_state"} 2"#,
            r#"brokerscope_probe_run_seconds_total{program="sock_state"} 0.0015"#,
            r#"brokerscope_probe_errors_total{kind="connections_map_full"} 1"#,
            r#"brokerscope_map_entries{map="connections"} 5"#,
            r#"brokerscope_map_capacity{map="connections"} 64"#,
            r#"brokerscope_map_evictions_total{map="threads"} 3"#,
            "brokerscope_agent_ready 1",
            r#"brokerscope_counters_start_time_seconds{pinned="true"} 1700000000"#,
            r#"brokerscope_bytes_received_total{netns="4026531840",port="9092"} 1500"#,
            r#"brokerscope_bytes_sent_total{netns="4026531840",port="9092"} 70000"#,
            r#"brokerscope_listen_drops_total{netns="4026531840",port="9092"} 9"#,
            r#"brokerscope_tcp_retransmits_total{netns="4026531840",port="9092"} 3"#,
            r#"brokerscope_tcp_resets_sent_total{netns="4026531840",port="9092"} 2"#,
            r#"brokerscope_tcp_resets_received_total{netns="4026531840",port="9092"} 1"#,
            // Bucket 5 is [32, 64) µs: le = 64 µs.
            r#"brokerscope_tcp_rtt_seconds_bucket{netns="4026531840",port="9092",le="0.000032"} 0"#,
            r#"brokerscope_tcp_rtt_seconds_bucket{netns="4026531840",port="9092",le="0.000064"} 1"#,
            r#"brokerscope_tcp_rtt_seconds_bucket{netns="4026531840",port="9092",le="0.000128"} 2"#,
            r#"brokerscope_tcp_rtt_seconds_bucket{netns="4026531840",port="9092",le="0.000256"} 3"#,
            r#"brokerscope_tcp_rtt_seconds_bucket{netns="4026531840",port="9092",le="+Inf"} 3"#,
            r#"brokerscope_tcp_rtt_seconds_sum{netns="4026531840",port="9092"} 0.0003"#,
            r#"brokerscope_tcp_rtt_seconds_count{netns="4026531840",port="9092"} 3"#,
            // Bucket 19 is [0.52, 1.05) s; every other boundary is rendered.
            r#"brokerscope_connection_duration_seconds_bucket{netns="4026531840",port="9092",le="0.262144"} 0"#,
            r#"brokerscope_connection_duration_seconds_bucket{netns="4026531840",port="9092",le="1.048576"} 3"#,
            r#"brokerscope_connection_duration_seconds_bucket{netns="4026531840",port="9092",le="+Inf"} 4"#,
            r#"brokerscope_connection_duration_seconds_count{netns="4026531840",port="9092"} 4"#,
            r#"brokerscope_connection_duration_seconds_sum{netns="4026531840",port="9092"} 3"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        // A map that does not count evictions has no such series, rather than a zero.
        assert!(!text.contains(r#"brokerscope_map_evictions_total{map="connections"}"#));
    }

    #[test]
    fn every_family_has_help_and_type_once() {
        let text = prometheus(&snapshot());
        let mut types = std::collections::HashSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(types.insert(name.to_string()), "duplicate TYPE for {name}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| types.contains(*f)))
                .unwrap_or(name);
            assert!(types.contains(family), "sample {name} without TYPE");
        }
    }

    fn server_snapshot() -> ServerSnapshot {
        use crate::stats::Failure;
        let stats = crate::stats::ServerStats::default();
        stats.record("/metrics", 200, std::time::Duration::from_millis(3));
        stats.record("/metrics", 200, std::time::Duration::from_millis(30));
        stats.record("other", 404, std::time::Duration::from_micros(100));
        stats
            .tls_cert_expiry
            .store(1_900_000_000, std::sync::atomic::Ordering::Relaxed);
        stats
            .tls_reload_failures
            .store(2, std::sync::atomic::Ordering::Relaxed);
        for failure in [
            Failure::NoCertificate,
            Failure::NoCertificate,
            Failure::ShedPerPeer,
        ] {
            stats.handshake_failed(failure);
        }
        stats.snapshot()
    }

    #[test]
    fn renders_the_endpoint_families_exactly() {
        let text = exposition(&snapshot(), &server_snapshot(), Format::Prometheus);
        for line in [
            "# TYPE brokerscope_http_requests_total counter",
            r#"brokerscope_http_requests_total{path="/metrics",code="200"} 2"#,
            r#"brokerscope_http_requests_total{path="other",code="404"} 1"#,
            "# TYPE brokerscope_http_request_duration_seconds histogram",
            r#"brokerscope_http_request_duration_seconds_bucket{path="/metrics",le="0.001"} 0"#,
            r#"brokerscope_http_request_duration_seconds_bucket{path="/metrics",le="0.005"} 1"#,
            r#"brokerscope_http_request_duration_seconds_bucket{path="/metrics",le="0.05"} 2"#,
            r#"brokerscope_http_request_duration_seconds_bucket{path="/metrics",le="10.0"} 2"#,
            r#"brokerscope_http_request_duration_seconds_bucket{path="/metrics",le="+Inf"} 2"#,
            r#"brokerscope_http_request_duration_seconds_sum{path="/metrics"} 0.033"#,
            r#"brokerscope_http_request_duration_seconds_count{path="/metrics"} 2"#,
            r#"brokerscope_http_request_duration_seconds_count{path="other"} 1"#,
            "brokerscope_tls_cert_expiry_timestamp_seconds 1900000000",
            "brokerscope_tls_reload_failures_total 2",
            "brokerscope_tls_reloads_total 0",
            "brokerscope_http_connections_rejected_total 1",
            "brokerscope_http_connections_pending 0",
            "# TYPE brokerscope_tls_handshake_failures_total counter",
            r#"brokerscope_tls_handshake_failures_total{reason="timeout"} 0"#,
            r#"brokerscope_tls_handshake_failures_total{reason="no_certificate"} 2"#,
            r#"brokerscope_tls_handshake_failures_total{reason="shed_per_peer"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn openmetrics_names_counter_families_without_total_and_ends_with_eof() {
        let text = exposition(&snapshot(), &server_snapshot(), Format::OpenMetrics);
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        for line in [
            "# TYPE brokerscope_http_requests counter",
            "# HELP brokerscope_http_requests Requests answered by the endpoint, by route template (`other` when none matched) and status code.",
            r#"brokerscope_http_requests_total{path="/metrics",code="200"} 2"#,
            "# TYPE brokerscope_probe_events counter",
            r#"brokerscope_probe_events_total{program="sock_state"} 123"#,
            "# TYPE brokerscope_tls_reload_failures counter",
            "brokerscope_tls_reload_failures_total 2",
            "# TYPE brokerscope_connections_accepted counter",
            "# TYPE brokerscope_connections_active gauge",
            "# TYPE brokerscope_http_request_duration_seconds histogram",
            "# TYPE brokerscope_tls_cert_expiry_timestamp_seconds gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        // No metadata line names a counter family with its sample suffix.
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(!name.ends_with("_total"), "{line}");
        }
        // The same samples as the text format, in the same order.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(String::from)
                .collect()
        };
        let plain = exposition(&snapshot(), &server_snapshot(), Format::Prometheus);
        assert_eq!(samples(&text), samples(&plain));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        escape_label(&mut out, "a\"b\\c\nd");
        assert_eq!(out, r#"a\"b\\c\nd"#);
    }
}
