//! The node-tax part of `cargo xtask bench`: whether any hook the agent attaches by default
//! slows processes other than the brokers (a `syscalls:*` tracepoint would: attaching one puts
//! every syscall of every task on the kernel's slow path, docs/kernels.md), and what it costs the
//! broker, with the brokers' log dirs wherever a node may have them.
//!
//! Per situation (log dirs on ext4, xfs and btrfs loop filesystems, on tmpfs, unreadable, and
//! while a second broker recovers thousands of segments; plus a control with
//! `probes.node_wide_hooks = true`), [`ROUNDS`] rounds each of one pass with the agent detached
//! and one attached, in alternating order. A pass runs an unrelated process (`xtask
//! bench-syscalls`: not a broker, pinned to one CPU) through a getppid(2) loop, then the
//! bench's produce load against broker 1 for [`PRODUCE_ROUND`], then the loop again. An
//! attached pass starts the
//! agent, waits until it has settled, reads which hooks it attached from `/ready` (and the
//! brokers from `/v1/brokers/{id}`), runs, reads them again, and stops it. The figures are
//! per-round ratios attached/detached, whose median and middle range are reported: the machine
//! is shared, so only ratios within a round mean anything.
//!
//! Owns the situations' mounts and loop devices (through [`super::mounts`]), the helper
//! processes, and the `## Node tax` section of the report and its `node_tax` key; its files,
//! mounts and backing files stay under `target/bench/node-tax`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{
    Broker, Case, load_sliced, median, middle_range,
    mounts::{self, Mounted},
    self_exe,
};
use crate::agent::{Agent, curl};

/// Rounds per situation, each one detached and one attached pass.
const ROUNDS: usize = 13;
/// getppid calls per run of the unrelated process, twice per pass (before and after the
/// produce load)...
const CALLS: u64 = 1_500_000;
/// ...timed in this many chunks (about 15 ms each) by the process's own CPU clock, so time it
/// spent preempted is not counted. The pass's figure is its fastest tenth ([`FASTEST`]).
const CHUNKS: u32 = 20;
/// The produce load of each pass (the bench's `produce 1 KiB` case)...
const PRODUCE_ROUND: Duration = Duration::from_secs(1);
/// ...counted in this many slices; the pass's figure is its fastest tenth.
const PRODUCE_SLICES: u32 = 10;
/// The share of a pass's chunks or slices its figure comes from, fastest first. The machine's
/// other work (a QEMU guest, builds) comes and goes within a pass and slows every process by
/// up to a third while it runs (measured: a pass's chunks cluster at ~175 and ~235 ns per
/// getppid); the fastest tenth is what a pass measures without it. A hook's cost is in every
/// chunk and slice alike.
const FASTEST: f64 = 0.1;
/// A round's produce passes count for the broker overhead only if the machine's other work
/// (not this bench's processes) took at most this share of its CPUs during each: the load
/// needs every CPU, so a QEMU guest taking one of two halves it, which no slice of a pass
/// escapes. The other work is measured, not the throughput, so this picks no result.
const QUIET_OTHERS: f64 = 0.1;
/// Fewest rounds the overhead is taken from; with fewer quiet ones, every round counts.
const MIN_QUIET_ROUNDS: usize = 3;
/// The recovering broker's segments, one per partition directory.
const SEGMENTS: usize = 3000;
/// How often it opens its next segment: all of them take 2 minutes, twice its situation's
/// rounds, so it stays in recovery (and not listening) throughout.
const RECOVERY_PACE: Duration = Duration::from_millis(40);
/// How long an attached pass waits for the agent to settle.
const SETTLE: Duration = Duration::from_secs(20);
/// The targets for every default-config situation: node tax and broker overhead.
const TARGET: f64 = 0.02;

/// Where the brokers' log dirs are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Situation {
    Ext4,
    Xfs,
    Btrfs,
    Tmpfs,
    /// Paths the agent cannot classify (see [`prepare`]).
    Unreadable,
    /// On ext4, while a second broker recovers [`SEGMENTS`] segments there.
    Recovering,
    /// The control: `probes.node_wide_hooks = true` and the log dir on tmpfs, whose fsyncs
    /// only the syscall tracepoints see.
    NodeWideHooks,
}

impl Situation {
    const ALL: [Situation; 7] = [
        Situation::Ext4,
        Situation::Xfs,
        Situation::Btrfs,
        Situation::Tmpfs,
        Situation::Unreadable,
        Situation::Recovering,
        Situation::NodeWideHooks,
    ];

    fn key(self) -> &'static str {
        match self {
            Situation::Ext4 => "ext4",
            Situation::Xfs => "xfs",
            Situation::Btrfs => "btrfs",
            Situation::Tmpfs => "tmpfs",
            Situation::Unreadable => "unreadable",
            Situation::Recovering => "recovering",
            Situation::NodeWideHooks => "node_wide_hooks_tmpfs",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Situation::Ext4 => "ext4 (loop device)",
            Situation::Xfs => "xfs (loop device)",
            Situation::Btrfs => "btrfs (loop device)",
            Situation::Tmpfs => "tmpfs",
            Situation::Unreadable => "unreadable log dirs",
            Situation::Recovering => "ext4, a second broker recovering 3000 segments",
            Situation::NodeWideHooks => "control: tmpfs with node_wide_hooks = true",
        }
    }

    fn default_config(self) -> bool {
        self != Situation::NodeWideHooks
    }

    /// The agent's `[probes]` section.
    fn probes(self) -> &'static str {
        if self.default_config() {
            ""
        } else {
            "node_wide_hooks = true\n"
        }
    }
}

/// A situation set up: broker 1's log dirs, and what must live while it holds.
struct Setting {
    log_dirs: String,
    /// Killed before the filesystem holding its segments is unmounted (fields drop in order).
    recovering: Option<RecoveringBroker>,
    fs: Option<Mounted>,
}

fn prepare(situation: Situation, dir: &Path) -> anyhow::Result<Setting> {
    let on = |fs: Mounted| -> anyhow::Result<Setting> {
        let logs = fs.path().join("logs-1");
        std::fs::create_dir_all(&logs)?;
        Ok(Setting {
            log_dirs: logs.display().to_string(),
            recovering: None,
            fs: Some(fs),
        })
    };
    match situation {
        Situation::Ext4 | Situation::Xfs | Situation::Btrfs => {
            on(Mounted::loop_fs(dir, situation.key())?)
        }
        Situation::Tmpfs | Situation::NodeWideHooks => on(Mounted::tmpfs(dir)?),
        Situation::Unreadable => {
            // The agent runs as root, so mode bits stop nothing it reads, and a log dir that
            // does not exist yet is classified by its nearest existing parent (where the broker
            // would make it): what it cannot classify is a path whose lookup fails otherwise.
            let base = dir.join("unreadable");
            let _ = std::fs::remove_dir_all(&base);
            std::fs::create_dir_all(&base)?;
            // A file where a directory should be (ENOTDIR) and a symlink to itself (ELOOP).
            std::fs::write(base.join("not-a-dir"), "")?;
            std::os::unix::fs::symlink("loop", base.join("loop"))?;
            Ok(Setting {
                log_dirs: format!("{b}/not-a-dir/logs,{b}/loop/logs", b = base.display()),
                recovering: None,
                fs: None,
            })
        }
        Situation::Recovering => {
            let mut setting = on(Mounted::loop_fs(dir, "ext4")?)?;
            let fs = setting.fs.as_ref().context("mounted")?.path();
            let logs = fs.join("recovering");
            for p in 0..SEGMENTS {
                let partition = logs.join(format!("recovering-{p}"));
                std::fs::create_dir_all(&partition)?;
                std::fs::write(partition.join("00000000000000000000.log"), "")?;
            }
            setting.recovering = Some(RecoveringBroker::start(dir, 2, &logs)?);
            Ok(setting)
        }
    }
}

/// `xtask bench-recovering-broker`: a broker to the agent that is recovering its logs.
struct RecoveringBroker {
    child: Child,
}

impl RecoveringBroker {
    /// Writes `<dir>/broker-<id>.properties` (a listener on a free port, `log_dir`) and starts
    /// the broker on it; returns once it has listed its segments.
    fn start(dir: &Path, id: u32, log_dir: &Path) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let properties = dir.join(format!("broker-{id}.properties"));
        std::fs::write(
            &properties,
            format!(
                "node.id={id}\nlisteners=PLAINTEXT://127.0.0.1:{port}\nlog.dirs={}\n",
                log_dir.display()
            ),
        )?;
        let mut child = Command::new(self_exe())
            .arg("bench-recovering-broker")
            .arg(RECOVERY_PACE.as_millis().to_string())
            .arg("kafka.Kafka")
            .arg(&properties)
            .stdout(Stdio::piped())
            .spawn()
            .context("start the recovering broker")?;
        let stdout = child.stdout.take();
        // From here on, killed if anything fails.
        let this = Self { child };
        let stdout = stdout.context("the recovering broker's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().transpose()?.unwrap_or_default();
        if first != format!("recovering {SEGMENTS}") {
            bail!("the recovering broker said {first:?}, not `recovering {SEGMENTS}`");
        }
        // Its later lines (`listening` once done) are not needed; drained so it never blocks.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(this)
    }
}

impl Drop for RecoveringBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An attached hook as `/ready` lists it: (program, scope).
type Hook = (String, String);

/// What the agent said while a situation held, over every attached pass.
#[derive(Default)]
struct Seen {
    /// (program, scope) of every hook `/ready` listed in any read, in its order.
    hooks: Vec<Hook>,
    /// The first read's hooks, to tell whether later reads differed.
    first: Option<Vec<Hook>>,
    hooks_changed: bool,
    /// Broker 1's `log_dir_filesystems` and `log_dir_fsync`.
    log_dir_filesystems: Vec<String>,
    log_dir_fsync: Vec<String>,
    /// Broker 1's state at each read.
    broker_states: Vec<String>,
    /// The recovering broker's state at each read, with its segments left when in RECOVERY.
    recovering_states: Vec<String>,
}

impl Seen {
    fn node_wide(&self) -> Vec<&str> {
        self.hooks
            .iter()
            .filter(|(_, scope)| scope == "node-wide")
            .map(|(p, _)| p.as_str())
            .collect()
    }
}

fn get_json(agent: &Agent, path: &str) -> anyhow::Result<Value> {
    let body = curl(&agent.pki, &agent.url(path))?;
    serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body:.200}"))
}

/// `/ready`'s hooks as (program, scope).
fn hooks(agent: &Agent) -> anyhow::Result<Vec<Hook>> {
    let ready = get_json(agent, "/ready")?;
    let field = |h: &Value, k: &str| h[k].as_str().unwrap_or("?").to_string();
    Ok(ready["hooks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|h| (field(h, "program"), field(h, "scope")))
                .collect()
        })
        .unwrap_or_default())
}

/// `/v1/brokers/{id}`, None while the agent does not know the broker.
fn broker(agent: &Agent, id: u32) -> anyhow::Result<Option<Value>> {
    let b = get_json(agent, &format!("/v1/brokers/{id}"))?;
    Ok(b.get("broker_state").is_some().then_some(b))
}

fn state_name(b: &Value) -> String {
    b["broker_state"]["name"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

/// Waits until the agent has settled for `situation`: broker 1 RUNNING, the recovering broker
/// (if any) known, for the control the fsync syscall hooks attached and the file-open ones
/// gone, and `/ready`'s hooks unchanged between two reads.
fn settle(agent: &Agent, situation: Situation) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE;
    let mut last = None;
    let mut why = String::new();
    loop {
        let settled = (|| -> anyhow::Result<bool> {
            let hooks = hooks(agent)?;
            let running = broker(agent, 1)?.is_some_and(|b| state_name(&b) == "RUNNING");
            let recovering = situation != Situation::Recovering || broker(agent, 2)?.is_some();
            // The control's node-wide hooks: the fsync ones attached for the tmpfs log dir, the
            // file-open ones (attached while a broker may be starting) detached again.
            let node_wide = situation.default_config()
                || (hooks.iter().any(|(p, _)| p == "fsync_enter")
                    && !hooks.iter().any(|(p, _)| p.starts_with("state_openat")));
            why = format!(
                "broker 1 running {running}, recovering broker known {recovering}, node-wide \
                 hooks as expected {node_wide}"
            );
            let stable = last.as_ref() == Some(&hooks);
            last = Some(hooks);
            Ok(running && recovering && node_wide && stable)
        })();
        match settled {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => why = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not settle for {} within {SETTLE:?}: {why}",
                situation.name()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Reads the hooks and brokers into `seen`.
fn observe(agent: &Agent, situation: Situation, seen: &mut Seen) -> anyhow::Result<()> {
    let hooks = hooks(agent)?;
    for h in &hooks {
        if !seen.hooks.contains(h) {
            seen.hooks.push(h.clone());
        }
    }
    match &seen.first {
        None => seen.first = Some(hooks),
        Some(first) => seen.hooks_changed |= *first != hooks,
    }
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap_or("?").into()).collect())
            .unwrap_or_default()
    };
    let b1 = broker(agent, 1)?.context("broker 1 unknown to the agent")?;
    seen.log_dir_filesystems = strings(&b1["log_dir_filesystems"]);
    seen.log_dir_fsync = strings(&b1["log_dir_fsync"]);
    seen.broker_states.push(state_name(&b1));
    if situation == Situation::Recovering {
        let state = match broker(agent, 2)? {
            None => "unknown".into(),
            Some(b2) => match b2["broker_state"]["recovery"]["remainingSegmentsToRecover"].as_i64()
            {
                Some(left) => format!("{} ({left} left)", state_name(&b2)),
                None => state_name(&b2),
            },
        };
        seen.recovering_states.push(state);
    }
    Ok(())
}

/// One run of the unrelated process: each chunk's (CPU ns per call, wall ns per call).
fn syscall_chunks(cpu: usize) -> anyhow::Result<Vec<(f64, f64)>> {
    let out = Command::new(self_exe())
        .arg("bench-syscalls")
        .args([CALLS.to_string(), CHUNKS.to_string(), cpu.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .context("run the syscall loop")?;
    if !out.status.success() {
        bail!("the syscall loop failed: {}", out.status);
    }
    let mut chunks = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Vec<f64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [calls, wall, cpu] = v[..]
            && calls > 0.0
        {
            chunks.push((cpu / calls, wall / calls));
        }
    }
    if chunks.is_empty() {
        bail!("the syscall loop printed no chunk");
    }
    Ok(chunks)
}

/// The [`FASTEST`] quantile of `v`: from the low end for times (`higher_is_faster` false),
/// from the high end for rates.
fn fastest(mut v: Vec<f64>, higher_is_faster: bool) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if higher_is_faster {
        v.reverse();
    }
    let i = ((v.len().saturating_sub(1)) as f64 * FASTEST).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

/// CPU seconds so far of the machine's tasks (user, nice and system time: interrupt time is
/// no task's), taken from this machine by the hypervisor for others (steal), and of this
/// process's tree (this bench, its brokers, agents and loops, reaped ones included), from
/// `/proc`'s 10 ms ticks.
struct CpuSplit {
    at: Instant,
    machine: f64,
    steal: f64,
    ours: f64,
}

impl CpuSplit {
    fn read() -> anyhow::Result<Self> {
        // user nice system idle iowait irq softirq steal
        let (tick, cpu) = super::proc_stat_cpu()?;
        let field = |i: usize| cpu.get(i).copied().unwrap_or(0.0);
        let machine = field(0) + field(1) + field(2);
        let steal = field(7);
        // (pid, ppid, utime + stime + cutime + cstime) of every process.
        let mut procs = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // After the command name, which may hold spaces and parentheses: state is field
            // 3, ppid 4, utime..cstime 14..17.
            let Some((_, rest)) = text.rsplit_once(')') else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| {
                f.get(i - 3)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            procs.push((pid, num(4) as u32, num(14) + num(15) + num(16) + num(17)));
        }
        let mut ours = vec![std::process::id()];
        // Descendants, found parent first: a few passes over a small table.
        loop {
            let before = ours.len();
            for (pid, ppid, _) in &procs {
                if ours.contains(ppid) && !ours.contains(pid) {
                    ours.push(*pid);
                }
            }
            if ours.len() == before {
                break;
            }
        }
        let ours_ticks: f64 = procs
            .iter()
            .filter(|(pid, _, _)| ours.contains(pid))
            .map(|(_, _, t)| t)
            .sum();
        Ok(Self {
            at: Instant::now(),
            machine: machine * tick,
            steal: steal * tick,
            ours: ours_ticks * tick,
        })
    }

    /// The share of the machine's CPUs that work other than this bench's took since `start`,
    /// in this machine or (steal) beside it.
    fn others_since(&self, start: &CpuSplit) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = (self.at - start.at).as_secs_f64() * cpus;
        let others =
            (self.machine - start.machine) - (self.ours - start.ours) + (self.steal - start.steal);
        if wall > 0.0 {
            (others / wall).max(0.0)
        } else {
            0.0
        }
    }
}

/// One situation's figures: per round, [detached, attached].
struct Outcome {
    situation: Situation,
    log_dirs: String,
    ns: [Vec<f64>; 2],
    wall_ns: [Vec<f64>; 2],
    rps: [Vec<f64>; 2],
    /// Over the whole pass, for the record.
    mean_rps: [Vec<f64>; 2],
    /// The share of the machine's CPUs other work took during each produce load.
    others: [Vec<f64>; 2],
    seen: Seen,
    seconds: f64,
}

impl Outcome {
    /// attached/detached per round.
    fn ratios(v: &[Vec<f64>; 2]) -> Vec<f64> {
        v[1].iter().zip(&v[0]).map(|(a, d)| a / d).collect()
    }

    /// Node tax: the median per-round ratio of ns per call, minus one, and the middle range.
    fn tax(&self) -> (f64, (f64, f64)) {
        let r = Self::ratios(&self.ns);
        let (low, high) = middle_range(r.clone());
        (median(r) - 1.0, (low - 1.0, high - 1.0))
    }

    /// The rounds whose produce passes both ran with the machine's other work quiet
    /// ([`QUIET_OTHERS`]), or every round when fewer than [`MIN_QUIET_ROUNDS`] did.
    fn quiet_rounds(&self) -> Vec<usize> {
        let quiet = self.strictly_quiet();
        if quiet.len() >= MIN_QUIET_ROUNDS {
            quiet
        } else {
            (0..self.rps[0].len()).collect()
        }
    }

    fn strictly_quiet(&self) -> Vec<usize> {
        (0..self.rps[0].len())
            .filter(|&r| self.others[0][r].max(self.others[1][r]) <= QUIET_OTHERS)
            .collect()
    }

    /// Which rounds the broker overhead is from, in words.
    fn rounds_used(&self) -> String {
        let (quiet, all) = (self.strictly_quiet().len(), self.rps[0].len());
        if quiet >= MIN_QUIET_ROUNDS {
            format!("{quiet} quiet of {all} rounds")
        } else {
            format!("all {all} rounds, {quiet} quiet")
        }
    }

    /// Broker overhead: one minus the median per-round ratio of produce req/s over the quiet
    /// rounds, and the middle range.
    fn overhead(&self) -> (f64, (f64, f64)) {
        let r: Vec<f64> = self
            .quiet_rounds()
            .into_iter()
            .map(|i| self.rps[1][i] / self.rps[0][i])
            .collect();
        let (low, high) = middle_range(r.clone());
        (1.0 - median(r), (1.0 - high, 1.0 - low))
    }

    /// Whether the targets were met: (node tax, broker overhead), each by
    /// [`target`]; None for the control, which is not held to them. A node-wide hook fails
    /// both, whatever the figures.
    fn verdict(&self) -> Option<(&'static str, &'static str)> {
        if !self.situation.default_config() {
            return None;
        }
        if !self.seen.node_wide().is_empty() {
            return Some(("not met: node-wide hook", "not met: node-wide hook"));
        }
        let (tax, tax_range) = self.tax();
        let (overhead, overhead_range) = self.overhead();
        Some((target(tax, tax_range), target(overhead, overhead_range)))
    }
}

/// A cost against [`TARGET`]: `met` (median and the whole middle range within it), `met by
/// the median` (the range reaches over: not resolved on this machine), `over, within the
/// spread` (the median over, the range reaching under), `not met`.
fn target(median: f64, (low, high): (f64, f64)) -> &'static str {
    if median <= TARGET && high <= TARGET {
        "met"
    } else if median <= TARGET {
        "met by the median"
    } else if low <= TARGET {
        "over, within the spread"
    } else {
        "not met"
    }
}

fn measure(
    situation: Situation,
    bin: &Path,
    dir: &Path,
    fetch_file: &Path,
    cpu: usize,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let setting = prepare(situation, dir)?;
    let broker = Broker::start_with_log_dirs(dir, 1, &setting.log_dirs, Case::Produce, fetch_file)?;
    let mut outcome = Outcome {
        situation,
        log_dirs: setting.log_dirs.clone(),
        ns: Default::default(),
        wall_ns: Default::default(),
        rps: Default::default(),
        mean_rps: Default::default(),
        others: Default::default(),
        seen: Seen::default(),
        seconds: 0.0,
    };
    for round in 0..ROUNDS {
        let mut settled_in = Duration::ZERO;
        // Alternate which goes first, so drift over time hits both alike.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for attached in order {
            let agent = if attached == 1 {
                let starting = Instant::now();
                let agent = Agent::start_with(bin, dir, situation.probes())?;
                settle(&agent, situation)?;
                settled_in = starting.elapsed();
                observe(&agent, situation, &mut outcome.seen)?;
                Some(agent)
            } else {
                None
            };
            // The syscall loop on both sides of the produce load, a second apart: more chances
            // to run while the machine's other work pauses.
            let mut chunks = syscall_chunks(cpu)?;
            let before = CpuSplit::read()?;
            let (mean_rps, slices) =
                load_sliced(Case::Produce, broker.addr, PRODUCE_ROUND, PRODUCE_SLICES);
            outcome.others[attached].push(CpuSplit::read()?.others_since(&before));
            let rps = fastest(slices, true);
            chunks.extend(syscall_chunks(cpu)?);
            let ns = fastest(chunks.iter().map(|c| c.0).collect(), false);
            let wall = fastest(chunks.iter().map(|c| c.1).collect(), false);
            if let Some(agent) = &agent {
                // Still so at the end of the pass.
                observe(agent, situation, &mut outcome.seen)?;
            }
            drop(agent);
            outcome.ns[attached].push(ns);
            outcome.wall_ns[attached].push(wall);
            outcome.rps[attached].push(rps);
            outcome.mean_rps[attached].push(mean_rps);
        }
        log_round(situation, round, &outcome, settled_in);
    }
    drop(broker);
    drop(setting);
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// A round's figures, on stderr as the bench goes.
fn log_round(situation: Situation, round: usize, outcome: &Outcome, settled_in: Duration) {
    eprintln!(
        "bench: node tax, {} round {}: getppid {:.1} / {:.1} ns per call, produce {:.0} / \
         {:.0} req/s (detached / attached), other work {:.0}% / {:.0}% of the CPUs; the \
         agent settled in {:.1} s{}",
        situation.name(),
        round + 1,
        outcome.ns[0][round],
        outcome.ns[1][round],
        outcome.rps[0][round],
        outcome.rps[1][round],
        outcome.others[0][round] * 100.0,
        outcome.others[1][round] * 100.0,
        settled_in.as_secs_f64(),
        match outcome.seen.recovering_states.last() {
            Some(s) => format!("; recovering broker {s}"),
            None => String::new(),
        }
    );
}

/// The node-tax section of the report and its figures.
pub struct Report {
    pub markdown: String,
    json: Value,
}

/// Runs every situation; the report.
pub fn run(bin: &Path, out_dir: &Path, fetch_file: &Path) -> anyhow::Result<Report> {
    let dir = out_dir.join("node-tax");
    mounts::clean_leftovers(&dir)?;
    std::fs::create_dir_all(&dir)?;
    // The last CPU: pinned, the loop is not migrated between passes.
    let cpu = std::thread::available_parallelism()
        .map(|n| n.get() - 1)
        .unwrap_or(0);
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for situation in Situation::ALL {
        outcomes.push(measure(situation, bin, &dir, fetch_file, cpu)?);
    }
    let _ = std::fs::remove_dir_all(dir.join("unreadable"));
    Ok(report(&outcomes, cpu, started.elapsed()))
}

fn percent(x: f64) -> String {
    format!("{:+.1}%", x * 100.0)
}

fn report(outcomes: &[Outcome], cpu: usize, took: Duration) -> Report {
    let mut md = intro(cpu, took);
    md += "| situation | config | broker 1's log dirs as the agent sees them (fsync measured by) \
           | hooks attached | getppid ns/call detached / attached | node tax | produce req/s \
           detached / attached | broker overhead | targets |\n\
           |---|---|---|---|---|---|---|---|---|\n";
    let mut json_situations = Vec::new();
    for o in outcomes {
        let (row, json) = situation_row(o);
        md += &row;
        json_situations.push(json);
    }
    md += &hooks_section(outcomes);
    let json = json!({
        "rounds": ROUNDS,
        "calls_per_pass": CALLS,
        "chunks_per_pass": CHUNKS,
        "cpu": cpu,
        "produce_round_seconds": PRODUCE_ROUND.as_secs_f64(),
        "recovering_segments": SEGMENTS,
        "recovery_pace_ms": RECOVERY_PACE.as_millis() as u64,
        "target": TARGET,
        "seconds": took.as_secs_f64(),
        "situations": json_situations,
    });
    Report { markdown: md, json }
}

/// The section's title and how the node tax is measured and judged.
fn intro(cpu: usize, took: Duration) -> String {
    let mut md = String::from("\n## Node tax\n\n");
    md += &format!(
        "Whether a hook the agent attaches slows processes other than the brokers, and what it \
         costs the broker, with the brokers' log dirs wherever a node may have them. \
         {ROUNDS} rounds per situation, each one pass with the agent detached and one attached, \
         alternating which goes first ({:.0} s in all).\n\n\
         - A pass: an unrelated process (`xtask bench-syscalls`, not a broker, pinned to CPU \
         {cpu}) makes {CALLS} getppid(2) calls in {CHUNKS} chunks timed by its own CPU clock; \
         then the `produce 1 KiB` load runs against broker 1 for {} s, counted in \
         {PRODUCE_SLICES} slices; then the getppid loop again. A pass's figure is its fastest {f:.0}% of chunks or slices: \
         the machine's other work (2 cores, shared) comes and goes within a pass and slows \
         everything by up to a third while it runs; a hook's cost is in every chunk alike.\n\
         - An attached pass starts the agent, waits until it has settled (broker 1 RUNNING, \
         `/ready`'s hooks unchanged between two reads), reads `/ready`'s `hooks` and \
         `/v1/brokers/{{id}}`, runs, reads them again, and stops the agent.\n\
         - Node tax = median per-round ratio attached/detached of ns per call, minus one; \
         broker overhead = one minus the median per-round ratio of req/s, over the rounds in \
         which the machine's other work (its busy CPU time less this bench's processes') took \
         at most {q:.0}% of its CPUs during both produce loads (every round if fewer than \
         {MIN_QUIET_ROUNDS}): the load needs every CPU, and a QEMU guest busy on one of two \
         halves it for seconds at a time; req/s columns are medians over those rounds. In brackets the \
         per-round range once the extreme round at each end is dropped: a median inside a \
         range that wide is not resolved on this machine.\n\
         - Targets (the issue): node tax <= {t:.0}% and broker overhead <= {t:.0}% with the \
         default config, and no node-wide hook. Each: `met` (median and range within it), \
         `met by the median` (the range reaches over it: not resolved here), `over, within \
         the spread` (median over, range reaching under), `not met`.\n\
         - Log dirs: a fresh ext4, xfs or btrfs on a loop device; tmpfs; unreadable: a path \
         through a regular file (ENOTDIR) and one through a symlink to itself (ELOOP), as the \
         agent runs as root (mode 000 stops nothing) and classifies a log dir that does not \
         exist yet by its nearest existing parent; recovering: ext4, and a second broker \
         (`kafka.Kafka` on its command line, not listening) opening one of its {SEGMENTS} \
         segments every {} ms and keeping them open. The control opts in to \
         `probes.node_wide_hooks`.\n\n",
        took.as_secs_f64(),
        PRODUCE_ROUND.as_secs(),
        RECOVERY_PACE.as_millis(),
        f = FASTEST * 100.0,
        q = QUIET_OTHERS * 100.0,
        t = TARGET * 100.0,
    );
    md
}

/// One situation's row of the table, and its figures.
fn situation_row(o: &Outcome) -> (String, Value) {
    let (tax, (tax_low, tax_high)) = o.tax();
    let (overhead, (over_low, over_high)) = o.overhead();
    let hooks_cell = hooks_cell(o);
    let dirs = o
        .seen
        .log_dir_filesystems
        .iter()
        .zip(o.seen.log_dir_fsync.iter())
        .map(|(fs, how)| format!("{fs} ({how})"))
        .collect::<Vec<_>>()
        .join(", ");
    let med = |v: &Vec<f64>| median(v.clone());
    let quiet = o.quiet_rounds();
    let rps_median = |k: usize| median(quiet.iter().map(|&r| o.rps[k][r]).collect());
    let row = format!(
        "| {} | {} | {dirs} | {hooks_cell} | {:.1} / {:.1} | {} ({} .. {}) | {:.0} / {:.0} \
         | {} ({} .. {}; {}) | {} |\n",
        o.situation.name(),
        if o.situation.default_config() {
            "default"
        } else {
            "node_wide_hooks = true"
        },
        med(&o.ns[0]),
        med(&o.ns[1]),
        percent(tax),
        percent(tax_low),
        percent(tax_high),
        rps_median(0),
        rps_median(1),
        percent(overhead),
        percent(over_low),
        percent(over_high),
        o.rounds_used(),
        match o.verdict() {
            None => "control".to_string(),
            Some((tax, overhead)) => format!("node tax: {tax}; broker overhead: {overhead}"),
        }
    );
    let ranges = Ranges {
        tax: (tax, (tax_low, tax_high)),
        overhead: (overhead, (over_low, over_high)),
    };
    (row, situation_json(o, &ranges))
}

/// A situation's node tax and broker overhead, each with its per-round range.
struct Ranges {
    tax: (f64, (f64, f64)),
    overhead: (f64, (f64, f64)),
}

/// How many hooks were attached, which node-wide, and whether they changed between reads.
fn hooks_cell(o: &Outcome) -> String {
    let node_wide = o.seen.node_wide();
    format!(
        "{}{}{}",
        o.seen.hooks.len(),
        if node_wide.is_empty() {
            ", none node-wide".to_string()
        } else {
            format!(", **node-wide: {}**", node_wide.join(", "))
        },
        if o.seen.hooks_changed {
            " (changed between reads)"
        } else {
            ""
        }
    )
}

/// A situation's figures in report.json.
fn situation_json(o: &Outcome, ranges: &Ranges) -> Value {
    let (tax, (tax_low, tax_high)) = ranges.tax;
    let (overhead, (over_low, over_high)) = ranges.overhead;
    let node_wide = o.seen.node_wide();
    let med = |v: &Vec<f64>| median(v.clone());
    let quiet = o.quiet_rounds();
    let rps_median = |k: usize| median(quiet.iter().map(|&r| o.rps[k][r]).collect());
    json!({
        "situation": o.situation.key(),
        "name": o.situation.name(),
        "default_config": o.situation.default_config(),
        "log_dirs": o.log_dirs,
        "log_dir_filesystems": o.seen.log_dir_filesystems,
        "log_dir_fsync": o.seen.log_dir_fsync,
        "hooks": o.seen.hooks.iter().map(|(p, s)| json!({"program": p, "scope": s})).collect::<Vec<_>>(),
        "node_wide_hooks": node_wide,
        "hooks_changed_between_reads": o.seen.hooks_changed,
        "broker_states": o.seen.broker_states,
        "recovering_broker_states": o.seen.recovering_states,
        "ns_per_call": {"detached": o.ns[0], "attached": o.ns[1]},
        "wall_ns_per_call": {"detached": o.wall_ns[0], "attached": o.wall_ns[1]},
        "produce_rps": {"detached": o.rps[0], "attached": o.rps[1]},
        "produce_rps_whole_pass": {"detached": o.mean_rps[0], "attached": o.mean_rps[1]},
        "ns_per_call_median": {"detached": med(&o.ns[0]), "attached": med(&o.ns[1])},
        "produce_rps_median": {"detached": rps_median(0), "attached": rps_median(1)},
        "other_work_share": {"detached": o.others[0], "attached": o.others[1]},
        "overhead_rounds": quiet,
        "quiet_rounds": o.strictly_quiet(),
        "node_tax": tax,
        "node_tax_range": [tax_low, tax_high],
        "broker_overhead": overhead,
        "broker_overhead_range": [over_low, over_high],
        "targets": o.verdict().map(|(tax, overhead)| json!({
            "node_tax": tax,
            "broker_overhead": overhead,
        })),
        "seconds": o.seconds,
    })
}

/// The hooks attached, grouped by situations that attached the same set; the recovering
/// broker's states; broker 1's states when not always RUNNING.
fn hooks_section(outcomes: &[Outcome]) -> String {
    let mut md = String::new();
    // Hooks, grouped by situations that attached the same set.
    md += "\nHooks attached (`/ready`'s `hooks`, read once settled and again at the end of every \
           attached pass; node-wide ones in bold):\n\n";
    let mut groups: Vec<(Vec<&str>, &Vec<Hook>)> = Vec::new();
    for o in outcomes {
        match groups.iter_mut().find(|(_, h)| **h == o.seen.hooks) {
            Some((names, _)) => names.push(o.situation.name()),
            None => groups.push((vec![o.situation.name()], &o.seen.hooks)),
        }
    }
    for (names, hooks) in groups {
        let list: Vec<String> = hooks
            .iter()
            .map(|(p, s)| {
                if s == "node-wide" {
                    format!("**{p}** (node-wide)")
                } else {
                    format!("`{p}`")
                }
            })
            .collect();
        md += &format!("- {}: {}\n", names.join("; "), list.join(", "));
    }
    for o in outcomes
        .iter()
        .filter(|o| !o.seen.recovering_states.is_empty())
    {
        md += &format!(
            "\nThe recovering broker as the agent saw it (`/v1/brokers/2`, once settled and at \
             the end of each attached pass): {}.\n",
            o.seen.recovering_states.join(", ")
        );
    }
    let odd: Vec<String> = outcomes
        .iter()
        .filter(|o| o.seen.broker_states.iter().any(|s| s != "RUNNING"))
        .map(|o| {
            format!(
                "{}: {}",
                o.situation.name(),
                o.seen.broker_states.join(", ")
            )
        })
        .collect();
    if !odd.is_empty() {
        md += &format!(
            "\nBroker 1 was not RUNNING at every read: {}.\n",
            odd.join("; ")
        );
    }
    md
}

impl Report {
    /// Replaces (or appends) the `## Node tax` section of `report.md` and the `node_tax` key
    /// of `report.json`, keeping the rest of an earlier run's report.
    pub fn merge_into(&self, out_dir: &Path) -> anyhow::Result<()> {
        let json_path = out_dir.join("report.json");
        let json = match std::fs::read_to_string(&json_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(json!({})),
            Err(e) => return Err(e).context(format!("read {}", json_path.display())),
            Ok(text) => serde_json::from_str::<Value>(&text)
                .ok()
                .filter(Value::is_object),
        };
        match json {
            Some(mut json) => {
                json["node_tax"] = self.json.clone();
                std::fs::write(&json_path, serde_json::to_string(&json)? + "\n")?;
            }
            None => {
                // Not ours to overwrite: the figures go beside it.
                let beside = out_dir.join("node-tax.json");
                eprintln!(
                    "bench: {} is not a JSON object; the node-tax figures are in {}",
                    json_path.display(),
                    beside.display()
                );
                std::fs::write(&beside, serde_json::to_string(&self.json)? + "\n")?;
            }
        }

        let md_path = out_dir.join("report.md");
        let mut md = std::fs::read_to_string(&md_path)
            .unwrap_or_else(|_| "# brokerscope benchmark\n".into());
        const HEADING: &str = "\n## Node tax\n";
        if let Some(start) = md.find(HEADING) {
            let end = md[start + HEADING.len()..]
                .find("\n## ")
                .map_or(md.len(), |i| start + HEADING.len() + i);
            md.replace_range(start..end, "");
        }
        md.truncate(md.trim_end().len());
        md.push('\n');
        md += &self.markdown;
        std::fs::write(&md_path, md)?;
        Ok(())
    }
}

/// Ends this process when the bench that started it ends, however it ends.
fn die_with_parent() {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and has no other effect.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
}

/// `xtask bench-syscalls CALLS CHUNKS CPU`: the unrelated process. Pinned to `CPU`, makes
/// `CALLS` getppid(2) calls in `CHUNKS` chunks and prints each chunk's `calls wall_ns cpu_ns`
/// (the CPU time is the thread's own: time spent preempted is not in it).
pub fn syscall_loop(calls: u64, chunks: u32, cpu: usize) -> anyhow::Result<()> {
    die_with_parent();
    pin_to(cpu)?;
    let chunks = chunks.max(1);
    let per_chunk = calls / u64::from(chunks);
    // Warm up: the code paged in, the CPU's frequency up.
    spin(per_chunk / 4);
    let mut out = String::new();
    for _ in 0..chunks {
        let (wall0, cpu0) = (
            clock(libc::CLOCK_MONOTONIC),
            clock(libc::CLOCK_THREAD_CPUTIME_ID),
        );
        spin(per_chunk);
        let (wall1, cpu1) = (
            clock(libc::CLOCK_MONOTONIC),
            clock(libc::CLOCK_THREAD_CPUTIME_ID),
        );
        out += &format!("{per_chunk} {} {}\n", wall1 - wall0, cpu1 - cpu0);
    }
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

fn spin(calls: u64) {
    for _ in 0..calls {
        // SAFETY: getppid takes no arguments and cannot fail. Through syscall(2), so no libc
        // caches it.
        std::hint::black_box(unsafe { libc::syscall(libc::SYS_getppid) });
    }
}

fn clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn pin_to(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for cpu below
    // CPU_SETSIZE; sched_setaffinity reads the set it is given.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("pin to CPU {cpu}"));
    }
    Ok(())
}

/// `xtask bench-recovering-broker PACE_MS kafka.Kafka PROPERTIES`: a broker recovering its logs.
/// Lists every `*.log` under the properties' `log.dirs` (sorted), prints `recovering <n>`,
/// then opens one every `PACE_MS`, keeping each open as Kafka keeps a loaded segment's
/// FileChannel, and only once all are open listens on its listener's port (prints
/// `listening`), until killed.
pub fn recovering_broker(properties: &Path, pace_ms: u64) -> anyhow::Result<()> {
    die_with_parent();
    let text = std::fs::read_to_string(properties)
        .with_context(|| format!("read {}", properties.display()))?;
    let value = |key: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix('='))
                .map(str::trim)
        })
    };
    let port: u16 = value("listeners")
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .context("no listener port in the properties")?;
    let mut segments: Vec<PathBuf> = Vec::new();
    for dir in value("log.dirs")
        .unwrap_or_default()
        .split(',')
        .filter(|d| !d.is_empty())
    {
        for partition in std::fs::read_dir(dir)?.flatten() {
            for file in std::fs::read_dir(partition.path())?.flatten() {
                if file.file_name().to_string_lossy().ends_with(".log") {
                    segments.push(file.path());
                }
            }
        }
    }
    segments.sort();
    raise_nofile(segments.len() as u64 + 64)?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "recovering {}", segments.len())?;
    stdout.flush()?;
    let mut open = Vec::with_capacity(segments.len());
    for segment in &segments {
        std::thread::sleep(Duration::from_millis(pace_ms));
        open.push(
            std::fs::File::open(segment).with_context(|| format!("open {}", segment.display()))?,
        );
    }
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    // Nobody may read this any more: a write error is no reason to stop.
    let _ = writeln!(stdout, "listening");
    let _ = stdout.flush();
    for stream in listener.incoming() {
        drop(stream);
    }
    drop(open);
    Ok(())
}

/// The soft open-file limit up to at least `need` (the hard limit allowing), as the JVM raises
/// it to the hard limit at start.
fn raise_nofile(need: u64) -> anyhow::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to read into and then from.
    let rc = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            -1
        } else if limit.rlim_cur >= need {
            0
        } else {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit)
        }
    };
    if rc != 0 || limit.rlim_cur < need {
        bail!(
            "cannot hold {need} files open (RLIMIT_NOFILE {} of at most {})",
            limit.rlim_cur,
            limit.rlim_max
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fastest_takes_the_fast_tenth_from_the_right_end() {
        let times: Vec<f64> = (1..=21).map(f64::from).collect();
        // Index round(20 * 0.1) = 2 from the fast end.
        assert_eq!(fastest(times.clone(), false), 3.0);
        assert_eq!(fastest(times, true), 19.0);
        assert_eq!(fastest(vec![], false), 0.0);
    }

    fn outcome(
        situation: Situation,
        ns: [f64; 2],
        rps: [[f64; 4]; 2],
        others: [[f64; 4]; 2],
    ) -> Outcome {
        Outcome {
            situation,
            log_dirs: String::new(),
            ns: [vec![ns[0]; 4], vec![ns[1]; 4]],
            wall_ns: Default::default(),
            rps: rps.map(Vec::from),
            mean_rps: Default::default(),
            others: others.map(Vec::from),
            seen: Seen::default(),
            seconds: 0.0,
        }
    }

    #[test]
    fn broker_overhead_counts_the_quiet_rounds_only() {
        // Round 1 had other work in its attached pass, which halved it.
        let o = outcome(
            Situation::Ext4,
            [100.0, 101.0],
            [[100.0, 100.0, 100.0, 100.0], [99.0, 50.0, 99.0, 99.0]],
            [[0.0, 0.0, 0.05, 0.0], [0.0, 0.4, 0.0, 0.0]],
        );
        assert_eq!(o.quiet_rounds(), vec![0, 2, 3]);
        assert_eq!(o.rounds_used(), "3 quiet of 4 rounds");
        let (overhead, _) = o.overhead();
        assert!((overhead - 0.01).abs() < 1e-9, "{overhead}");
        let (tax, _) = o.tax();
        assert!((tax - 0.01).abs() < 1e-9, "{tax}");
        assert_eq!(o.verdict(), Some(("met", "met")));
    }

    #[test]
    fn every_round_counts_when_too_few_are_quiet() {
        let o = outcome(
            Situation::Ext4,
            [100.0, 100.0],
            [[100.0; 4], [100.0; 4]],
            [[0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.0, 0.0]],
        );
        assert_eq!(o.quiet_rounds(), vec![0, 1, 2, 3]);
        assert_eq!(o.rounds_used(), "all 4 rounds, 1 quiet");
    }

    #[test]
    fn a_node_wide_hook_fails_the_targets_whatever_the_figures() {
        let mut o = outcome(
            Situation::Tmpfs,
            [100.0, 100.0],
            [[100.0; 4]; 2],
            [[0.0; 4]; 2],
        );
        assert_eq!(o.verdict(), Some(("met", "met")));
        o.seen
            .hooks
            .push(("fsync_enter".into(), "node-wide".into()));
        let no = "not met: node-wide hook";
        assert_eq!(o.verdict(), Some((no, no)));
        o.situation = Situation::NodeWideHooks;
        assert_eq!(o.verdict(), None);
    }

    #[test]
    fn a_target_is_met_only_as_far_as_the_rounds_resolve_it() {
        assert_eq!(target(0.01, (-0.01, 0.02)), "met");
        assert_eq!(target(0.01, (-0.05, 0.08)), "met by the median");
        assert_eq!(target(0.03, (0.01, 0.08)), "over, within the spread");
        assert_eq!(target(0.20, (0.15, 0.25)), "not met");
    }

    #[test]
    fn merging_replaces_only_the_node_tax_section_and_key() {
        let dir = std::env::temp_dir().join(format!("xtask-node-tax-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("report.md"),
            "# brokerscope benchmark\n\nA\n\n## Node tax\n\nold\n\n## Scrapes\n\nB\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("report.json"),
            "{\"cases\":[1],\"node_tax\":{\"old\":true}}\n",
        )
        .unwrap();
        let report = Report {
            markdown: "\n## Node tax\n\nnew\n".into(),
            json: json!({"rounds": 11}),
        };
        report.merge_into(&dir).unwrap();
        report.merge_into(&dir).unwrap();
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert_eq!(
            md,
            "# brokerscope benchmark\n\nA\n\n## Scrapes\n\nB\n\n## Node tax\n\nnew\n"
        );
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(json, json!({"cases": [1], "node_tax": {"rounds": 11}}));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
