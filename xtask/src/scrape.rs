//! The scrape part of `cargo xtask bench`, in two halves.
//!
//! Series: the agent's `/metrics` over mTLS keep-alive at concurrency 8 with 0, 1 and 10 fake
//! brokers of 4 listeners each, interleaved with prometheus-node-exporter (loadavg collector
//! only) behind the same mTLS material and loaded by the same tool (`oha`, which presents client
//! certificates); plainly and with the headers Prometheus sends.
//!
//! Connections: one broker holding 0, 10k and 50k open connections, scraped one request at a
//! time, by an agent with the hooks this kernel allows and by one with the map iterators
//! disabled (the socket-table fallback forced); the scrape latency and the agent's CPU per
//! scrape.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Requests per run against the agent (about 2 s at 10 brokers) and against node_exporter
/// (likewise). 4,000 against the agent took half a second: one stall of a few ms (another
/// process's turn on a 2-CPU machine) moved its p99 by 0.5-1 ms from run to run.
const REQUESTS: usize = 16_000;
const THEIR_REQUESTS: usize = 4000;
/// Interleaved rounds of every target per stage; the verdict takes each target's median round.
const ROUNDS: usize = 3;
/// Requests of the unmeasured warm-up pass over every target before a stage's rounds: without
/// it, the first round after ten brokers started was the slowest of its stage in every run.
const WARM_UP_REQUESTS: usize = 2000;
const CONCURRENCY: usize = 8;
const BROKER_STAGES: [usize; 3] = [0, 1, 10];
const LISTENERS: usize = 4;
/// Open connections held on one broker (spread over its four listeners: under the 28k
/// ephemeral ports of one loopback address pair each).
const CONNECTION_STAGES: [usize; 3] = [0, 10_000, 50_000];
/// Scrapes, one at a time, per latency measurement.
const LATENCY_REQUESTS: usize = 300;
/// The open-file limit each process of the bench asks for; where the hard limit is lower, the
/// connections are spread over more processes (holding workers, `bench-connect` clients).
const OPEN_FILES: u64 = 131_072;

const OURS: &str = "brokerscope /metrics";
const OURS_AS_PROMETHEUS: &str = "brokerscope /metrics, as Prometheus asks (OpenMetrics, gzip)";
const THEIRS: &str = "node_exporter /metrics (loadavg)";
const THEIRS_AS_PROMETHEUS: &str =
    "node_exporter /metrics (loadavg), as Prometheus asks (OpenMetrics, gzip)";

/// The map iterators: disabled, the agent reads open sockets through the socket-table walk.
const MAP_ITERATORS: &str =
    r#"disabled_programs = ["conn_live", "conn_spill_live", "listen_live"]"#;

/// One load run's figures.
pub struct Run {
    pub brokers: usize,
    /// Which of the stage's [`ROUNDS`].
    pub round: usize,
    pub target: String,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub success: f64,
    /// The agent's CPU per request, when the target is the agent.
    pub cpu_ms: Option<f64>,
}

/// One scrape-latency measurement with open connections.
pub struct Latency {
    pub agent: &'static str,
    pub connections: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cpu_ms: f64,
}

/// Everything the scrape bench measured.
pub struct Report {
    pub runs: Vec<Run>,
    pub latencies: Vec<Latency>,
    pub idle_rss_kib: u64,
    pub payload_bytes: usize,
    /// Whether the kernel let the default agent attach the map iterators.
    pub map_iterators: bool,
    /// Our renderer against `prometheus-client` on the listener families (one line).
    pub exposition_eval: String,
}

/// Runs the agent's `render::client_eval` measurement in release; returns its figure line.
fn exposition_eval(root: &Path) -> anyhow::Result<String> {
    let out = crate::cmd::cargo(root)
        .args(["test", "--release", "--package", "brokerscope", "--lib"])
        .args(["render::client_eval::cost_against_prometheus_client", "--"])
        .args(["--ignored", "--nocapture"])
        .stderr(Stdio::inherit())
        .output()
        .context("run the exposition measurement")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("exposition-eval: "))
        .context("the exposition measurement printed no figure")?;
    eprintln!("bench: {line}");
    Ok(line.to_string())
}

/// Kills a child process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `line` (printed by `child` on stdout or stderr) contains `needle`; returns it.
fn wait_line(reader: impl std::io::Read, needle: &str) -> anyhow::Result<String> {
    for line in BufReader::new(reader).lines() {
        let line = line?;
        if line.contains(needle) {
            return Ok(line);
        }
    }
    bail!("exited before printing `{needle}`")
}

/// The headers Prometheus 2.x sends with a scrape.
const PROMETHEUS_HEADERS: [&str; 2] = [
    "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding: gzip",
];

/// oha's figures for one run: req/s, p50 and p99 in ms, success rate.
fn oha(
    url: &str,
    pki: &Path,
    requests: usize,
    concurrency: usize,
    as_prometheus: bool,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let headers = if as_prometheus {
        &PROMETHEUS_HEADERS[..]
    } else {
        &[]
    };
    let out = Command::new("oha")
        .args(["--no-tui", "--output-format", "json"])
        .args(["-n", &requests.to_string(), "-c", &concurrency.to_string()])
        .args(headers.iter().flat_map(|h| ["-H", h]))
        .args(crate::agent::client_tls(pki))
        .arg(url)
        .output()
        .context("run oha (installed by cargo xtask bench)")?;
    if !out.status.success() {
        bail!("oha {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha's JSON")?;
    let f = |path: &[&str]| {
        path.iter()
            .try_fold(&v, |v, k| v.get(*k))
            .and_then(serde_json::Value::as_f64)
    };
    let rps = f(&["summary", "requestsPerSec"]).context("requestsPerSec")?;
    let success = f(&["summary", "successRate"]).unwrap_or(0.0);
    let p50 = f(&["latencyPercentiles", "p50"]).context("p50")? * 1e3;
    let p99 = f(&["latencyPercentiles", "p99"]).context("p99")? * 1e3;
    Ok((rps, p50, p99, success))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A process's user + system CPU so far, in ms (clock ticks of 10 ms).
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // utime and stime are fields 14 and 15: 12 and 13 after the state.
    let total = ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0);
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    total * 1000.0 / hz
}

/// Raises this process's open-file limit to `to`, or to its hard limit where it may not go
/// further (no CAP_SYS_RESOURCE); returns the limit now in force, for itself and its children.
fn raise_open_files(to: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    for want in [to, limit.rlim_max.min(to)] {
        let next = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(limit.rlim_max),
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &next) } == 0 {
            return want;
        }
    }
    limit.rlim_cur
}

/// Writes a broker's server.properties (listeners on `ports`); returns its path.
fn properties(dir: &Path, id: &str, ports: &[u16]) -> anyhow::Result<PathBuf> {
    let listeners: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("L{i}://127.0.0.1:{p}"))
        .collect();
    let props = dir.join(format!("broker-{id}.properties"));
    std::fs::write(
        &props,
        format!("node.id={id}\nlisteners={}\n", listeners.join(",")),
    )?;
    Ok(props)
}

/// A fake broker (tests' `fake-broker`) of four listeners with one connection on each, so every
/// listener has counters to render.
struct FakeBroker {
    _child: Guard,
    _connections: Vec<TcpStream>,
}

impl FakeBroker {
    fn start(fake: &Path, dir: &Path, id: usize) -> anyhow::Result<Self> {
        let ports: Vec<u16> = (0..LISTENERS)
            .map(|_| free_port())
            .collect::<Result<_, _>>()?;
        let props = properties(dir, &id.to_string(), &ports)?;
        let mut child = Command::new(fake)
            .arg("kafka.Kafka")
            .arg(&props)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start a fake broker")?;
        let stdout = child.stdout.take().context("stdout")?;
        let child = Guard(child);
        wait_line(stdout, "ready")?;
        let connections = ports
            .iter()
            .map(|p| TcpStream::connect(("127.0.0.1", *p)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            _child: child,
            _connections: connections,
        })
    }
}

/// Descriptors one process of the bench keeps free of held connections (its listeners, pipes,
/// libraries).
const SPARE_FILES: u64 = 200;
/// Processes accepting on the holding broker's listeners: together they hold more connections
/// than one process's open-file limit allows.
const HOLDING_WORKERS: usize = 4;

/// `xtask bench-holding-broker`: listens on every address of `addrs` (comma-separated) and has
/// [`HOLDING_WORKERS`] worker processes (`bench-holding-worker`, which the agent does not take
/// for brokers) accept on those sockets and keep every connection open without reading: the
/// agent counts connections by listener, whichever process holds them. Prints `ready` once it
/// listens; the workers die with it.
pub fn hold_connections(addrs: &str) -> anyhow::Result<()> {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let listeners: Vec<TcpListener> = addrs
        .split(',')
        .map(|a| TcpListener::bind(a).with_context(|| format!("bind {a}")))
        .collect::<Result<_, _>>()?;
    let fds: Vec<i32> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    let list = fds.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
    let mut workers = Vec::new();
    for _ in 0..HOLDING_WORKERS {
        let inherit = fds.clone();
        let mut cmd = Command::new(crate::bench::self_exe());
        cmd.args(["bench-holding-worker", &list]);
        // SAFETY: between fork and exec only async-signal-safe calls: fcntl clears
        // close-on-exec on the listeners (they stay open in this process), prctl asks for
        // SIGKILL when this process dies.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &inherit {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        workers.push(Guard(cmd.spawn().context("start a holding worker")?));
    }
    println!("ready");
    std::io::stdout().flush()?;
    for mut w in workers {
        let _ = w.0.wait();
    }
    drop(listeners);
    Ok(())
}

/// `xtask bench-holding-worker`: accepts on the inherited listening descriptors `fds`
/// (comma-separated) and holds each connection, until its open-file limit is nearly used.
pub fn hold_worker(fds: &str) -> anyhow::Result<()> {
    use std::os::fd::FromRawFd as _;
    let limit = raise_open_files(OPEN_FILES);
    let room = limit.saturating_sub(SPARE_FILES) as usize;
    let held = Arc::new(Mutex::new(Vec::new()));
    let listeners: Vec<TcpListener> = fds
        .split(',')
        .map(|fd| {
            let fd: i32 = fd.parse().with_context(|| format!("descriptor {fd:?}"))?;
            // SAFETY: the holding broker passed these listening sockets open across exec; this
            // process owns its copies.
            Ok(unsafe { TcpListener::from_raw_fd(fd) })
        })
        .collect::<anyhow::Result<_>>()?;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let held = held.clone();
            std::thread::spawn(move || {
                // Each thread takes at most one connection past the room: well within the
                // spare descriptors.
                while held.lock().unwrap_or_else(|p| p.into_inner()).len() < room {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            held.lock().unwrap_or_else(|p| p.into_inner()).push(stream)
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    // Full: keep holding until killed.
    loop {
        std::thread::park();
    }
}

/// `xtask bench-connect`: opens `count` connections spread over `addrs` (comma-separated), writes
/// 64 bytes on each, prints `ready` and holds them until its stdin closes.
pub fn connect_and_hold(addrs: &str, count: usize) -> anyhow::Result<()> {
    raise_open_files(OPEN_FILES);
    let addrs: Vec<&str> = addrs.split(',').collect();
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let addr = addrs[i % addrs.len()];
        let mut s = TcpStream::connect(addr)
            .with_context(|| format!("connection {i} to the holding broker at {addr}"))?;
        s.write_all(&[b'x'; 64])?;
        held.push(s);
    }
    println!("ready");
    std::io::stdout().flush()?;
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    Ok(())
}

/// Connections to the holding broker, held by `bench-connect` processes of at most `per` each.
struct Clients {
    addrs: String,
    per: usize,
    held: usize,
    _children: Vec<Guard>,
}

impl Clients {
    /// Holds `total` connections in all.
    fn grow_to(&mut self, total: usize) -> anyhow::Result<()> {
        while self.held < total {
            let n = (total - self.held).min(self.per);
            let mut child = Command::new(crate::bench::self_exe())
                .args(["bench-connect", &self.addrs, &n.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("start a bench-connect process")?;
            let stdout = child.stdout.take().context("stdout")?;
            self._children.push(Guard(child));
            wait_line(stdout, "ready")?;
            self.held += n;
        }
        Ok(())
    }
}

/// The agents of the bench: `hooks` with what the kernel allows, `fallback` with the map
/// iterators disabled. Both watch the bench's brokers; neither pins.
struct Agents {
    hooks: crate::agent::Agent,
    fallback: crate::agent::Agent,
}

impl Agents {
    fn start(bin: &Path, dir: &Path, pki: &Path) -> anyhow::Result<Self> {
        let launch = |name: &str, probes: &str| -> anyhow::Result<crate::agent::Agent> {
            let config = dir.join(format!("agent-{name}.toml"));
            let pattern = format!(r"kafka\.Kafka {}/", dir.display());
            std::fs::write(
                &config,
                format!(
                    "[server]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"{p}/tls.crt\"\nkey_file = \"{p}/tls.key\"\nclient_ca_file = \"{p}/ca.crt\"\naccess_log = \"off\"\nrate_limit_rps = 100000\nrate_limit_burst = 100000\n[discovery]\ncmdline_patterns = ['{pattern}']\n[probes]\n{}{probes}\n",
                    crate::agent::PIN_NOTHING,
                    port = free_port()?,
                    p = pki.display()
                ),
            )?;
            crate::agent::Agent::launch(bin, &config, pki.to_path_buf())
        };
        Ok(Self {
            hooks: launch("hooks", "")?,
            fallback: launch("fallback", MAP_ITERATORS)?,
        })
    }
}

/// Waits (60 s at most) until `agent` lists `brokers` brokers (stopped ones stay listed) and counts `connections` open on
/// them, and node_exporter answers.
fn wait_listed(
    pki: &Path,
    agent: &crate::agent::Agent,
    brokers: usize,
    connections: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60) * time_scale();
    loop {
        let listed = crate::agent::curl(pki, &agent.url("/v1/brokers"))
            .unwrap_or_default()
            .matches("\"broker_state\"")
            .count();
        let metrics = crate::agent::curl(pki, &agent.url("/metrics")).unwrap_or_default();
        let open: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("brokerscope_connections_active{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if listed >= brokers && open as usize >= connections {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not ready: the agent lists {listed} of {brokers} brokers, counts {open} of {connections} connections"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// node_exporter with its load average only, behind the same mTLS as the agent: the process
/// and its `/metrics` URL.
fn start_node_exporter(dir: &Path, pki: &Path) -> anyhow::Result<(Guard, String)> {
    let ne_port = free_port()?;
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {p}/tls.crt\n  key_file: {p}/tls.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {p}/ca.crt\n",
            p = pki.display()
        ),
    )?;
    let ne = Guard(
        Command::new("prometheus-node-exporter")
            .args(["--collector.disable-defaults", "--collector.loadavg"])
            .arg(format!("--web.listen-address=127.0.0.1:{ne_port}"))
            .arg(format!("--web.config.file={}", web.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start prometheus-node-exporter (Debian package, installed by setup)")?,
    );
    Ok((ne, format!("https://localhost:{ne_port}/metrics")))
}

/// Until node_exporter answers on `theirs` (30 s at most).
fn wait_node_exporter(pki: &Path, theirs: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !crate::agent::curl(pki, theirs)
        .unwrap_or_default()
        .contains("node_load1")
    {
        if Instant::now() > deadline {
            bail!("node_exporter does not answer on {theirs}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Runs the scrape bench.
pub fn run(root: &Path, bin: &Path, out_dir: &Path) -> anyhow::Result<Report> {
    let dir = out_dir.join("scrape");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let pki = dir.join("pki");
    crate::agent::dev_pki(bin, &pki)?;
    let open_files = raise_open_files(OPEN_FILES);
    crate::cmd::run(crate::cmd::cargo(root).args([
        "build",
        "--package",
        "brokerscope-tests",
        "--bin",
        "fake-broker",
    ]))?;
    let fake = root.join("target/debug/fake-broker");

    let (ne, theirs) = start_node_exporter(&dir, &pki)?;
    let agents = Agents::start(bin, &dir, &pki)?;
    wait_node_exporter(&pki, &theirs)?;
    wait_listed(&pki, &agents.hooks, 0, 0)?;
    // Idle: nothing has loaded it yet but the readiness checks.
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss_kib = rss_kib(agents.hooks.pid());
    let map_iterators = crate::agent::curl(&pki, &agents.hooks.url("/metrics"))?
        .contains("brokerscope_probe_attached{program=\"conn_live\"");

    let mut runs = Vec::new();
    let mut brokers = Vec::new();
    let mut payload_bytes = 0;
    for stage in BROKER_STAGES {
        while brokers.len() < stage {
            brokers.push(FakeBroker::start(&fake, &dir, brokers.len())?);
        }
        wait_listed(&pki, &agents.hooks, stage, stage * LISTENERS)?;
        payload_bytes = crate::agent::curl(&pki, &agents.hooks.url("/metrics"))?.len();
        eprintln!(
            "bench: /metrics payload {payload_bytes} bytes for {stage} brokers x {LISTENERS} listeners"
        );
        runs.extend(series_stage(&pki, &agents.hooks, &theirs, stage)?);
    }
    drop(brokers);
    drop(ne);
    let latencies = connection_stages(&dir, &pki, &agents, open_files)?;
    let exposition_eval = exposition_eval(root)?;
    Ok(Report {
        exposition_eval,
        runs,
        latencies,
        idle_rss_kib,
        payload_bytes,
        map_iterators,
    })
}

/// The agent's and node_exporter's `/metrics` under load at concurrency 8, interleaved.
fn series_stage(
    pki: &Path,
    agent: &crate::agent::Agent,
    theirs: &str,
    brokers: usize,
) -> anyhow::Result<Vec<Run>> {
    let ours = agent.url("/metrics");
    let state = agent.url("/v1/broker-state/?broker=0");
    let mut targets = vec![
        (OURS, ours.as_str(), false, true),
        (THEIRS, theirs, false, false),
        (OURS_AS_PROMETHEUS, ours.as_str(), true, true),
        (THEIRS_AS_PROMETHEUS, theirs, true, false),
    ];
    if brokers > 0 {
        targets.push(("brokerscope /v1/broker-state/", state.as_str(), false, true));
    }
    for &(_, url, as_prometheus, _) in &targets {
        oha(url, pki, WARM_UP_REQUESTS, CONCURRENCY, as_prometheus)?;
    }
    let mut runs = Vec::new();
    for round in 1..=ROUNDS {
        for &(name, url, as_prometheus, is_agent) in &targets {
            let requests = if is_agent { REQUESTS } else { THEIR_REQUESTS };
            let cpu_before = cpu_ms(agent.pid());
            let (rps, p50_ms, p99_ms, success) =
                oha(url, pki, requests, CONCURRENCY, as_prometheus)?;
            let cpu_ms = is_agent.then(|| (cpu_ms(agent.pid()) - cpu_before) / requests as f64);
            eprintln!(
                "bench: {brokers} brokers, round {round}, {name} c={CONCURRENCY}: {rps:.0} req/s, p50 {p50_ms:.2} ms, p99 {p99_ms:.2} ms"
            );
            runs.push(Run {
                brokers,
                round,
                target: name.to_string(),
                rps,
                p50_ms,
                p99_ms,
                success,
                cpu_ms,
            });
        }
    }
    Ok(runs)
}

/// One broker holding 0, 10k and 50k open connections; each agent scraped one request at a
/// time at each stage.
fn connection_stages(
    dir: &Path,
    pki: &Path,
    agents: &Agents,
    open_files: u64,
) -> anyhow::Result<Vec<Latency>> {
    // Each side of a connection is a descriptor in one process: the holding broker's workers
    // and the clients each stay under the limit, however low (no CAP_SYS_RESOURCE).
    let per = (open_files.saturating_sub(SPARE_FILES) as usize).max(1000);
    let ports: Vec<u16> = (0..LISTENERS)
        .map(|_| free_port())
        .collect::<Result<_, _>>()?;
    let props = properties(dir, "holding", &ports)?;
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut child = Command::new(crate::bench::self_exe())
        .args(["bench-holding-broker", &addrs.join(","), "kafka.Kafka"])
        .arg(&props)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the holding broker")?;
    let stdout = child.stdout.take().context("stdout")?;
    let _broker = Guard(child);
    wait_line(stdout, "ready")?;
    let capacity = HOLDING_WORKERS * per;
    let mut clients = Clients {
        addrs: addrs.join(","),
        per,
        held: 0,
        _children: Vec::new(),
    };
    let mut out = Vec::new();
    for stage in CONNECTION_STAGES.map(|n| n.min(capacity)) {
        if out.iter().any(|l: &Latency| l.connections == stage) {
            continue;
        }
        clients.grow_to(stage)?;
        for (name, agent) in [
            ("kernel's hooks", &agents.hooks),
            ("socket-table fallback forced", &agents.fallback),
        ] {
            wait_listed(pki, agent, 1, stage)?;
            let before = cpu_ms(agent.pid());
            let (_, p50_ms, p99_ms, _) =
                oha(&agent.url("/metrics"), pki, LATENCY_REQUESTS, 1, false)?;
            let cpu_ms = (cpu_ms(agent.pid()) - before) / LATENCY_REQUESTS as f64;
            eprintln!(
                "bench: {stage} open connections, {name}: scrape p50 {p50_ms:.2} ms, p99 {p99_ms:.2} ms, {cpu_ms:.2} ms CPU per scrape"
            );
            out.push(Latency {
                agent: name,
                connections: stage,
                p50_ms,
                p99_ms,
                cpu_ms,
            });
        }
    }
    Ok(out)
}

/// Markdown and JSON fragments for the report.
pub fn report(r: &Report) -> (String, String) {
    let (mut md, json) = throughput_section(r);
    let (latency_md, latency_json) = latency_section(r.map_iterators, &r.latencies);
    md += &latency_md;
    md += &format!(
        "\n## Exposition library\n\nOur renderer against the `prometheus-client` crate (a \
         custom collector over the same stats; both pages parsed and compared sample by sample \
         by a unit test), OpenMetrics, in release: {}.\n\nAdopt unless it costs more than about \
         20 % of scrape throughput or cannot express a series we serve.\n",
        r.exposition_eval
    );
    let json = format!(
        "\"scrape\":{{\"idle_rss_kib\":{},\"payload_bytes\":{},\"map_iterators\":{},\"runs\":[{}],\"latency\":[{}]}}",
        r.idle_rss_kib,
        r.payload_bytes,
        r.map_iterators,
        json.join(","),
        latency_json.join(",")
    );
    (md, json)
}

/// Scrapes over mTLS keep-alive, ours against node_exporter's: the section and each run's
/// JSON.
fn throughput_section(r: &Report) -> (String, Vec<String>) {
    let mut md = format!(
        "\n## Scrapes over mTLS keep-alive\n\n{REQUESTS} requests per run to the agent and \
         {THEIR_REQUESTS} to node_exporter, with oha at concurrency {CONCURRENCY}, {ROUNDS} rounds \
         of every target in turn per stage after an unmeasured pass of {WARM_UP_REQUESTS} \
         requests to each; fake brokers of {LISTENERS} listeners each, one \
         connection on each listener. \"Plain\" requests are oha's own: the text format, and \
         `Accept-Encoding: gzip, compress, deflate, br`, so the agent and node_exporter both answer \
         them gzipped. \
         node_exporter runs only its loadavg collector behind the same certificates \
         (exporter-toolkit web config). Agent idle RSS: {:.1} MiB; `/metrics` with 10 brokers: \
         {} bytes. CPU: the agent's user + system time over the run, per request.\n\n\
         | brokers | round | target | req/s | p50 ms | p99 ms | agent CPU ms/request | success |\n|---|---|---|---|---|---|---|---|\n",
        r.idle_rss_kib as f64 / 1024.0,
        r.payload_bytes,
    );
    let mut json = Vec::new();
    for run in &r.runs {
        let cpu = run.cpu_ms.map_or("-".to_string(), |c| format!("{c:.3}"));
        md += &format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {cpu} | {:.3} |\n",
            run.brokers, run.round, run.target, run.rps, run.p50_ms, run.p99_ms, run.success
        );
        json.push(format!(
            "{{\"brokers\":{},\"round\":{},\"target\":\"{}\",\"rps\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"cpu_ms\":{},\"success\":{:.4}}}",
            run.brokers,
            run.round,
            run.target,
            run.rps,
            run.p50_ms,
            run.p99_ms,
            run.cpu_ms.map_or("null".to_string(), |c| format!("{c:.4}")),
            run.success
        ));
    }
    md += "\n";
    for stage in BROKER_STAGES {
        // A target's rounds in this stage, by req/s.
        let rounds = |target: &str| {
            let mut rounds: Vec<&Run> = r
                .runs
                .iter()
                .filter(|run| run.brokers == stage && run.target == target)
                .collect();
            rounds.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            rounds
        };
        let find = |target: &str| {
            let rounds = rounds(target);
            rounds.get(rounds.len() / 2).copied()
        };
        let p99s = |target: &str| {
            let rounds = rounds(target);
            let p99 = rounds.iter().map(|run| run.p99_ms);
            let min = p99.clone().fold(f64::INFINITY, f64::min);
            let max = p99.fold(0.0, f64::max);
            format!("{min:.2}-{max:.2}")
        };
        for (ours, theirs, how) in [
            (OURS, THEIRS, "plain requests"),
            (
                OURS_AS_PROMETHEUS,
                THEIRS_AS_PROMETHEUS,
                "as Prometheus asks",
            ),
        ] {
            if let (Some(ours), Some(theirs)) = (find(ours), find(theirs))
                && theirs.rps > 0.0
            {
                md += &format!(
                    "- {stage} brokers x {LISTENERS} listeners, {how}: {:.2}x node_exporter's req/s ({:.0} against {:.0}, median rounds), p99 {:.2} ms in that round ({} ms over the rounds).\n",
                    ours.rps / theirs.rps,
                    ours.rps,
                    theirs.rps,
                    ours.p99_ms,
                    p99s(ours.target.as_str()),
                );
            }
        }
    }
    md += "\nTargets: at 10 brokers x 4 listeners, >= 4x node_exporter's req/s and p99 <= 2 ms; idle RSS <= 30 MB.\n";
    (md, json)
}

/// Scrape latency with open connections: the section and each stage's JSON.
fn latency_section(map_iterators: bool, latencies: &[Latency]) -> (String, Vec<String>) {
    let mut md = format!(
        "\n## Scrape latency with open connections\n\nOne broker of {LISTENERS} listeners holding \
         the open connections (loopback clients, so the node's socket table holds both ends); \
         {LATENCY_REQUESTS} scrapes of `/metrics`, one at a time over one mTLS keep-alive \
         connection. Map iterators (`iter/bpf_map_elem`) {} on this kernel.\n\n\
         | agent | open connections | p50 ms | p99 ms | CPU ms/scrape |\n|---|---|---|---|---|\n",
        if map_iterators {
            "attached"
        } else {
            "refused: both agents read open sockets through the socket-table walk"
        }
    );
    let mut latency_json = Vec::new();
    for l in latencies {
        md += &format!(
            "| {} | {} | {:.2} | {:.2} | {:.3} |\n",
            l.agent, l.connections, l.p50_ms, l.p99_ms, l.cpu_ms
        );
        latency_json.push(format!(
            "{{\"agent\":\"{}\",\"connections\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"cpu_ms\":{:.4}}}",
            l.agent, l.connections, l.p50_ms, l.p99_ms, l.cpu_ms
        ));
    }
    for agent in ["kernel's hooks", "socket-table fallback forced"] {
        let p50 = |n: usize| {
            latencies
                .iter()
                .find(|l| l.agent == agent && l.connections == n)
                .map(|l| l.p50_ms)
        };
        if let (Some(idle), Some(full)) = (p50(0), p50(*CONNECTION_STAGES.last().unwrap_or(&0))) {
            md += &format!(
                "\n- {agent}: p50 {:+.2} ms at {} open connections against none.",
                full - idle,
                CONNECTION_STAGES.last().unwrap_or(&0)
            );
        }
    }
    md += "\n\nTarget: with 50k open connections, within 2 ms of the idle scrape.\n";
    (md, latency_json)
}

/// How many times longer waits may take: `BROKERSCOPE_TEST_TIME_SCALE`, which
/// [`run_in_vm`] sets for the emulated guest (default 1).
fn time_scale() -> u32 {
    std::env::var("BROKERSCOPE_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// The kernel series whose guests run [`run_in_vm`]: Debian 12's, which let the agent attach
/// the map iterators.
const VM_SERIES: [&str; 2] = ["6.1", "6.12"];
/// Waits in a guest may take this many times the host's (as the tests' under TCG).
const VM_TIME_SCALE: u32 = 20;
/// A guest's hard limit.
const VM_TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// `cargo xtask bench --scrape-vm`: the open-connections stages in a guest of each Debian 12
/// kernel under QEMU, where the kernel's-hooks agent reads open sockets through the map
/// iterators (which this machine's kernel may refuse) and the other through the socket-table
/// walk. Written to target/bench/scrape-vm.md.
pub fn run_in_vm(root: &Path, bin: &Path) -> anyhow::Result<()> {
    crate::setup::ensure(crate::setup::Needs::Bench)?;
    let path = std::env::var("PATH").unwrap_or_default();
    let mut md =
        "# Scrape latency with open connections, in QEMU guests of Debian 12's kernels\n\n\
                  Emulated (TCG, both vCPUs on one host thread): every figure is many times the \
                  host's; compare the rows of one kernel with each other.\n"
            .to_string();
    for series in VM_SERIES {
        let (ok, out) = crate::vmtest::exec_in_series(root, series, VM_TIMEOUT, |xtask, out| {
            format!(
                "PATH={path} BROKERSCOPE_TEST_TIME_SCALE={VM_TIME_SCALE} {} bench --connections-only {} {}",
                xtask.display(),
                bin.display(),
                out.display()
            )
        })?;
        let table = std::fs::read_to_string(out.join(CONNECTIONS_REPORT)).ok();
        let (true, Some(table)) = (ok, table) else {
            bail!(
                "the open-connections stages failed in the {series} guest: its console is in target/vmtest/"
            );
        };
        md += &table.replacen(
            "## Scrape latency with open connections",
            &format!("## Debian 12, {series} kernel"),
            1,
        );
    }
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("scrape-vm.md"), &md)?;
    println!("{md}");
    Ok(())
}

/// The report file [`run_connections_only`] leaves in its out directory.
const CONNECTIONS_REPORT: &str = "connections.md";

/// `--connections-only AGENT OUT` (in the guest of [`run_in_vm`]): the two agents and the
/// open-connections stages alone; the section's table written to OUT.
pub fn run_connections_only(bin: &Path, out: &Path) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join("brokerscope-scrape-connections");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let pki = dir.join("pki");
    crate::agent::dev_pki(bin, &pki)?;
    let open_files = raise_open_files(OPEN_FILES);
    let agents = Agents::start(bin, &dir, &pki)?;
    wait_listed(&pki, &agents.hooks, 0, 0)?;
    let map_iterators = crate::agent::curl(&pki, &agents.hooks.url("/metrics"))?
        .contains("brokerscope_probe_attached{program=\"conn_live\"");
    let latencies = connection_stages(&dir, &pki, &agents, open_files)?;
    let (md, _) = latency_section(map_iterators, &latencies);
    std::fs::write(out.join(CONNECTIONS_REPORT), &md)?;
    println!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_takes_each_targets_median_round_and_shows_every_rounds_p99() {
        let run = |round, target: &str, rps, p99_ms| Run {
            brokers: 10,
            round,
            target: target.to_string(),
            rps,
            p50_ms: 1.0,
            p99_ms,
            success: 1.0,
            cpu_ms: None,
        };
        let report = Report {
            runs: vec![
                run(1, OURS, 6_000.0, 2.5),
                run(1, THEIRS, 1_000.0, 9.0),
                run(2, OURS, 9_000.0, 1.2),
                run(2, THEIRS, 2_000.0, 8.0),
                run(3, OURS, 8_000.0, 1.5),
                run(3, THEIRS, 3_000.0, 7.0),
            ],
            latencies: Vec::new(),
            idle_rss_kib: 0,
            payload_bytes: 0,
            map_iterators: false,
            exposition_eval: String::new(),
        };
        let (md, json) = throughput_section(&report);
        assert!(
            md.contains(
                "- 10 brokers x 4 listeners, plain requests: 4.00x node_exporter's req/s \
                 (8000 against 2000, median rounds), p99 1.50 ms in that round (1.20-2.50 ms \
                 over the rounds).\n"
            ),
            "{md}"
        );
        assert_eq!(json.len(), 6);
        assert!(json[0].contains("\"round\":1"), "{}", json[0]);
    }
}
