//! `cargo xtask bench`: what the agent costs the brokers it watches, measured A against B in the
//! same run (the machines are shared and noisy, so only ratios mean anything).
//!
//! Kafka-like loopback request/response traffic runs with the agent detached and attached, in
//! interleaved rounds: 1 KiB produce requests with a small ack, 64 KiB fetch answers sent with
//! sendfile(2), and short connections (connect, one request, close). The server is a broker to
//! the agent: a process of its own (`xtask bench-broker`) whose command line names `kafka.Kafka`
//! and a server.properties with its listener and log dir, so the agent discovers it, watches its
//! listener and counts its threads as it would a broker's. Per program, the kernel's own BPF
//! run-time statistics give the nanoseconds per event, and, against the machine's busy CPU time
//! in the same window, the share of it the agent's programs and process take: a ratio within
//! one window, which this machine resolves where it does not resolve throughput ratios between
//! rounds. Then [`node_tax`]: whether any hook the agent attaches by default slows processes
//! other than the brokers, with their log dirs on every filesystem a node may have them on
//! (`--node-tax-only` runs just that part). The report goes to `target/bench/report.md` and
//! `report.json`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::agent::Agent;

mod mounts;
pub mod node_tax;
mod plot;
pub mod soak;

const ROUNDS: usize = 7;
const ROUND: Duration = Duration::from_secs(3);
const CLIENTS: usize = 4;
const PRODUCE: usize = 1024;
const FETCH: usize = 64 * 1024;
const ACK: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Produce,
    Fetch,
    ShortConnections,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Produce => "produce 1 KiB (write, 16 B ack)",
            Case::Fetch => "fetch 64 KiB (sendfile)",
            Case::ShortConnections => "short connections (connect, 1 KiB, close)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Case::Produce => "produce_1k",
            Case::Fetch => "fetch_64k_sendfile",
            Case::ShortConnections => "short_connections",
        }
    }

    fn from_key(key: &str) -> Option<Self> {
        [Case::Produce, Case::Fetch, Case::ShortConnections]
            .into_iter()
            .find(|c| c.key() == key)
    }
}

/// What runs during a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Detached = 0,
    /// The agent as a node with this broker runs it: the broker RUNNING with its log dir where
    /// the bench's output is (ext4 here), so no syscall tracepoint is attached.
    Full = 1,
    /// As [`Mode::Full`] with `probes.node_wide_hooks = true`, plus an idle second broker with
    /// its log dir on tmpfs: the agent attaches the fsync syscall tracepoints for it (by default
    /// it attaches none), which put every syscall of every task on the node through the
    /// kernel's slow path. What opting in costs.
    OffExt4 = 2,
    /// As [`Mode::Full`] without the scheduler hook, which runs on every context switch.
    NoScheduler = 3,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Detached, Mode::Full, Mode::OffExt4, Mode::NoScheduler];

    /// The agent's `[probes]` settings for the mode.
    fn probes(self) -> &'static str {
        match self {
            Mode::Detached | Mode::Full => "",
            Mode::OffExt4 => "node_wide_hooks = true\n",
            // Each scheduler hook with its fallback: naming a program disables only it.
            Mode::NoScheduler => "disabled_programs = [\"sched_switch_btf\", \"sched_switch\"]\n",
        }
    }

    /// Whether the agent should have the fsync syscall tracepoints attached once settled.
    fn syscall_fsync(self) -> bool {
        self == Mode::OffExt4
    }
}

/// The programs that iterate at scrape time rather than hook an event.
const ITERATORS: [&str; 4] = ["tcp_live", "conn_live", "conn_spill_live", "listen_live"];

/// Adds every program's events and run time from one scrape.
fn add_program_stats(programs: &mut Vec<(String, f64, f64)>, text: &str) {
    let prefix = "brokerscope_probe_events_total{program=\"";
    for line in text.lines().filter(|l| l.starts_with(prefix)) {
        let Some(name) = line[prefix.len()..].split('"').next() else {
            continue;
        };
        let events = sample(text, "brokerscope_probe_events_total", name);
        let secs = sample(text, "brokerscope_probe_run_seconds_total", name);
        match programs.iter_mut().find(|(n, _, _)| n == name) {
            Some(e) => {
                e.1 += events;
                e.2 += secs;
            }
            None => programs.push((name.to_string(), events, secs)),
        }
    }
}

/// The bench's broker: `xtask bench-broker <case> <fetch file> kafka.Kafka <properties>`, a
/// process the agent discovers as a broker, serving `case` on its properties' listener.
struct Broker {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Broker {
    /// Writes `<dir>/<id>.properties` (node.id, a listener on a free port, `log_dir`) and starts
    /// the broker on it; returns once it listens.
    fn start(
        dir: &Path,
        id: u32,
        log_dir: &Path,
        case: Case,
        fetch_file: &Path,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        Self::start_with_log_dirs(dir, id, &log_dir.display().to_string(), case, fetch_file)
    }

    /// As [`Broker::start`] with `log.dirs` as given, which the broker never touches: they may
    /// be paths that cannot exist.
    fn start_with_log_dirs(
        dir: &Path,
        id: u32,
        log_dirs: &str,
        case: Case,
        fetch_file: &Path,
    ) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let properties = dir.join(format!("broker-{id}.properties"));
        std::fs::write(
            &properties,
            format!("node.id={id}\nlisteners=PLAINTEXT://127.0.0.1:{port}\nlog.dirs={log_dirs}\n"),
        )?;
        let mut child = Command::new(self_exe())
            .arg("bench-broker")
            .arg(case.key())
            .arg(fetch_file)
            .arg(port.to_string())
            .arg("kafka.Kafka")
            .arg(&properties)
            .stdout(Stdio::piped())
            .spawn()
            .context("start the bench broker")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("the bench broker did not start: {line:?}");
        }
        Ok(Self {
            child,
            addr: ([127, 0, 0, 1], port).into(),
        })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This very xtask binary, to run its hidden helper subcommands. Through `/proc/self/exe`,
/// which the kernel resolves to the running binary's inode even once `cargo` has rebuilt
/// `target/debug/xtask` under it (another `cargo xtask` run meanwhile), where
/// `current_exe()` would name a deleted file.
pub fn self_exe() -> &'static Path {
    Path::new("/proc/self/exe")
}

/// `xtask bench-broker`: serves `case` on 127.0.0.1:`port` until killed, a thread per
/// connection: reads a request, answers with an ack or a sendfile of the fetch file. Prints
/// `ready` once it listens.
pub fn serve_broker(case: &str, fetch_file: &Path, port: u16) -> anyhow::Result<()> {
    let case = Case::from_key(case).with_context(|| format!("no bench case {case:?}"))?;
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    println!("ready");
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let file = fetch_file.to_path_buf();
        std::thread::spawn(move || serve(stream, case, &file));
    }
    Ok(())
}

fn serve(mut stream: TcpStream, case: Case, fetch_file: &Path) {
    let request = if case == Case::Fetch { ACK } else { PRODUCE };
    let mut buf = vec![0u8; request];
    let file = std::fs::File::open(fetch_file).ok();
    while stream.read_exact(&mut buf).is_ok() {
        let ok = match (case, &file) {
            (Case::Fetch, Some(file)) => sendfile(&stream, file, FETCH),
            _ => stream.write_all(&[0u8; ACK]).is_ok(),
        };
        if !ok {
            return;
        }
    }
}

fn sendfile(stream: &TcpStream, file: &std::fs::File, len: usize) -> bool {
    let mut offset: libc::off_t = 0;
    while (offset as usize) < len {
        // SAFETY: valid fds and a valid offset pointer for the duration of the call.
        let n = unsafe {
            libc::sendfile(
                stream.as_raw_fd(),
                file.as_raw_fd(),
                &mut offset,
                len - offset as usize,
            )
        };
        if n <= 0 {
            return false;
        }
    }
    true
}

/// Requests per second over `ROUND` with `CLIENTS` clients.
fn load(case: Case, addr: std::net::SocketAddr) -> f64 {
    load_sliced(case, addr, ROUND, 1).0
}

/// Requests per second over `round` with `CLIENTS` clients, and in each of `slices` equal
/// slices of it.
fn load_sliced(
    case: Case,
    addr: std::net::SocketAddr,
    round: Duration,
    slices: u32,
) -> (f64, Vec<f64>) {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + round;
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                let answer = if case == Case::Fetch { FETCH } else { ACK };
                let request = vec![1u8; if case == Case::Fetch { ACK } else { PRODUCE }];
                let mut buf = vec![0u8; answer];
                let mut stream = None;
                while Instant::now() < deadline {
                    if stream.is_none() {
                        stream = TcpStream::connect(addr).ok();
                    }
                    let Some(s) = stream.as_mut() else { continue };
                    if s.write_all(&request).is_err() || s.read_exact(&mut buf).is_err() {
                        stream = None;
                        continue;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    if case == Case::ShortConnections {
                        stream = None;
                    }
                }
            })
        })
        .collect();
    let slice = round / slices.max(1);
    let mut per_slice = Vec::new();
    let mut before = 0;
    for k in 1..=slices.max(1) {
        let until = start + slice * k;
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        let now = done.load(Ordering::Relaxed);
        per_slice.push((now - before) as f64 / slice.as_secs_f64());
        before = now;
    }
    for t in threads {
        let _ = t.join();
    }
    (
        done.load(Ordering::Relaxed) as f64 / round.as_secs_f64(),
        per_slice,
    )
}

/// Empty programs (bpftrace's `{}`) on the two busiest hooks: the kernel's run-time stats of a
/// program that does nothing are the floor under every ns-per-event figure (the stats' own
/// clock reads and the dispatch), measured in the same pass.
struct EmptyPrograms {
    child: Child,
    /// (hook, program id)
    programs: Vec<(&'static str, u64)>,
}

const EMPTY_HOOKS: [&str; 2] = [
    "tracepoint:sched:sched_switch",
    "tracepoint:sock:inet_sock_set_state",
];

fn prog_ids() -> anyhow::Result<Vec<u64>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default())
}

impl EmptyPrograms {
    fn start() -> anyhow::Result<Self> {
        let before = prog_ids()?;
        let script: String = EMPTY_HOOKS.iter().map(|h| format!("{h} {{ }} ")).collect();
        let mut child = Command::new("bpftrace")
            .args(["-e", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("run bpftrace (installed by cargo xtask bench)")?;
        // bpftrace says "Attaching 2 probes..." before it attaches them: wait for the programs.
        let stdout = child.stdout.take().context("bpftrace's stdout")?;
        std::thread::spawn(move || {
            std::io::copy(&mut BufReader::new(stdout), &mut std::io::sink())
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let new: Vec<u64> = prog_ids()?
                .into_iter()
                .filter(|id| !before.contains(id))
                .collect();
            if new.len() >= EMPTY_HOOKS.len() {
                // bpftrace loads them in script order.
                let programs = EMPTY_HOOKS.iter().copied().zip(new).collect();
                return Ok(Self { child, programs });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("bpftrace did not load its programs");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// (hook, runs, seconds) of each empty program so far.
    fn stats(&self) -> Vec<(&'static str, f64, f64)> {
        self.programs
            .iter()
            .filter_map(|&(hook, id)| {
                let out = Command::new("bpftool")
                    .args(["-j", "prog", "show", "id", &id.to_string()])
                    .output()
                    .ok()?;
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                Some((
                    hook,
                    v["run_cnt"].as_f64().unwrap_or(0.0),
                    v["run_time_ns"].as_f64().unwrap_or(0.0) / 1e9,
                ))
            })
            .collect()
    }
}

impl Drop for EmptyPrograms {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent with `mode`'s probes, config and PKI under `dir`.
fn start_agent(bin: &Path, dir: &Path, mode: Mode) -> anyhow::Result<Agent> {
    Agent::start_with(bin, dir, mode.probes())
}

/// Waits (10 s at most) until broker 1 is RUNNING, the open hooks are gone with its start,
/// and the fsync syscall hooks are attached exactly when `mode` has a broker off ext4.
fn settle(agent: &Agent, mode: Mode) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = agent.metrics()?;
        let attached =
            |p: &str| text.contains(&format!("brokerscope_probe_attached{{program=\"{p}\""));
        let running = text.contains("brokerscope_broker_state{broker=\"1\"} 3");
        if running && !attached("state_openat") && attached("fsync_enter") == mode.syscall_fsync() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not settle for {mode:?}: broker 1 running {running}, \
                 state_openat attached {}, fsync_enter attached {}",
                attached("state_openat"),
                attached("fsync_enter")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sample(text: &str, name: &str, program: &str) -> f64 {
    let prefix = format!("{name}{{program=\"{program}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// CPU time used so far, in seconds: the whole machine's busy time (`/proc/stat`: user, nice,
/// system, irq and softirq; idle, iowait and steal left out) and the agent process's (its
/// threads' time on a CPU, from the scheduler's stats).
struct CpuTimes {
    busy: f64,
    process: f64,
}

/// What the agent took of the machine's busy CPU time over a window, as fractions.
#[derive(Clone, Copy, Default)]
struct Share {
    busy_seconds: f64,
    programs: f64,
    process: f64,
}

/// The length of a clock tick in seconds, and the machine's `cpu` line of /proc/stat in ticks
/// (user nice system idle iowait irq softirq steal ...).
fn proc_stat_cpu() -> anyhow::Result<(f64, Vec<f64>)> {
    // SAFETY: sysconf has no preconditions.
    let tick = 1.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .collect();
    Ok((tick, cpu))
}

impl CpuTimes {
    fn read(pid: u32) -> anyhow::Result<Self> {
        let (tick, cpu) = proc_stat_cpu()?;
        // user nice system idle iowait irq softirq steal
        let busy = [0, 1, 2, 5, 6]
            .iter()
            .map(|&i| cpu.get(i).copied().unwrap_or(0.0))
            .sum::<f64>();
        // Each thread's time on a CPU in ns (the first field of its schedstat): the ticks of
        // `/proc/<pid>/stat` are 10 ms, more than the agent takes in a window.
        let mut process_ns = 0.0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let path = task?.path().join("schedstat");
            if let Ok(text) = std::fs::read_to_string(path) {
                process_ns += text
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
        Ok(Self {
            busy: busy * tick,
            process: process_ns / 1e9,
        })
    }

    /// The share of the busy time since `start` that the agent's process and, with their run
    /// time over the same window, its programs took.
    fn share_since(&self, start: &CpuTimes, programs_seconds: f64) -> Share {
        let busy = self.busy - start.busy;
        if busy <= 0.0 {
            return Share::default();
        }
        Share {
            busy_seconds: busy,
            programs: programs_seconds / busy,
            process: (self.process - start.process) / busy,
        }
    }
}

/// The run time of the agent's hook programs in a scrape, iterators left out: they run when
/// scraped, not with the traffic.
fn hook_seconds(metrics: &str) -> f64 {
    let mut programs = Vec::new();
    add_program_stats(&mut programs, metrics);
    programs
        .iter()
        .filter(|(name, _, _)| !ITERATORS.contains(&name.as_str()))
        .map(|(_, _, secs)| secs)
        .sum()
}

/// Turns the kernel's BPF run-time accounting on for the bench and back off after.
struct BpfStats {
    before: String,
}

impl BpfStats {
    fn enable() -> Self {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let before = std::fs::read_to_string(path).unwrap_or_else(|_| "0".into());
        let _ = std::fs::write(path, "1");
        Self { before }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", self.before.trim());
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The lowest and highest per-round ratio once the extreme round at each end is dropped: how
/// far apart rounds of the same mode land, to read the medians against.
fn middle_range(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let middle = if v.len() > 2 {
        &v[1..v.len() - 1]
    } else {
        &v[..]
    };
    (
        middle.first().copied().unwrap_or(0.0),
        middle.last().copied().unwrap_or(0.0),
    )
}

/// One case's medians: req/s per mode, the ratio to detached per mode, each ratio's middle
/// range, and the agent's CPU share in the pass with the kernel's stats on.
type CaseResult = (Case, [f64; 4], [f64; 4], [(f64, f64); 4], Share);

/// One figure per [`Mode`], one entry per round.
type PerMode = [Vec<f64>; 4];

/// What the bench's runs share: the agent binary, the output directory, the fetched file.
struct Bench<'a> {
    bin: &'a Path,
    out_dir: &'a Path,
    fetch_file: &'a Path,
}

pub fn run(root: &Path, bin: &Path) -> anyhow::Result<()> {
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let fetch_file = out_dir.join("fetch.bin");
    std::fs::write(&fetch_file, vec![7u8; FETCH])?;
    let bench = Bench {
        bin,
        out_dir: &out_dir,
        fetch_file: &fetch_file,
    };

    let cases = [Case::Produce, Case::Fetch, Case::ShortConnections];
    // (case, median req/s per mode, median ratio to detached per attached mode)
    let mut results = Vec::new();
    let mut programs: Vec<(String, f64, f64)> = Vec::new();
    // The broker's log dir beside the report (ext4 here); the second broker's on tmpfs.
    let log_dir = out_dir.join("logs");
    let off_ext4_dir = Path::new("/dev/shm/brokerscope-bench");
    for case in cases {
        let server = Broker::start(&out_dir, 1, &log_dir, case, &fetch_file)?;
        let (rps, ratios) = bench.rounds(case, &server, off_ext4_dir)?;
        // The cost per event, from one more attached pass with the kernel's run-time stats
        // on. Not during the rounds: the stats add two clock reads to every program run, which
        // a production node does not pay.
        let share = bench.stats_pass(case, &server, &mut programs)?;
        let spread = ratios.clone().map(middle_range);
        results.push((case, rps.map(median), ratios.map(median), spread, share));
    }
    // The second broker's log dir is in memory: not left behind.
    let _ = std::fs::remove_dir_all(off_ext4_dir);

    let mut md = intro();
    let (overheads, json_cases) = overhead_tables(&results);
    md += &overheads;
    let (shares, json_shares) = cpu_share_table(&results);
    md += &shares;
    let (program_md, json_programs) = program_tables(&programs);
    md += &program_md;
    let (scrape_md, scrape_json) = {
        let report = crate::scrape::run(root, bin, &out_dir)?;
        crate::scrape::report(&report)
    };
    md += &scrape_md;
    let json = format!(
        "{{\"rounds\":{ROUNDS},\"round_seconds\":{},\"clients\":{CLIENTS},\"cases\":[{}],\"cpu_shares\":[{}],\"programs\":[{}],{scrape_json}}}\n",
        ROUND.as_secs(),
        json_cases.join(","),
        json_shares.join(","),
        json_programs.join(",")
    );
    std::fs::write(out_dir.join("report.md"), &md)?;
    std::fs::write(out_dir.join("report.json"), &json)?;
    println!("{md}");
    // Its own section of the report just written, which `--node-tax-only` replaces alone.
    run_node_tax(bin, &out_dir)
}

impl Bench<'_> {
    /// [`ROUNDS`] rounds of every mode against `server`: req/s per mode and the ratio to
    /// detached per mode, one entry per round.
    fn rounds(
        &self,
        case: Case,
        server: &Broker,
        off_ext4_dir: &Path,
    ) -> anyhow::Result<(PerMode, PerMode)> {
        let (bin, out_dir, fetch_file) = (self.bin, self.out_dir, self.fetch_file);
        let mut rps: PerMode = Default::default();
        let mut ratios: PerMode = Default::default();
        for round in 0..ROUNDS {
            // Rotate which mode goes first so drift over time hits all alike.
            let mut pass = [0.0; 4];
            for k in 0..4 {
                let mode = Mode::ALL[(round + k) % 4];
                let _off_ext4 = match mode {
                    Mode::OffExt4 => Some(Broker::start(
                        out_dir,
                        2,
                        &off_ext4_dir.join("logs"),
                        Case::Produce,
                        fetch_file,
                    )?),
                    _ => None,
                };
                let _agent = match mode {
                    Mode::Detached => None,
                    _ => {
                        let agent = start_agent(bin, out_dir, mode)?;
                        settle(&agent, mode)?;
                        Some(agent)
                    }
                };
                pass[mode as usize] = load(case, server.addr);
            }
            eprintln!(
                "bench: {} round {}: detached {:.0}, attached {:.0}, with a broker off ext4 {:.0}, \
                 without scheduler hooks {:.0} req/s",
                case.name(),
                round + 1,
                pass[0],
                pass[1],
                pass[2],
                pass[3]
            );
            for m in 0..4 {
                rps[m].push(pass[m]);
                ratios[m].push(pass[m] / pass[0]);
            }
        }
        Ok((rps, ratios))
    }

    /// One more attached pass with the kernel's run-time stats on: the agent's CPU share; the
    /// programs' runs and run time (the agent's and the empty ones') added to `programs`.
    fn stats_pass(
        &self,
        case: Case,
        server: &Broker,
        programs: &mut Vec<(String, f64, f64)>,
    ) -> anyhow::Result<Share> {
        let (bin, out_dir) = (self.bin, self.out_dir);
        let _stats = BpfStats::enable();
        let empty = EmptyPrograms::start()?;
        let agent = start_agent(bin, out_dir, Mode::Full)?;
        settle(&agent, Mode::Full)?;
        let start = CpuTimes::read(agent.pid())?;
        let programs_before = hook_seconds(&agent.metrics()?);
        let r = load(case, server.addr);
        let end = CpuTimes::read(agent.pid())?;
        let after = agent.metrics()?;
        let share = end.share_since(&start, hook_seconds(&after) - programs_before);
        eprintln!(
            "bench: {} with BPF stats on: {r:.0} req/s; the agent's programs {:.2}% and \
             its process {:.2}% of the busy CPU time",
            case.name(),
            share.programs * 100.0,
            share.process * 100.0
        );
        add_program_stats(programs, &after);
        for (hook, runs, secs) in empty.stats() {
            let name = format!("(empty program, bpftrace) {hook}");
            match programs.iter_mut().find(|(n, _, _)| *n == name) {
                Some(e) => {
                    e.1 += runs;
                    e.2 += secs;
                }
                None => programs.push((name, runs, secs)),
            }
        }
        Ok(share)
    }
}

/// The report's title and what the bench measures, how.
fn intro() -> String {
    let mut md = String::from("# brokerscope benchmark\n\n");
    md += &format!(
        "{CLIENTS} loopback clients, {ROUNDS} rounds of {}s per mode, modes rotated each round; \
         medians. The server is a broker to the agent (its own process, `kafka.Kafka` and a \
         server.properties on its command line): discovered, RUNNING, its listener watched and \
         its threads counted; its log dir is on ext4. Each attached round starts once the agent \
         has settled: the broker RUNNING, so the file-open syscall hooks are detached again. \
         Modes: detached (no agent); attached (every program this node needs: no syscall \
         tracepoint); with a broker off ext4 (`probes.node_wide_hooks = true` and a second, \
         idle broker with its log dir on tmpfs, for which the agent then attaches the \
         fsync/fdatasync syscall tracepoints: attaching any `syscalls:*` tracepoint puts every \
         syscall of every task on the slow path; what opting in costs, see also the node-tax \
         section); attached without the scheduler hooks \
         (`probes.disabled_programs` = sched_switch_btf and its fallback sched_switch, which run \
         on every context switch on the node). Overhead = \
         1 - mode/detached, the median of per-round ratios. The rounds run with \
         `kernel.bpf_stats_enabled` off, as on a production node; the ns per event below come \
         from one more attached pass per case with it on.\n\n",
        ROUND.as_secs()
    );
    md
}

/// The req/s and overhead per mode, and the per-round spread of the overheads: the section
/// and the cases' JSON.
fn overhead_tables(results: &[CaseResult]) -> (String, Vec<String>) {
    let mut md = String::new();
    md += "| case | detached req/s | attached req/s | overhead | broker off ext4 req/s | overhead | no scheduler hooks req/s | overhead |\n|---|---|---|---|---|---|---|---|\n";
    let mut json_cases = Vec::new();
    for (case, rps, ratio, spread, _) in results {
        md += &format!(
            "| {} | {:.0} | {:.0} | {:.2}% | {:.0} | {:.2}% | {:.0} | {:.2}% |\n",
            case.name(),
            rps[0],
            rps[1],
            (1.0 - ratio[1]) * 100.0,
            rps[2],
            (1.0 - ratio[2]) * 100.0,
            rps[3],
            (1.0 - ratio[3]) * 100.0
        );
        json_cases.push(format!(
            "{{\"case\":\"{}\",\"detached_rps\":{:.1},\"attached_rps\":{:.1},\"ratio\":{:.5},\"off_ext4_rps\":{:.1},\"off_ext4_ratio\":{:.5},\"no_scheduler_rps\":{:.1},\"no_scheduler_ratio\":{:.5},\"ratio_middle_ranges\":[[{:.5},{:.5}],[{:.5},{:.5}],[{:.5},{:.5}]]}}",
            case.key(),
            rps[0],
            rps[1],
            ratio[1],
            rps[2],
            ratio[2],
            rps[3],
            ratio[3],
            spread[1].0,
            spread[1].1,
            spread[2].0,
            spread[2].1,
            spread[3].0,
            spread[3].1
        ));
    }
    md += &format!(
        "\nPer-round overhead, lowest to highest once the extreme round at each end is dropped \
         ({} of {ROUNDS} rounds): overheads smaller than this spread are not resolved by the \
         bench on this machine.\n\n| case | attached | broker off ext4 | no scheduler hooks |\n|---|---|---|---|\n",
        ROUNDS.saturating_sub(2)
    );
    let overhead = |(low, high): (f64, f64)| {
        format!(
            "{:.2}% .. {:.2}%",
            (1.0 - high) * 100.0,
            (1.0 - low) * 100.0
        )
    };
    for (case, _, _, spread, _) in results {
        md += &format!(
            "| {} | {} | {} | {} |\n",
            case.name(),
            overhead(spread[1]),
            overhead(spread[2]),
            overhead(spread[3])
        );
    }
    (md, json_cases)
}

/// The agent's share of the busy CPU time per case: the section and its JSON.
fn cpu_share_table(results: &[CaseResult]) -> (String, Vec<String>) {
    let mut md = String::new();
    md += "\nThe agent's share of the machine's busy CPU time (user, system, irq and softirq, \
           over every CPU) in the attached pass with the kernel's stats on: its hook programs' \
           run time and its process's CPU time, against the busy time of the same window. Both \
           are measured in the same window, so the host's noise moves them together. An upper \
           bound for the programs (the stats' own clock reads are in their run time, and a \
           production node does not pay them), a lower bound for what the agent costs (the \
           dispatch to each program and the cache lines it takes from the traffic are not in \
           it).\n\n| case | busy CPU s | hook programs | agent process | together |\n|---|---|---|---|---|\n";
    let mut json_shares = Vec::new();
    for (case, _, _, _, share) in results {
        md += &format!(
            "| {} | {:.2} | {:.2}% | {:.2}% | {:.2}% |\n",
            case.name(),
            share.busy_seconds,
            share.programs * 100.0,
            share.process * 100.0,
            (share.programs + share.process) * 100.0
        );
        json_shares.push(format!(
            "{{\"case\":\"{}\",\"busy_seconds\":{:.3},\"programs_share\":{:.5},\"process_share\":{:.5}}}",
            case.key(),
            share.busy_seconds,
            share.programs,
            share.process
        ));
    }
    (md, json_shares)
}

/// The ns per run of each kernel hook and per element of each iterator, and the targets: the
/// section and the programs' JSON.
fn program_tables(programs: &[(String, f64, f64)]) -> (String, Vec<String>) {
    let mut md = String::new();
    // Kernel hooks run on every event of their kind on the node; the map and socket iterators
    // run only when scraped, once per element walked.
    let iterator = |name: &str| ITERATORS.contains(&name);
    let mut json_programs = Vec::new();
    for (title, iterators) in [
        (
            "Kernel hooks, per run (every event of their kind on the node)",
            false,
        ),
        (
            "Iterators, per element walked (only when scraped: `conn_live` per bucket of 8 \
             connection slots, `listen_live` per listening socket, `tcp_live` per socket of a \
             namespace swept once)",
            true,
        ),
    ] {
        md += &format!("\n{title}:\n\n| program | runs | ns per run |\n|---|---|---|\n");
        for (name, events, secs) in programs
            .iter()
            .filter(|(name, events, _)| *events > 0.0 && iterator(name) == iterators)
        {
            let ns = secs * 1e9 / events;
            md += &format!("| {name} | {events:.0} | {ns:.0} |\n");
            json_programs.push(format!(
                "{{\"program\":\"{name}\",\"iterator\":{iterators},\"events\":{events:.0},\"ns_per_event\":{ns:.1}}}"
            ));
        }
    }
    md += "\nThe `(empty program, bpftrace)` rows are programs that do nothing, on the same hooks in \
           the same pass: what the kernel's stats report for them is the measurement's own cost \
           (two clock reads per run) and the dispatch, part of every row above. `process_exec` \
           wakes the agent's reader through its ring buffer (the kernel's irq_work, a \
           self-interrupt, which in a VM is an exit to the hypervisor) at most once per 10 ms: \
           the few execs of this pass, far apart, each do, and that is most of its figure.\n";
    md += "\nTargets: overhead <= 2% at Kafka-like sizes; <= 150 ns per probe event.\n";
    (md, json_programs)
}

/// `cargo xtask bench --node-tax-only`: the node-tax part alone, its section of
/// `report.md` and its key of `report.json` replaced (the rest kept).
pub fn run_node_tax_only(root: &Path, bin: &Path) -> anyhow::Result<()> {
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    run_node_tax(bin, &out_dir)
}

/// `--procfs-only`: the agent's hidden `bench-procfs` (our /proc readers against the procfs
/// crate's) on its own process and pid 1, its table printed and kept in
/// target/bench/procfs.md.
pub fn run_procfs_only(root: &Path, bin: &Path) -> anyhow::Result<()> {
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let out = Command::new(bin)
        .arg("bench-procfs")
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run the agent's bench-procfs")?;
    if !out.status.success() {
        bail!("bench-procfs failed: {}", out.status);
    }
    let table = String::from_utf8_lossy(&out.stdout);
    print!("{table}");
    std::fs::write(out_dir.join("procfs.md"), table.as_bytes())?;
    Ok(())
}

fn run_node_tax(bin: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let fetch_file = out_dir.join("fetch.bin");
    if !fetch_file.exists() {
        std::fs::write(&fetch_file, vec![7u8; FETCH])?;
    }
    let report = node_tax::run(bin, out_dir, &fetch_file)?;
    report.merge_into(out_dir)?;
    println!("{}", report.markdown);
    println!("written to {}", out_dir.display());
    Ok(())
}
