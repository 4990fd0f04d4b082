//! `cargo xtask bench --soak`: months on a node, compressed into minutes (docs/performance.md).
//! Short connections at 10k/s through two brokers on loopback, a broker pod restarted again and
//! again in a fresh network namespace, a scrape every second, and the agent killed with SIGKILL
//! halfway and started again on the same config and pins. What the agent holds (RSS, fds,
//! threads, map fill and evictions, series, `/metrics` bytes, CPU) is sampled every second,
//! plotted, and given a verdict: flat, or grows. A report, not a test: nothing here fails on a
//! figure, only on the machinery.
//!
//! The soak's agent pins, unlike the other benches' (its point is the restart): under a
//! directory of its own, removed when the soak ends, even on error. It owns
//! `target/bench/soak/` and the namespaces and veths named `bsk<pid>…`; nothing else.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::plot;
use crate::agent::{Agent, client_tls, curl};

/// Where the soak's agent pins: not the default, so a real agent on this node is never touched.
const PIN_DIR: &str = "/sys/fs/bpf/brokerscope-soak";
/// Connections per second the clients aim at, all together.
const TARGET_RATE: f64 = 10_000.0;
/// Client threads; each paces itself to its share of the target.
const CLIENTS: usize = 4;
/// A small request and its answer.
const REQUEST: usize = 64;
const ANSWER: usize = 16;
/// Broker start/stop cycles per minute of soak (300 in the default 10 minutes).
const CYCLES_PER_MINUTE: f64 = 30.0;
/// Connections to each restarted broker while it lives.
const CYCLE_CONNECTIONS: u32 = 100;
/// How long a stopped pod's namespace lingers before it is deleted (its broker and veth go at
/// once). Longer than the release grace: the kernel gives a new namespace the lowest free inode
/// number, so a namespace deleted at once hands its inode to the next pod, the agent (which
/// knows a listener as (namespace inode, port)) sees the same listener again, and the release
/// path is never taken (a 1-minute soak deleting at once saw 1 inode in 30 cycles). Lingering,
/// each stopped listener is a listener of its own until the agent has released it.
const NAMESPACE_LINGER: Duration = Duration::from_secs(RELEASE_SECONDS + 15);
/// `probes.listener_release_seconds` for the soak: shorter than the 300 s default so a stopped
/// broker's listeners are released within each agent life of a 10-minute soak, and the series
/// reach their steady state (about this many seconds' worth of stopped brokers) early.
const RELEASE_SECONDS: u64 = 60;
/// Samples before this are the warm-up, left out of the verdicts: the release grace plus the
/// time for the agent to settle (capped at 30% of a life for short runs).
const WARMUP_S: f64 = RELEASE_SECONDS as f64 + 30.0;
/// The node.id of the broker that restarts in new namespaces.
const CHURN_ID: &str = "100";
/// The load brokers: `workers` accepting threads each (0: a thread per connection, whose
/// threads come and go as the agent's `THREADS` map must follow).
const LOAD_BROKERS: [(&str, u32); 2] = [("1", 2), ("2", 0)];

/// `xtask bench-soak-broker`: serves on `addr` until killed. With `workers` > 0, that many
/// threads accept and serve one connection at a time (a Kafka broker's fixed network threads);
/// with 0, a thread per connection. Each connection: one request, its answer, then the
/// client's close. Prints `ready` once it listens.
pub fn serve_broker(addr: &str, workers: u32) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    if workers == 0 {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || serve(stream));
        }
        return Ok(());
    }
    let listener = Arc::new(listener);
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let listener = listener.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    serve(stream);
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn serve(mut stream: TcpStream) {
    let mut buf = [0u8; REQUEST];
    if stream.read_exact(&mut buf).is_ok() && stream.write_all(&[0u8; ANSWER]).is_ok() {
        // The client closes first, as Kafka's clients do: its side keeps the TIME_WAIT.
        let _ = stream.read(&mut buf);
    }
}

/// One connection, one request, its answer, closed by us.
fn request(addr: SocketAddr, connected: &AtomicU64) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    connected.fetch_add(1, Ordering::Relaxed);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; ANSWER];
    s.write_all(&[1u8; REQUEST]).is_ok() && s.read_exact(&mut buf).is_ok()
}

/// A broker process of the soak (`xtask bench-soak-broker`), killed when dropped.
struct Broker(Child);

impl Broker {
    /// Starts `program` (the broker, or `ip netns exec … broker`) and waits for its `ready`.
    fn start(
        mut cmd: Command,
        addr: &str,
        workers: u32,
        properties: &Path,
    ) -> anyhow::Result<Self> {
        let mut child = cmd
            .arg("bench-soak-broker")
            .arg(addr)
            .arg(workers.to_string())
            .arg("kafka.Kafka")
            .arg(properties)
            .stdout(Stdio::piped())
            .spawn()
            .context("start a soak broker")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let broker = Self(child);
        if line.trim() != "ready" {
            bail!("a soak broker did not start: {line:?}");
        }
        Ok(broker)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// This xtask binary as another process can exec it (`ip netns exec` resolves
/// `/proc/self/exe` to itself).
fn exe_for_others() -> PathBuf {
    PathBuf::from(format!("/proc/{}/exe", std::process::id()))
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    crate::cmd::run(Command::new("ip").args(args).stderr(Stdio::piped()))
}

/// A network namespace, loopback up; deleted when dropped, even on error.
struct NetNs(String);

impl NetNs {
    fn new(name: String) -> anyhow::Result<Self> {
        ip(&["netns", "add", &name])?;
        let ns = Self(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its inode: a listener is (namespace inode, port) to the agent, and the kernel reuses a
    /// freed namespace's inode number.
    fn inode(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(format!("/run/netns/{}", self.0))
            .ok()
            .map(|m| m.ino())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

/// The host side of a veth pair whose peer is in a namespace; deleted when dropped.
struct Veth(String);

impl Veth {
    fn new(
        ns: &NetNs,
        host: String,
        peer: &str,
        host_addr: &str,
        ns_addr: &str,
    ) -> anyhow::Result<Self> {
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", peer, "netns", &ns.0,
        ])?;
        let veth = Self(host);
        ip(&["addr", "add", host_addr, "dev", &veth.0])?;
        ip(&["link", "set", &veth.0, "up"])?;
        ip(&["-n", &ns.0, "addr", "add", ns_addr, "dev", peer])?;
        ip(&["-n", &ns.0, "link", "set", peer, "up"])?;
        Ok(veth)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

/// The soak's pin directory: emptied by `brokerscope cleanup` and removed when dropped, even on
/// error (the agents are stopped first: they are dropped before it).
struct Pins {
    bin: PathBuf,
    config: PathBuf,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .args(["cleanup", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(PIN_DIR);
    }
}

/// The client side: `CLIENTS` threads, each paced to its share of `TARGET_RATE`, over the load
/// brokers in turn.
struct Load {
    stop: Arc<AtomicBool>,
    /// Connections established, and of those the ones whose request was answered.
    connected: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addrs: Vec<SocketAddr>, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let per_thread = TARGET_RATE / CLIENTS as f64;
        let threads = (0..clients)
            .map(|i| {
                let (stop, connected, done, failed) = (
                    stop.clone(),
                    connected.clone(),
                    done.clone(),
                    failed.clone(),
                );
                let addrs = addrs.clone();
                std::thread::spawn(move || {
                    let start = Instant::now();
                    let mut n: u64 = 0;
                    while !stop.load(Ordering::Relaxed) {
                        // Pacing in batches of 16: ahead of schedule, sleep; behind, run flat
                        // out (and the rate says so).
                        if n.is_multiple_of(16) {
                            let due = start + Duration::from_secs_f64(n as f64 / per_thread);
                            std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        }
                        let addr = addrs[(n as usize + i) % addrs.len()];
                        if request(addr, &connected) {
                            done.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        Self {
            stop,
            connected,
            done,
            failed,
            threads,
        }
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.finish();
    }
}

/// What the churn thread did.
#[derive(Default)]
struct Churn {
    cycles: u32,
    connections: u64,
    failed: u64,
    inodes: std::collections::BTreeSet<u64>,
    /// Seconds from the soak's start to each cycle's start.
    started_at: Vec<f64>,
    /// Most namespaces of stopped pods alive at once (lingering), the live one included.
    most_namespaces: usize,
}

/// One broker pod's life: a new namespace with a veth, the broker in it on :9092, a request
/// per connection over the veth spread over `live`, then the broker stopped and the veth
/// deleted. The namespace is returned, for the caller to delete after [`NAMESPACE_LINGER`].
fn cycle(k: u32, properties: &Path, live: Duration, out: &mut Churn) -> anyhow::Result<NetNs> {
    let tag = format!("bsk{}", std::process::id() % 100_000);
    let ns = NetNs::new(format!("{tag}n{k}"))?;
    if let Some(inode) = ns.inode() {
        out.inodes.insert(inode);
    }
    // A /30 of link-local space per cycle, 64 in rotation: one pod lives at a time, and a
    // deleted pair's addresses are long gone before they come round again.
    let net = (k % 64) * 4;
    let veth = Veth::new(
        &ns,
        format!("{tag}h{}", k % 1000),
        "eth0",
        &format!("169.254.190.{}/30", net + 1),
        &format!("169.254.190.{}/30", net + 2),
    )?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0]).arg(exe_for_others());
    let broker = Broker::start(cmd, "0.0.0.0:9092", 2, properties)?;
    let addr: SocketAddr = format!("169.254.190.{}:9092", net + 2).parse()?;
    let connected = AtomicU64::new(0);
    let start = Instant::now();
    for i in 0..CYCLE_CONNECTIONS {
        let due = start + live.mul_f64(f64::from(i) / f64::from(CYCLE_CONNECTIONS));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if request(addr, &connected) {
            out.connections += 1;
        } else {
            out.failed += 1;
        }
    }
    std::thread::sleep((start + live).saturating_duration_since(Instant::now()));
    // The pod goes: its broker first, then its links; its namespace a little later.
    drop(broker);
    drop(veth);
    out.cycles += 1;
    Ok(ns)
}

/// One second's look at the agent.
#[derive(Clone, Default)]
struct Sample {
    t: f64,
    /// 1 before the restart, 2 after.
    life: u8,
    rss_kib: f64,
    hwm_kib: f64,
    anon_kib: f64,
    fds: f64,
    threads: f64,
    /// The agent process's time on a CPU so far, this life.
    cpu_s: f64,
    /// The clients' established connections so far.
    connected: f64,
    /// None when the scrape failed.
    scrape: Option<Scrape>,
}

#[derive(Clone, Default)]
struct Scrape {
    bytes: f64,
    series: f64,
    ms: f64,
    maps: BTreeMap<String, f64>,
    evictions: BTreeMap<String, f64>,
    /// brokerscope_connections_accepted_total of the load brokers, summed.
    accepted: f64,
    counters_start: Option<f64>,
    agent_start: Option<f64>,
    churn_restarts: Option<f64>,
}

/// `name{labels} value` lines of `name`: (labels, value).
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |l| {
        let rest = l.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        Some((labels, value.trim().parse().ok()?))
    })
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels
        .split(',')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\""))
        .map(|v| v.trim_end_matches('"'))
}

fn parse_scrape(text: &str, ms: f64) -> Scrape {
    let by_map = |name| {
        samples(text, name)
            .filter_map(|(l, v)| Some((label(l, "map")?.to_string(), v)))
            .collect()
    };
    Scrape {
        bytes: text.len() as f64,
        series: text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count() as f64,
        ms,
        maps: by_map("brokerscope_map_entries"),
        evictions: by_map("brokerscope_map_evictions_total"),
        accepted: samples(text, "brokerscope_connections_accepted_total")
            .filter(|(l, _)| {
                LOAD_BROKERS
                    .iter()
                    .any(|(id, _)| label(l, "broker") == Some(id))
            })
            .map(|(_, v)| v)
            .sum(),
        counters_start: samples(text, "brokerscope_counters_start_time_seconds")
            .next()
            .map(|s| s.1),
        agent_start: samples(text, "brokerscope_agent_start_time_seconds")
            .next()
            .map(|s| s.1),
        churn_restarts: samples(text, "brokerscope_broker_restarts_total")
            .find(|(l, _)| label(l, "broker") == Some(CHURN_ID))
            .map(|s| s.1),
    }
}

/// GET /metrics over mTLS, 5 s at most: the body and how long it took, in ms.
fn get_metrics(agent: &Agent) -> Option<(String, f64)> {
    let start = Instant::now();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(client_tls(&agent.pki))
        .arg(agent.url("/metrics"))
        .output()
        .ok()?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    out.status
        .success()
        .then(|| (String::from_utf8_lossy(&out.stdout).into_owned(), ms))
}

/// (VmRSS, VmHWM, RssAnon, Threads) of a process, KiB and count.
fn status(pid: u32) -> (f64, f64, f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    };
    (
        field("VmRSS:"),
        field("VmHWM:"),
        field("RssAnon:"),
        field("Threads:"),
    )
}

fn fds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as f64)
        .unwrap_or(0.0)
}

/// The process's threads' time on a CPU, from the scheduler's stats (ns; the 10 ms ticks of
/// `/proc/<pid>/stat` are too coarse for a second).
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
                .sum::<f64>()
                / 1e9
        })
        .unwrap_or(0.0)
}

/// The agent's state now, and the scrape's body (kept for the snapshots).
fn look(agent: &Agent, t: f64, life: u8, load: &Load, body: &mut String) -> Sample {
    let pid = agent.pid();
    let connected = load.connected.load(Ordering::Relaxed) as f64;
    let scrape = get_metrics(agent).map(|(text, ms)| {
        let s = parse_scrape(&text, ms);
        *body = text;
        s
    });
    let (rss_kib, hwm_kib, anon_kib, threads) = status(pid);
    Sample {
        t,
        life,
        rss_kib,
        hwm_kib,
        anon_kib,
        fds: fds(pid),
        threads,
        cpu_s: cpu_seconds(pid),
        connected,
        scrape,
    }
}

/// Waits (30 s at most) until the agent has both load brokers RUNNING.
fn wait_running(agent: &Agent) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = curl(&agent.pki, &agent.url("/metrics")).unwrap_or_default();
        if LOAD_BROKERS
            .iter()
            .all(|(id, _)| text.contains(&format!("brokerscope_broker_state{{broker=\"{id}\"}} 3")))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agent did not see the load brokers running");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The restart's continuity, from the last scrape before the kill and the first after.
struct Continuity {
    accepted_before: f64,
    accepted_after: f64,
    connected_before: f64,
    connected_after: f64,
    counters_start_before: Option<f64>,
    counters_start_after: Option<f64>,
    agent_start_before: Option<f64>,
    agent_start_after: Option<f64>,
    down_s: f64,
}

/// The RSS at a burst of scrapes' peak (sampled every 20 ms) and once it has settled.
struct Burst {
    peak_kib: f64,
    settled_kib: f64,
    hwm_kib: f64,
}

/// `BURST_CLIENTS` curls at once, each `BURST_EACH` scrapes on one connection; RSS before,
/// at the end, and `BURST_SETTLE` later; `BURSTS` times in a row.
const BURST_CLIENTS: u32 = 16;
const BURST_EACH: u32 = 50;
const BURST_SETTLE: Duration = Duration::from_secs(10);
const BURSTS: usize = 6;
/// The agent's allocator (glibc malloc) settings the bursts are measured under, through
/// `GLIBC_TUNABLES`: no agent change. By default glibc gives each thread that allocates an
/// arena of its own (up to 8 per CPU) and raises its trim threshold with every large block
/// freed (up to 64 MiB), so freed memory stays mapped; fixing the thresholds keeps trimming on.
const ALLOCATORS: [(&str, Option<&str>); 3] = [
    ("glibc defaults", None),
    ("arena_max=2", Some("glibc.malloc.arena_max=2")),
    (
        "fixed thresholds (mmap and trim 128 KiB)",
        Some("glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"),
    ),
];

fn burst(agent: &Agent) -> anyhow::Result<Burst> {
    let pid = agent.pid();
    let url = agent.url("/metrics");
    let mut peak_kib = status(pid).0;
    let mut children: Vec<Child> = (0..BURST_CLIENTS)
        .map(|_| {
            let mut cmd = Command::new("curl");
            cmd.args(["-sS", "--max-time", "30", "-o", "/dev/null"])
                .args(client_tls(&agent.pki));
            for _ in 0..BURST_EACH {
                cmd.arg(&url);
            }
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start curl")
        })
        .collect::<anyhow::Result<_>>()?;
    while children
        .iter_mut()
        .any(|c| matches!(c.try_wait(), Ok(None)))
    {
        peak_kib = peak_kib.max(status(pid).0);
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in &mut children {
        let _ = c.wait();
    }
    peak_kib = peak_kib.max(status(pid).0);
    std::thread::sleep(BURST_SETTLE);
    let (settled_kib, hwm_kib, _, _) = status(pid);
    Ok(Burst {
        peak_kib,
        settled_kib,
        hwm_kib,
    })
}

/// A soak's shape. By default everything runs; leaving a part out, or running the agent under
/// other allocator settings, finds what a curve follows. Such a run writes to
/// `target/bench/soak-<what it changed>/` and skips the scrape bursts.
pub struct Options {
    pub minutes: f64,
    pub no_load: bool,
    pub no_churn: bool,
    /// `GLIBC_TUNABLES` for the soak's agents.
    pub glibc_tunables: Option<String>,
}

impl Options {
    /// What this run changed, if anything: its directory's suffix.
    fn experiment(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.no_load {
            parts.push("no-load".to_string());
        }
        if self.no_churn {
            parts.push("no-churn".to_string());
        }
        if let Some(t) = &self.glibc_tunables {
            parts.push(t.replace(['=', ':'], "-").replace("glibc.malloc.", ""));
        }
        (!parts.is_empty()).then(|| parts.join("_"))
    }

    /// The environment of the soak's agents.
    fn agent_env(&self) -> Vec<(&str, &str)> {
        self.glibc_tunables
            .iter()
            .map(|t| ("GLIBC_TUNABLES", t.as_str()))
            .collect()
    }

    /// Broker restarts over the soak: none without churn.
    fn cycles(&self) -> u32 {
        if self.no_churn {
            0
        } else {
            (CYCLES_PER_MINUTE * self.minutes).round().max(1.0) as u32
        }
    }
}

/// How the soak starts an agent: its binary, config, throwaway PKI and environment.
struct Launcher<'a> {
    bin: &'a Path,
    config: &'a Path,
    pki: &'a Path,
    env: &'a [(&'a str, &'a str)],
}

impl Launcher<'_> {
    fn launch(&self) -> anyhow::Result<Agent> {
        self.launch_with(self.env)
    }

    fn launch_with(&self, env: &[(&str, &str)]) -> anyhow::Result<Agent> {
        Agent::launch_with_env(self.bin, self.config, self.pki.to_path_buf(), env)
    }
}

/// What the sampled lives gave: every second's sample, when the agent was killed, and the
/// restart's continuity.
struct Lives {
    samples: Vec<Sample>,
    restart_at: Option<f64>,
    continuity: Option<Continuity>,
}

pub fn run(bin: &Path, out_dir: &Path, options: &Options) -> anyhow::Result<()> {
    let (minutes, cycles) = (options.minutes, options.cycles());
    let experiment = options.experiment();
    let dir = fresh_dir(out_dir, experiment.as_deref())?;
    let agent_env = options.agent_env();
    let duration = Duration::from_secs_f64(minutes * 60.0);
    // A soak interrupted before left its pins: ours to remove.
    let _ = std::fs::remove_dir_all(PIN_DIR);

    let pki = dir.join("pki");
    crate::agent::dev_pki(bin, &pki)?;
    let config = write_agent_config(&dir, &pki)?;
    // Dropped last: after the agents, brokers and namespaces.
    let _pins = Pins {
        bin: bin.to_path_buf(),
        config: config.clone(),
    };
    let launcher = Launcher {
        bin,
        config: &config,
        pki: &pki,
        env: &agent_env,
    };

    let (brokers, addrs) = start_load_brokers(&dir)?;
    let churn_properties = write_churn_properties(&dir)?;
    let mut agent = launcher.launch()?;
    wait_running(&agent)?;
    eprintln!(
        "soak: {minutes} min, {cycles} broker restarts in new namespaces, {TARGET_RATE:.0} \
         connections/s aimed at, agent pid {}",
        agent.pid()
    );

    let mut load = Load::start(addrs, if options.no_load { 0 } else { CLIENTS });
    let start = Instant::now();
    let stop_churn = Arc::new(AtomicBool::new(false));
    let period = duration / cycles.max(1);
    let churn = spawn_churn(start, period, cycles, churn_properties, stop_churn.clone());
    let lives = sample_lives(&launcher, &mut agent, &load, &dir, start, duration)?;
    let elapsed = start.elapsed().as_secs_f64();
    load.finish();
    stop_churn.store(true, Ordering::Relaxed);
    let churn = churn
        .join()
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
    let end = last_scrape(&agent, &dir)?;
    let connected_total = load.connected.load(Ordering::Relaxed) as f64;
    drop(agent);
    let bursts = if experiment.is_none() {
        allocator_bursts(&launcher)?
    } else {
        Vec::new()
    };
    drop(brokers);

    let report = Report {
        minutes,
        elapsed,
        cycles,
        churn,
        samples: lives.samples,
        restart_at: lives.restart_at,
        continuity: lives.continuity,
        end,
        connected_total,
        done_total: load.done.load(Ordering::Relaxed) as f64,
        failed_total: load.failed.load(Ordering::Relaxed) as f64,
        bursts,
        experiment,
    };
    let md = report.write(&dir)?;
    drop(_pins);
    finish_report(&dir, md)
}

/// The soak's directory under `out_dir`, emptied: `soak` or `soak-<experiment>`.
fn fresh_dir(out_dir: &Path, experiment: Option<&str>) -> anyhow::Result<PathBuf> {
    let dir = out_dir.join(match experiment {
        Some(e) => format!("soak-{e}"),
        None => "soak".into(),
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The restarted broker's properties: on :9092 in each namespace of its own.
fn write_churn_properties(dir: &Path) -> anyhow::Result<PathBuf> {
    let churn_properties = dir.join("churn.properties");
    std::fs::write(
        &churn_properties,
        format!(
            "node.id={CHURN_ID}\nlisteners=PLAINTEXT://:9092\nlog.dirs={}\n",
            dir.join("logs-churn").display()
        ),
    )?;
    Ok(churn_properties)
}

/// The scrape after the load: every connection closed and counted, the agent's total against
/// the clients' own. Kept as `metrics-end.txt`.
fn last_scrape(agent: &Agent, dir: &Path) -> anyhow::Result<Scrape> {
    std::thread::sleep(Duration::from_secs(2));
    let (text, ms) = get_metrics(agent).context("the last scrape")?;
    std::fs::write(dir.join("metrics-end.txt"), &text)?;
    Ok(parse_scrape(&text, ms))
}

/// The soak agent's config: on a free loopback port, with the throwaway PKI, discovering the
/// soak's own brokers, pinning under [`PIN_DIR`].
fn write_agent_config(dir: &Path, pki: &Path) -> anyhow::Result<PathBuf> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"{p}/tls.crt\"\nkey_file = \"{p}/tls.key\"\nclient_ca_file = \"{p}/ca.crt\"\naccess_log = \"off\"\nrate_limit_rps = 1000\nrate_limit_burst = 1000\n[discovery]\ncmdline_patterns = ['kafka\\.Kafka {d}/']\n[probes]\npin_dir = \"{PIN_DIR}\"\nlistener_release_seconds = {RELEASE_SECONDS}\n",
            p = pki.display(),
            d = dir.display(),
        ),
    )?;
    Ok(config)
}

/// The [`LOAD_BROKERS`], each on a free loopback port: the brokers and their addresses.
fn start_load_brokers(dir: &Path) -> anyhow::Result<(Vec<Broker>, Vec<SocketAddr>)> {
    let mut brokers = Vec::new();
    let mut addrs = Vec::new();
    for (id, workers) in LOAD_BROKERS {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let properties = dir.join(format!("broker-{id}.properties"));
        std::fs::write(
            &properties,
            format!(
                "node.id={id}\nlisteners=PLAINTEXT://127.0.0.1:{port}\nlog.dirs={}\n",
                dir.join(format!("logs-{id}")).display()
            ),
        )?;
        brokers.push(Broker::start(
            Command::new(super::self_exe()),
            &format!("127.0.0.1:{port}"),
            workers,
            &properties,
        )?);
        addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    Ok((brokers, addrs))
}

/// The churn thread: a broker pod's [`cycle`] every `period` from `start`, `cycles` times or
/// until `stop`; each stopped pod's namespace lingers [`NAMESPACE_LINGER`].
fn spawn_churn(
    start: Instant,
    period: Duration,
    cycles: u32,
    churn_properties: PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<Churn>> {
    std::thread::spawn(move || -> anyhow::Result<Churn> {
        let mut out = Churn::default();
        let mut lingering = std::collections::VecDeque::new();
        for k in 0..cycles {
            let due = start + period * k;
            while Instant::now() < due && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            while lingering
                .front()
                .is_some_and(|(at, _): &(Instant, NetNs)| at.elapsed() > NAMESPACE_LINGER)
            {
                lingering.pop_front();
            }
            out.started_at.push(start.elapsed().as_secs_f64());
            let ns = cycle(k, &churn_properties, period / 2, &mut out)?;
            out.most_namespaces = out.most_namespaces.max(lingering.len() + 1);
            lingering.push_back((Instant::now(), ns));
        }
        Ok(out)
    })
}

/// A sample every second for `duration` from `start`, the agent killed and started again
/// halfway.
fn sample_lives(
    launcher: &Launcher,
    agent: &mut Agent,
    load: &Load,
    dir: &Path,
    start: Instant,
    duration: Duration,
) -> anyhow::Result<Lives> {
    let mut samples: Vec<Sample> = Vec::new();
    let mut life = 1u8;
    let mut continuity = None;
    let mut restart_at = None;
    let half = duration / 2;
    let mut tick = 0u32;
    let mut body = String::new();
    while start.elapsed() < duration {
        tick += 1;
        let due = start + Duration::from_secs(u64::from(tick));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if restart_at.is_none() && start.elapsed() >= half {
            let (at, before, after, c) = restart(launcher, agent, load, dir, start, &mut body)?;
            restart_at = Some(at);
            life = 2;
            continuity = Some(c);
            samples.push(before);
            samples.push(after);
            tick = start.elapsed().as_secs() as u32;
            continue;
        }
        let s = look(agent, start.elapsed().as_secs_f64(), life, load, &mut body);
        if tick.is_multiple_of(30) {
            eprintln!(
                "soak: {:>4}s rss {:.1} MiB, fds {}, threads {}, {} series, {:.0} connections",
                s.t as u64,
                s.rss_kib / 1024.0,
                s.fds,
                s.threads,
                s.scrape.as_ref().map_or(-1.0, |x| x.series),
                s.connected
            );
        }
        samples.push(s);
    }
    Ok(Lives {
        samples,
        restart_at,
        continuity,
    })
}

/// The last look before the kill; the kill; the agent's absence; the next agent, until its
/// first scrape: when it was killed (seconds into the soak), the two samples and the
/// continuity between them.
fn restart(
    launcher: &Launcher,
    agent: &mut Agent,
    load: &Load,
    dir: &Path,
    start: Instant,
    body: &mut String,
) -> anyhow::Result<(f64, Sample, Sample, Continuity)> {
    let before = look(agent, start.elapsed().as_secs_f64(), 1, load, body);
    std::fs::write(dir.join("metrics-life1-last.txt"), &*body)?;
    let killed = Instant::now();
    let restart_at = start.elapsed().as_secs_f64();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    let _ = agent.child.wait();
    eprintln!("soak: agent killed (SIGKILL) at {restart_at:.0}s");
    // Down for a moment under live traffic, as a real restart is.
    std::thread::sleep(Duration::from_secs(2));
    let next = launcher.launch()?;
    // The old one is dead: its Drop's SIGTERM and wait find nothing to do.
    drop(std::mem::replace(agent, next));
    let after = loop {
        let s = look(agent, start.elapsed().as_secs_f64(), 2, load, body);
        if s.scrape.is_some() {
            std::fs::write(dir.join("metrics-life2-first.txt"), &*body)?;
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let down_s = killed.elapsed().as_secs_f64();
    eprintln!(
        "soak: agent {} serving again after {down_s:.1}s",
        agent.pid()
    );
    let (b, a) = (
        before.scrape.clone().unwrap_or_default(),
        after.scrape.clone().unwrap_or_default(),
    );
    let continuity = Continuity {
        accepted_before: b.accepted,
        accepted_after: a.accepted,
        connected_before: before.connected,
        connected_after: after.connected,
        counters_start_before: b.counters_start,
        counters_start_after: a.counters_start,
        agent_start_before: b.agent_start,
        agent_start_after: a.agent_start,
        down_s,
    };
    Ok((restart_at, before, after, continuity))
}

/// Scrape bursts against fresh agents, the brokers still running, under each allocator
/// setting.
fn allocator_bursts(launcher: &Launcher) -> anyhow::Result<Vec<(&'static str, f64, Vec<Burst>)>> {
    let mut bursts = Vec::new();
    for &(name, env) in ALLOCATORS.iter() {
        let env: Vec<(&str, &str)> = env.iter().map(|v| ("GLIBC_TUNABLES", *v)).collect();
        let agent = launcher.launch_with(&env)?;
        wait_running(&agent)?;
        std::thread::sleep(Duration::from_secs(10));
        let idle_kib = status(agent.pid()).0;
        let rounds = (0..BURSTS)
            .map(|_| burst(&agent))
            .collect::<anyhow::Result<Vec<_>>>()?;
        eprintln!(
            "soak: bursts under {name}: idle {:.1} MiB, then {}",
            idle_kib / 1024.0,
            rounds
                .iter()
                .map(|b| format!("{:.1}", b.settled_kib / 1024.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
        bursts.push((name, idle_kib, rounds));
    }
    Ok(bursts)
}

/// The report with what the soak left behind (checked once the pins are gone), written and
/// printed; an error if anything was left.
fn finish_report(dir: &Path, md: String) -> anyhow::Result<()> {
    let left = leftovers();
    let md = md
        + &if left.is_empty() {
            "\nLeft behind: nothing (no `bsk` namespace or veth, no pin directory, every \
             broker and agent process waited for).\n"
                .to_string()
        } else {
            format!("\nLeft behind: {}\n", left.join(", "))
        };
    std::fs::write(dir.join("report.md"), &md)?;
    println!("{md}");
    println!("written to {}", dir.display());
    if !left.is_empty() {
        bail!("the soak left things behind: {}", left.join(", "));
    }
    Ok(())
}

/// What the soak may have left: namespaces and veths of ours, the pin directory.
fn leftovers() -> Vec<String> {
    let tag = format!("bsk{}", std::process::id() % 100_000);
    let mut left = Vec::new();
    let list = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for line in list(&["netns", "list"]).lines() {
        if let Some(name) = line
            .split_whitespace()
            .next()
            .filter(|n| n.starts_with(&tag))
        {
            left.push(format!("namespace {name}"));
            let _ = ip(&["netns", "del", name]);
        }
    }
    for line in list(&["-o", "link"]).lines() {
        if let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
            .filter(|n| n.starts_with(&tag))
        {
            left.push(format!("veth {name}"));
            let _ = ip(&["link", "del", name]);
        }
    }
    if Path::new(PIN_DIR).exists() {
        left.push(format!("pins {PIN_DIR}"));
        let _ = std::fs::remove_dir_all(PIN_DIR);
    }
    left
}

/// How a curve is judged.
#[derive(Clone, Copy)]
struct Rule {
    /// The least change that counts: the larger of this fraction of the level and `floor`.
    relative: f64,
    floor: f64,
}

/// A curve's verdict over one agent life.
struct Verdict {
    grows: bool,
    /// Median of the window after warm-up, median of its last 20%, and the least-squares
    /// change over the window's second half.
    window: f64,
    last: f64,
    second_half: f64,
    tolerance: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Least-squares slope of `points`, per second.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(x, y), p| (x + p.0 / n, y + p.1 / n));
    let (sxy, sxx) = points.iter().fold((0.0, 0.0), |(sxy, sxx), p| {
        (sxy + (p.0 - mx) * (p.1 - my), sxx + (p.0 - mx).powi(2))
    });
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

/// The trailing window a curve is judged on the maximum of: two churn cycles. A restarted
/// broker lives half of each cycle, and what the agent holds for it (fds, series) makes
/// two-level curves whose medians flip between the levels with the sampling phase.
const ENVELOPE_S: f64 = 4.0;

/// Each point replaced by the maximum of the points within [`ENVELOPE_S`] before it.
fn envelope(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .enumerate()
        .map(|(i, &(t, _))| {
            let top = points[..=i]
                .iter()
                .rev()
                .take_while(|p| t - p.0 < ENVELOPE_S)
                .map(|p| p.1)
                .fold(f64::NEG_INFINITY, f64::max);
            (t, top)
        })
        .collect()
}

/// The verdict over `points` (one agent life, warm-up left out), taken on their trailing
/// [`ENVELOPE_S`] maximum: it grows when the median of its last 20% is above the median of
/// the whole window by more than the tolerance, or when the least-squares line over the second
/// half rises by more than the tolerance.
fn judge(points: &[(f64, f64)], rule: Rule) -> Option<Verdict> {
    if points.len() < 10 {
        return None;
    }
    let points = &envelope(points)[..];
    let values = |p: &[(f64, f64)]| p.iter().map(|x| x.1).collect::<Vec<_>>();
    let window = median(&mut values(points));
    let last = median(&mut values(&points[points.len() * 4 / 5..]));
    let second = &points[points.len() / 2..];
    let span = second.last().map_or(0.0, |p| p.0) - second.first().map_or(0.0, |p| p.0);
    let second_half = slope(second) * span;
    let tolerance = (window.abs() * rule.relative).max(rule.floor);
    Some(Verdict {
        grows: last - window > tolerance || second_half > tolerance,
        window,
        last,
        second_half,
        tolerance,
    })
}

struct Report {
    minutes: f64,
    elapsed: f64,
    cycles: u32,
    churn: Churn,
    samples: Vec<Sample>,
    restart_at: Option<f64>,
    continuity: Option<Continuity>,
    end: Scrape,
    connected_total: f64,
    done_total: f64,
    failed_total: f64,
    /// Per allocator setting: its name, the fresh agent's idle RSS (KiB), each burst.
    bursts: Vec<(&'static str, f64, Vec<Burst>)>,
    /// What this run changed from the default soak, if anything.
    experiment: Option<String>,
}

/// (seconds, value) points of one life.
type Points = Vec<(f64, f64)>;
/// (agent life, seconds, value) points of a curve.
type LifePoints = Vec<(u8, f64, f64)>;

/// A sampled curve: its file name, title, unit, rule and points per agent life.
struct Curve {
    key: String,
    title: String,
    unit: &'static str,
    rule: Rule,
    points: LifePoints,
}

impl Report {
    /// Rates between consecutive samples of one life: (life, t, per second).
    fn rate(&self, value: impl Fn(&Sample) -> Option<f64>) -> LifePoints {
        self.samples
            .windows(2)
            .filter(|w| w[0].life == w[1].life && w[1].t > w[0].t)
            .filter_map(|w| {
                Some((
                    w[1].life,
                    w[1].t,
                    (value(&w[1])? - value(&w[0])?) / (w[1].t - w[0].t),
                ))
            })
            .collect()
    }

    fn gauge(&self, value: impl Fn(&Sample) -> Option<f64>) -> LifePoints {
        self.samples
            .iter()
            .filter_map(|s| Some((s.life, s.t, value(s)?)))
            .collect()
    }

    // Long: one entry per process curve, in the report's order.
    fn curves(&self) -> Vec<Curve> {
        let percent = Rule {
            relative: 0.05,
            floor: 0.0,
        };
        let mut curves = vec![
            Curve {
                key: "rss".into(),
                title: "agent RSS".into(),
                unit: "MiB",
                rule: Rule {
                    relative: 0.05,
                    floor: 1.0,
                },
                points: self.gauge(|s| Some(s.rss_kib / 1024.0)),
            },
            Curve {
                key: "rss_anon".into(),
                title: "agent RSS, anonymous (heap)".into(),
                unit: "MiB",
                rule: Rule {
                    relative: 0.05,
                    floor: 1.0,
                },
                points: self.gauge(|s| Some(s.anon_kib / 1024.0)),
            },
            Curve {
                key: "fds".into(),
                title: "agent open fds".into(),
                unit: "fds",
                rule: Rule {
                    relative: 0.0,
                    floor: 2.0,
                },
                points: self.gauge(|s| Some(s.fds)),
            },
            Curve {
                key: "threads".into(),
                title: "agent threads".into(),
                unit: "threads",
                rule: Rule {
                    relative: 0.0,
                    floor: 1.0,
                },
                points: self.gauge(|s| Some(s.threads)),
            },
            Curve {
                key: "cpu".into(),
                title: "agent CPU (process)".into(),
                unit: "% of one CPU",
                rule: Rule {
                    relative: 0.25,
                    floor: 0.5,
                },
                points: self.rate(|s| Some(s.cpu_s * 100.0)),
            },
            Curve {
                key: "series".into(),
                title: "/metrics series".into(),
                unit: "series",
                rule: percent,
                points: self.gauge(|s| Some(s.scrape.as_ref()?.series)),
            },
            Curve {
                key: "metrics_bytes".into(),
                title: "/metrics bytes".into(),
                unit: "KiB",
                rule: percent,
                points: self.gauge(|s| Some(s.scrape.as_ref()?.bytes / 1024.0)),
            },
            Curve {
                key: "scrape_ms".into(),
                title: "scrape time (curl, mTLS handshake included)".into(),
                unit: "ms",
                rule: Rule {
                    relative: 0.25,
                    floor: 5.0,
                },
                points: self.gauge(|s| Some(s.scrape.as_ref()?.ms)),
            },
        ];
        curves.extend(self.map_curves());
        curves
    }

    /// A fill curve per map the scrapes named, and an evictions curve per map that evicted.
    fn map_curves(&self) -> Vec<Curve> {
        let mut curves = Vec::new();
        let maps: std::collections::BTreeSet<String> = self
            .samples
            .iter()
            .filter_map(|s| s.scrape.as_ref())
            .flat_map(|s| s.maps.keys().chain(s.evictions.keys()).cloned())
            .collect();
        for map in &maps {
            curves.push(Curve {
                key: format!("map_{map}"),
                title: format!("map fill: {map}"),
                unit: "entries",
                rule: Rule {
                    relative: 0.05,
                    floor: 8.0,
                },
                points: self.gauge(|s| s.scrape.as_ref()?.maps.get(map).copied()),
            });
            let evictions = self.gauge(|s| s.scrape.as_ref()?.evictions.get(map).copied());
            if !evictions.is_empty() {
                curves.push(Curve {
                    key: format!("evictions_{map}"),
                    title: format!("map evictions (total): {map}"),
                    unit: "evictions",
                    // Any eviction after warm-up counts.
                    rule: Rule {
                        relative: 0.0,
                        floor: 0.0,
                    },
                    points: evictions,
                });
            }
        }
        curves
    }

    /// The connection rate the clients reached (per second, between samples).
    fn connection_rate(&self) -> LifePoints {
        self.rate(|s| Some(s.connected))
    }

    /// The samples of one life after its warm-up: (t, v).
    fn settled(&self, points: &[(u8, f64, f64)], life: u8) -> Vec<(f64, f64)> {
        let of_life: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.0 == life)
            .map(|p| (p.1, p.2))
            .collect();
        let (Some(first), Some(last)) = (of_life.first(), of_life.last()) else {
            return Vec::new();
        };
        let from = first.0 + WARMUP_S.min((last.0 - first.0) * 0.3);
        of_life.into_iter().filter(|p| p.0 >= from).collect()
    }

    fn write(&self, dir: &Path) -> anyhow::Result<String> {
        let marks: Vec<(f64, &str)> = self
            .restart_at
            .iter()
            .map(|t| (*t, "agent kill -9 + restart"))
            .collect();
        let rates = self.connection_rate();
        let mut md = self.intro();
        md += &self.load_section(&rates);
        md += &self.restart_section();
        let (curves, csv_columns) = self.curves_section(dir, &marks, &rates)?;
        md += &curves;
        md += &self.cpu_section();
        md += &self.rss_section();
        self.write_samples(dir, &csv_columns)?;
        md += "\nEvery sample: [samples.csv](samples.csv).\n";
        Ok(md)
    }

    /// The report's title and what the soak did.
    fn intro(&self) -> String {
        format!(
            "# brokerscope soak and churn{}\n\n\
             {:.0} s ({} min asked). Load: {CLIENTS} client threads aiming at {TARGET_RATE:.0} \
             short connections/s together (connect, {REQUEST} B request, {ANSWER} B answer, \
             client closes), alternating over two brokers on loopback: broker 1 with 2 \
             accepting threads (a Kafka broker's fixed network threads), broker 2 with a thread \
             per connection (threads born and gone at the connection rate, for the agent's \
             `THREADS` map). Churn: {} of {} broker start/stop cycles (broker {CHURN_ID}, the \
             same pod restarted), each in a fresh network namespace with a veth, {CYCLE_CONNECTIONS} \
             connections over the veth during its life, then the broker stopped and the veth \
             deleted, the namespace {} s later (see below: the kernel reuses a deleted \
             namespace's inode, and the agent knows a listener by it). A scrape of /metrics over mTLS (curl) every second. The \
             agent is killed with SIGKILL halfway and started again on the same config and \
             pin dir (`{PIN_DIR}`), `probes.listener_release_seconds = {RELEASE_SECONDS}` \
             (default 300: shortened so releases happen within each half).\n\n",
            self.experiment
                .as_ref()
                .map_or(String::new(), |e| format!(" (experiment: {e})")),
            self.elapsed,
            self.minutes,
            self.churn.cycles,
            self.cycles,
            NAMESPACE_LINGER.as_secs(),
        )
    }

    /// The load reached, the churn, and the exact count against the clients'.
    fn load_section(&self, rates: &LifePoints) -> String {
        let mut md = String::new();
        let mut all_rates: Vec<f64> = rates.iter().map(|r| r.2).collect();
        let mean_rate = self.connected_total / self.elapsed;
        md += &format!(
            "## Load reached\n\n- Connections: {:.0} established, {:.0} answered, {:.0} failed; \
             {mean_rate:.0}/s on average, median second {:.0}/s (target {TARGET_RATE:.0}/s).\n\
             - Churn: {} cycles, {} connections to the restarted broker ({} failed), {} \
             distinct namespace inodes (the kernel reuses a deleted namespace's inode number; a \
             listener is (namespace inode, port) to the agent), at most {} namespaces at once.\n",
            self.connected_total,
            self.done_total,
            self.failed_total,
            median(&mut all_rates),
            self.churn.cycles,
            self.churn.connections,
            self.churn.failed,
            self.churn.inodes.len(),
            self.churn.most_namespaces,
        );
        if let Some(r) = self.end.churn_restarts {
            md += &format!(
                "- `brokerscope_broker_restarts_total{{broker=\"{CHURN_ID}\"}}` at the end: {r:.0} \
                 (the agent saw that many of the {} restarts; kept across the agent's restart).\n",
                self.churn.cycles.saturating_sub(1)
            );
        }
        md += &format!(
            "- Exact count, whole run: the load brokers' `brokerscope_connections_accepted_total` \
             {:.0} against {:.0} connections the clients established: {}.\n",
            self.end.accepted,
            self.connected_total,
            if self.end.accepted == self.connected_total {
                "equal, through the kill -9 and restart".to_string()
            } else {
                format!("{:+.0}", self.end.accepted - self.connected_total)
            }
        );

        md
    }

    /// The restart's continuity: what the counters did across the kill -9.
    fn restart_section(&self) -> String {
        let mut md = String::new();
        if let Some(c) = &self.continuity {
            let same_start = c.counters_start_before.is_some()
                && c.counters_start_before == c.counters_start_after;
            md += &format!(
                "\n## Restart continuity\n\n- Agent down {:.1} s (kill -9 to serving again) \
                 under the load.\n- Accepted (load brokers): {:.0} before the kill, {:.0} at the \
                 first scrape after: {}; +{:.0} against +{:.0} connections the clients \
                 established between the two scrapes ({:+.0}: the clients' count and the scrape \
                 are not taken at the same instant).\n- \
                 `brokerscope_counters_start_time_seconds`: {:?} before, {:?} after: {}.\n- \
                 `brokerscope_agent_start_time_seconds`: {:?} before, {:?} after.\n",
                c.down_s,
                c.accepted_before,
                c.accepted_after,
                if c.accepted_after >= c.accepted_before {
                    "no reset"
                } else {
                    "WENT BACK"
                },
                c.accepted_after - c.accepted_before,
                c.connected_after - c.connected_before,
                (c.accepted_after - c.accepted_before) - (c.connected_after - c.connected_before),
                c.counters_start_before,
                c.counters_start_after,
                if same_start { "unchanged" } else { "CHANGED" },
                c.agent_start_before,
                c.agent_start_after,
            );
        }

        md
    }

    /// The curves: each one's verdicts and plot, the load's own plot; and the columns for
    /// `samples.csv`.
    fn curves_section(
        &self,
        dir: &Path,
        marks: &[(f64, &str)],
        rates: &LifePoints,
    ) -> anyhow::Result<(String, Vec<(String, LifePoints)>)> {
        let mut md = String::new();
        md += &format!(
            "\n## Curves\n\nVerdict per agent life (before and after the restart), its first \
             {WARMUP_S:.0} s left out as warm-up (30% of the life when shorter), on the curve's \
             trailing {ENVELOPE_S:.0} s maximum (two churn cycles: what the agent holds for the \
             restarted broker comes and goes with it): **grows** when \
             the median of the last 20% exceeds the median of the whole window by more than \
             the tolerance, or the least-squares line over the window's second half rises by \
             more than it; otherwise **flat**. Tolerance: the larger of a fraction of the \
             window's median and a floor, per curve (RSS 5% or 1 MiB, fds 2, threads 1, map \
             fill 5% or 8 entries, series and bytes 5%, CPU 25% or 0.5 points, evictions: any). \
             Start and end: the first and last sample after warm-up of the first and second \
             life.\n\n| curve | unit | life 1: window median → last 20% (2nd-half trend) | \
             verdict | life 2: window median → last 20% (2nd-half trend) | verdict | start → end \
             | plot |\n|---|---|---|---|---|---|---|---|\n"
        );
        let mut csv_columns: Vec<(String, LifePoints)> = Vec::new();
        let mut not_flat = Vec::new();
        for curve in self.curves() {
            let (row, grows) = self.curve_row(dir, &curve, marks)?;
            if grows {
                not_flat.push(curve.title.clone());
            }
            md += &row;
            csv_columns.push((curve.key, curve.points));
        }
        // The load's own curve, no verdict.
        let rate_points: Vec<(f64, f64)> = rates.iter().map(|p| (p.1, p.2)).collect();
        std::fs::write(
            dir.join("connection_rate.svg"),
            plot::svg(
                "client connections per second",
                "connections/s",
                self.elapsed,
                &[plot::Line {
                    label: "connections/s",
                    points: &rate_points,
                }],
                marks,
            ),
        )?;
        md += &format!(
            "\nNot flat: {}. The load itself: [connection_rate.svg](connection_rate.svg).\n",
            if not_flat.is_empty() {
                "none".to_string()
            } else {
                not_flat.join(", ")
            }
        );

        Ok((md, csv_columns))
    }

    /// One curve's row of the table, its plot written to `dir`: the row, and whether it grows
    /// in either life.
    fn curve_row(
        &self,
        dir: &Path,
        curve: &Curve,
        marks: &[(f64, &str)],
    ) -> anyhow::Result<(String, bool)> {
        let lives: Vec<(Points, Option<Verdict>)> = [1u8, 2]
            .iter()
            .map(|&life| {
                let settled = self.settled(&curve.points, life);
                let verdict = judge(&settled, curve.rule);
                (settled, verdict)
            })
            .collect();
        let cell = |v: &Option<Verdict>| match v {
            Some(v) => (
                format!(
                    "{} → {} ({:+}; tol {})",
                    fmt(v.window),
                    fmt(v.last),
                    fmt(v.second_half),
                    fmt(v.tolerance)
                ),
                if v.grows { "**grows**" } else { "flat" },
            ),
            None => ("too few samples".into(), "-"),
        };
        let (c1, v1) = cell(&lives[0].1);
        let (c2, v2) = cell(&lives[1].1);
        let start = lives[0].0.first().or(lives[1].0.first()).map(|p| p.1);
        let end = lives[1].0.last().or(lives[0].0.last()).map(|p| p.1);
        let file = format!("{}.svg", curve.key);
        let points: Vec<(f64, f64)> = curve.points.iter().map(|p| (p.1, p.2)).collect();
        std::fs::write(
            dir.join(&file),
            plot::svg(
                &curve.title,
                curve.unit,
                self.elapsed,
                &[plot::Line {
                    label: &curve.title,
                    points: &points,
                }],
                marks,
            ),
        )?;
        let row = format!(
            "| {} | {} | {c1} | {v1} | {c2} | {v2} | {} → {} | [{file}]({file}) |\n",
            curve.title,
            curve.unit,
            start.map_or("-".into(), fmt),
            end.map_or("-".into(), fmt),
        );
        Ok((row, v1 == "**grows**" || v2 == "**grows**"))
    }

    /// CPU per 1k connections/s, per life after warm-up.
    fn cpu_section(&self) -> String {
        let mut md = String::new();
        md += "\n## CPU per 1k connections/s\n\nThe agent process's CPU seconds per second (its \
               threads' time on a CPU, from schedstat) divided by the clients' connection rate \
               in thousands, over each life after warm-up. The kernel programs' time is not in \
               it (it runs in the traffic's own threads; see the bench's ns per event).\n\n\
               | life | CPU % of one CPU | connections/s | CPU ms per s per 1k connections/s |\n\
               |---|---|---|---|\n";
        for life in [1u8, 2] {
            let of = |key: &str| {
                let s: Vec<&Sample> = self.samples.iter().filter(|s| s.life == life).collect();
                let from = s.first().map_or(0.0, |f| {
                    f.t + WARMUP_S.min((s.last().map_or(0.0, |l| l.t) - f.t) * 0.3)
                });
                let s: Vec<&&Sample> = s.iter().filter(|x| x.t >= from).collect();
                let (Some(a), Some(b)) = (s.first(), s.last()) else {
                    return None;
                };
                let dt = b.t - a.t;
                (dt > 0.0).then(|| match key {
                    "cpu" => (b.cpu_s - a.cpu_s) / dt,
                    _ => (b.connected - a.connected) / dt,
                })
            };
            if let (Some(cpu), Some(rate)) = (of("cpu"), of("rate"))
                && rate > 0.0
            {
                md += &format!(
                    "| {life} | {:.2}% | {rate:.0} | {:.2} |\n",
                    cpu * 100.0,
                    cpu * 1e3 / (rate / 1e3)
                );
            }
        }

        md
    }

    /// The RSS high-water mark over the soak, and the scrape bursts under each allocator.
    fn rss_section(&self) -> String {
        let mut md = String::new();
        let hwm: Vec<String> = [1u8, 2]
            .iter()
            .filter_map(|&life| {
                let s: Vec<&Sample> = self.samples.iter().filter(|s| s.life == life).collect();
                let last = s.last()?;
                let peak = s.iter().map(|s| s.rss_kib).fold(0.0, f64::max);
                Some(format!(
                    "life {life}: RSS {:.1} MiB at its end, {:.1} MiB the highest sampled, VmHWM \
                     {:.1} MiB",
                    last.rss_kib / 1024.0,
                    peak / 1024.0,
                    last.hwm_kib / 1024.0
                ))
            })
            .collect();
        md += &format!(
            "\n## RSS high-water mark\n\n- Over the soak: {}. VmHWM is the process's peak, \
             reached while it loads (before the first sample).\n- Scrape bursts after the soak \
             (load stopped, brokers running), each against a fresh agent on the same config \
             under one glibc malloc setting (`GLIBC_TUNABLES`, no agent change): {BURSTS} bursts \
             of {} scrapes of /metrics from {BURST_CLIENTS} concurrent clients, RSS {} s after \
             each.\n\n| allocator | idle RSS MiB | VmHWM MiB | burst peak MiB | after burst 1..{BURSTS} \
             MiB | kept after the last |\n|---|---|---|---|---|---|\n",
            hwm.join("; "),
            BURST_CLIENTS * BURST_EACH,
            BURST_SETTLE.as_secs(),
        );
        for (name, idle, rounds) in &self.bursts {
            let peak = rounds.iter().map(|b| b.peak_kib).fold(0.0, f64::max);
            let settled: Vec<String> = rounds
                .iter()
                .map(|b| format!("{:.1}", b.settled_kib / 1024.0))
                .collect();
            let last = rounds.last().map_or(*idle, |b| b.settled_kib);
            md += &format!(
                "| {name} | {:.1} | {:.1} | {:.1} | {} | {:+.1} MiB |\n",
                idle / 1024.0,
                rounds.last().map_or(0.0, |b| b.hwm_kib) / 1024.0,
                peak / 1024.0,
                settled.join(", "),
                (last - idle) / 1024.0
            );
        }

        md
    }

    /// Every sample, for whoever wants to plot it otherwise: `samples.csv`.
    fn write_samples(
        &self,
        dir: &Path,
        csv_columns: &[(String, LifePoints)],
    ) -> anyhow::Result<()> {
        let mut csv = String::from("t,life,rss_kib,hwm_kib,anon_kib,fds,threads,cpu_s,connected");
        for (key, _) in csv_columns {
            csv += ",";
            csv += key;
        }
        csv += "\n";
        for s in &self.samples {
            csv += &format!(
                "{:.2},{},{},{},{},{},{},{:.4},{}",
                s.t,
                s.life,
                s.rss_kib,
                s.hwm_kib,
                s.anon_kib,
                s.fds,
                s.threads,
                s.cpu_s,
                s.connected
            );
            for (_, points) in csv_columns {
                csv += ",";
                if let Some(p) = points.iter().find(|p| p.1 == s.t && p.0 == s.life) {
                    csv += &fmt(p.2);
                }
            }
            csv += "\n";
        }
        std::fs::write(dir.join("samples.csv"), csv)?;
        Ok(())
    }
}

/// A figure with as many decimals as its size needs.
fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: Rule = Rule {
        relative: 0.05,
        floor: 1.0,
    };

    #[test]
    fn a_level_with_noise_is_flat_and_a_leak_grows() {
        let flat: Vec<(f64, f64)> = (0..300)
            .map(|i| (f64::from(i), 30.0 + if i % 2 == 0 { 0.3 } else { -0.3 }))
            .collect();
        assert!(!judge(&flat, RULE).unwrap().grows);
        // 2 MiB over 300 s: 1 MiB over the second half and the last 20% 0.8 MiB above the
        // median, both below the tolerance (5% of 31 MiB).
        let slow: Vec<(f64, f64)> = (0..300)
            .map(|i| (f64::from(i), 30.0 + f64::from(i) * 2.0 / 300.0))
            .collect();
        assert!(!judge(&slow, RULE).unwrap().grows);
        let leak: Vec<(f64, f64)> = (0..300)
            .map(|i| (f64::from(i), 30.0 + f64::from(i) * 10.0 / 300.0))
            .collect();
        assert!(judge(&leak, RULE).unwrap().grows);
    }

    #[test]
    fn a_curve_between_two_levels_with_the_churn_is_flat_whatever_its_phase() {
        // fds: 95, or 102 while the restarted broker lives; a phase slip at the end puts more
        // of the last 20% on the high level.
        let mut points: Vec<(f64, f64)> = (0..300)
            .map(|i| (f64::from(i), if i % 2 == 0 { 95.0 } else { 102.0 }))
            .collect();
        for p in &mut points[250..] {
            if !(p.0 as u32).is_multiple_of(3) {
                p.1 = 102.0;
            }
        }
        let rule = Rule {
            relative: 0.0,
            floor: 2.0,
        };
        assert!(!judge(&points, rule).unwrap().grows);
    }

    #[test]
    fn one_eviction_after_warm_up_grows_under_the_any_rule() {
        let rule = Rule {
            relative: 0.0,
            floor: 0.0,
        };
        let mut points: Vec<(f64, f64)> = (0..100).map(|i| (f64::from(i), 5.0)).collect();
        assert!(!judge(&points, rule).unwrap().grows);
        points[99].1 = 6.0;
        assert!(judge(&points, rule).unwrap().grows);
    }

    #[test]
    fn scrape_lines_are_read_by_name_and_label() {
        let text = "# HELP x\nbrokerscope_map_entries{map=\"threads\"} 12\n\
                    brokerscope_map_evictions_total{map=\"threads\"} 0\n\
                    brokerscope_connections_accepted_total{broker=\"1\",listener=\"PLAINTEXT\",port=\"1\"} 5\n\
                    brokerscope_connections_accepted_total{broker=\"2\",listener=\"PLAINTEXT\",port=\"2\"} 7\n\
                    brokerscope_connections_accepted_total{broker=\"100\",listener=\"PLAINTEXT\",port=\"9092\"} 9\n\
                    brokerscope_counters_start_time_seconds{pinned=\"true\"} 1700000000\n";
        let s = parse_scrape(text, 1.0);
        assert_eq!(s.maps.get("threads"), Some(&12.0));
        assert_eq!(s.evictions.get("threads"), Some(&0.0));
        assert_eq!(s.accepted, 12.0);
        assert_eq!(s.counters_start, Some(1_700_000_000.0));
        assert_eq!(s.series, 6.0);
    }
}
