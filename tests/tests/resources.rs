//! Per-broker resources, end to end: fake brokers burn CPU, fsync, write with O_DIRECT to a loop
//! device and fight over one CPU, and the real agent's counters are checked against what the
//! kernel says elsewhere (/proc) or what the broker did (calls made, bytes written).

use std::{path::Path, process::Command, time::Duration};

use brokerscope_tests::{
    Agent, FakeBroker, FakeBrokerSpec, eventually, free_port, kernel, privileged, run_ok, scaled,
};

/// These tests measure CPU time and scheduling: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn agent_config(dir: &Path) -> String {
    let pattern = format!(
        r"kafka\.Kafka {}/",
        regex::escape(&dir.display().to_string())
    );
    format!("[discovery]\ncmdline_patterns = ['{pattern}']\n")
}

/// The scheduler hooks' two forms: the BTF tracepoints this kernel takes (direct loads), and
/// the raw tracepoints that serve where they are refused (helper reads), with the config that
/// forces each and the program then counting switches.
const SCHEDULER_HOOKS: [(&str, &str); 2] = [
    ("", "sched_switch_btf"),
    (
        "[probes]\ndisabled_programs = [\"sched_switch_btf\"]\n",
        "sched_switch",
    ),
];

/// An agent discovering brokers under `dir` with the scheduler hooks `hooks` (from
/// [`SCHEDULER_HOOKS`]), ready and with the expected program counting.
fn agent_with_hooks(dir: &Path, (config, program): (&str, &str)) -> Agent {
    let agent = Agent::start(&format!("{}{config}", agent_config(dir)));
    agent.wait_ready();
    assert!(
        agent.attached(program),
        "{program} should count context switches"
    );
    agent
}

/// Starts a fake broker with `node.id=id` under `dir` and waits until the agent lists it
/// running (its pid is then in the kernel's broker set).
fn broker(agent: &Agent, dir: &Path, id: &str) -> FakeBroker {
    broker_with(agent, dir, id, "")
}

/// As [`broker`], with more properties.
fn broker_with(agent: &Agent, dir: &Path, id: &str, properties: &str) -> FakeBroker {
    let props = dir.join(format!("{id}.properties"));
    std::fs::write(
        &props,
        format!(
            "node.id={id}\nlisteners=PLAINTEXT://127.0.0.1:{}\n{properties}",
            free_port()
        ),
    )
    .unwrap();
    let b = FakeBroker::start(FakeBrokerSpec::new(&props));
    eventually(
        &format!("broker {id} running"),
        Duration::from_secs(5),
        || {
            let (code, body) = agent.get(&format!("/v1/broker-state/?broker={id}"));
            (code == 200 && body == r#"{"brokerState":3}"#).then_some(())
        },
    );
    b
}

fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    agent.metric(name, labels).unwrap_or(0.0)
}

/// Time every thread of `pid` spent waiting on a run queue, in seconds: the second field of
/// each `/proc/<pid>/task/<tid>/schedstat` (nanoseconds), summed.
fn run_delay_seconds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

/// Time every thread of `pid` spent on a CPU, in seconds: the first field of each
/// `/proc/<pid>/task/<tid>/schedstat` (the scheduler's own nanoseconds, the figure the agent
/// reads at each switch; /proc/<pid>/stat's ticks drift from it under a virtual CPU).
fn on_cpu_seconds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

/// utime + stime of a process in seconds (/proc/<pid>/stat fields 14 and 15).
fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(") ").unwrap();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[14 - 3].parse::<f64>().unwrap() + f[15 - 3].parse::<f64>().unwrap();
    // SAFETY: sysconf has no memory preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

#[test]
fn cpu_time_agrees_with_proc_and_fsyncs_are_counted_exactly() {
    if !privileged("resources") {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // The raw fallback first, on its own agent; the BTF form's goes on to the fsync checks.
    {
        let raw_dir = tempfile::tempdir().unwrap();
        let agent = agent_with_hooks(raw_dir.path(), SCHEDULER_HOOKS[1]);
        cpu_time_of_a_burn(&agent, raw_dir.path(), SCHEDULER_HOOKS[1].1);
    }
    let agent = agent_with_hooks(dir.path(), SCHEDULER_HOOKS[0]);
    let mut b = cpu_time_of_a_burn(&agent, dir.path(), SCHEDULER_HOOKS[0].1);
    let labels = [("broker", "11")];

    let file = dir.path().join("synced");
    let file = file.display();
    assert_eq!(
        b.command(&format!("fsync 25 {file}"), Duration::from_secs(30)),
        "synced 25"
    );
    assert_eq!(
        b.command(&format!("fdatasync 15 {file}"), Duration::from_secs(30)),
        "synced 15"
    );
    // The default log dir's filesystem (the temporary directory's) decides how they are
    // measured; no syscall tracepoint is attached for it, whatever it is.
    let (_, body) = agent.get("/v1/brokers/11");
    let view = serde_json::from_str::<serde_json::Value>(&body).unwrap();
    let measured = view["log_dir_fsync"][0].as_str().unwrap().to_string();
    let expected = |full: f64| match measured.as_str() {
        "count+duration" => (full, full),
        "count" => (full, 0.0),
        _ => (0.0, 0.0),
    };
    assert_eq!(
        (
            metric(&agent, "brokerscope_fsync_total", &labels),
            metric(&agent, "brokerscope_fsync_duration_seconds_count", &labels)
        ),
        expected(40.0),
        "{} measured as {measured}",
        view["log_dir_filesystems"]
    );
    assert!(!agent.attached("fsync_enter"));

    // /proc figures are there too.
    for name in [
        "brokerscope_memory_rss_bytes",
        "brokerscope_open_fds",
        "brokerscope_max_fds",
        "brokerscope_threads",
    ] {
        assert!(metric(&agent, name, &labels) > 0.0, "{name}");
    }
    assert!(
        agent
            .metric(
                "brokerscope_page_faults_total",
                &[("broker", "11"), ("kind", "minor")]
            )
            .is_some_and(|v| v > 0.0)
    );
}

/// Broker 11 burns 3 s of CPU; the agent, counting through `program`, agrees with /proc.
fn cpu_time_of_a_burn(agent: &Agent, dir: &Path, program: &str) -> FakeBroker {
    let mut b = broker(agent, dir, "11");
    // The broker's CPU before the agent registered it (its start, slow in an emulated guest)
    // is not the agent's to count: compare the burn's share, from before it to after.
    let cpu = || metric(agent, "brokerscope_cpu_seconds_total", &[("broker", "11")]);
    // The broker waits on stdin, switched out: everything so far is counted.
    let (ours_before, on_cpu_before) = (cpu(), on_cpu_seconds(b.pid));
    assert_eq!(b.command("burn 3000", Duration::from_secs(30)), "burned");
    // The burn ended with a switch out (the broker waits on stdin again).
    let proc_cpu = proc_cpu_seconds(b.pid);
    let on_cpu = on_cpu_seconds(b.pid) - on_cpu_before;
    let ours = cpu() - ours_before;
    let diff = (ours - on_cpu).abs() / on_cpu;
    eprintln!(
        "cpu of a 3 s burn through {program}: agent {ours:.4} s, schedstat {on_cpu:.4} s ({:.3}% \
         apart); the process's /proc utime+stime {proc_cpu:.4} s",
        diff * 100.0
    );
    assert!(on_cpu > 2.9, "the burn used the CPU: {on_cpu}");
    // The agent reads the scheduler's own figure at each switch: the same as schedstat's once
    // every thread has switched out.
    assert!(
        diff <= 0.005,
        "{program}: agent {ours} s vs schedstat {on_cpu} s"
    );
    let voluntary = metric(
        agent,
        "brokerscope_context_switches_total",
        &[("broker", "11"), ("kind", "voluntary")],
    );
    assert!(voluntary >= 1.0, "{program}: {voluntary}");
    b
}

/// A loop device over a file, detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn new(backing: &Path, bytes: u64) -> Self {
        let f = std::fs::File::create(backing).unwrap();
        f.set_len(bytes).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn direct_io_bytes_on_a_loop_device_match_what_was_written() {
    if !privileged("resources") {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // The loop device's backing file in memory, so the loop device's requests are the only
    // block I/O the broker causes. On a disk, the loop driver's reads of the backing file may be
    // issued in the broker's context, and count as its I/O: probably what a full run counted
    // once, 27 reads of 8 KiB beyond what the test wrote (not confirmed).
    let backing = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let dev = Loop::new(&backing.path().join("disk.img"), 64 << 20);
    let agent = Agent::start(&agent_config(dir.path()));
    agent.wait_ready();
    let mut b = broker(&agent, dir.path(), "21");
    let labels = [("broker", "21")];
    let bytes: u64 = 16 << 20;
    assert_eq!(
        b.command(
            &format!("direct {} {bytes}", dev.dev),
            Duration::from_secs(60)
        ),
        format!("direct {bytes}")
    );
    let written = metric(&agent, "brokerscope_disk_written_bytes_total", &labels);
    let read = metric(&agent, "brokerscope_disk_read_bytes_total", &labels);
    let ios = metric(&agent, "brokerscope_disk_io_latency_seconds_count", &labels);
    eprintln!(
        "O_DIRECT {bytes} B written and read back on {}: agent written {written}, read {read}, {ios} requests",
        dev.dev
    );
    let within = |x: f64| (x - bytes as f64).abs() / bytes as f64 <= 0.01;
    assert!(within(written), "written {written} of {bytes}");
    assert!(within(read), "read {read} of {bytes}");
    assert!(
        ios >= 2.0 * (bytes as f64) / (512.0 * 1024.0),
        "{ios} requests completed"
    );
    // Every request issued was matched by its completion: nothing is left in flight (the
    // figure is counted at most once a second).
    eventually(
        "no broker block request in flight",
        Duration::from_secs(5),
        || {
            (agent.metric("brokerscope_map_entries", &[("map", "block_inflight")]) == Some(0.0))
                .then_some(())
        },
    );
}

/// A filesystem mounted for a test, unmounted on drop (lazily: a straggling process cannot
/// keep it).
struct Mount {
    target: std::path::PathBuf,
}

impl Mount {
    fn new(target: &Path, args: &[&str]) -> Self {
        std::fs::create_dir_all(target).unwrap();
        run_ok(Command::new("mount").args(args).arg(target));
        Mount {
            target: target.into(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.target).status();
    }
}

/// Sends `fsync N file` (or fdatasync) and checks the answer.
fn sync_calls(b: &mut FakeBroker, call: &str, n: u32, file: &Path) {
    assert_eq!(
        b.command(
            &format!("{call} {n} {}", file.display()),
            Duration::from_secs(30)
        ),
        format!("synced {n}")
    );
}

/// A filesystem of the test's own on a loop device (sparse backing file), unmounted and
/// detached on drop.
struct LoopFs {
    mount: Mount,
    _dev: Loop,
}

impl LoopFs {
    fn new(dir: &Path, fstype: &str) -> Self {
        // mkfs.xfs wants at least 300 MiB; the file is sparse.
        let dev = Loop::new(&dir.join(format!("{fstype}.img")), 320 << 20);
        let mkfs = format!("mkfs.{fstype}");
        let mut cmd = Command::new(&mkfs);
        match fstype {
            "ext4" => cmd.args(["-q", "-F"]),
            "xfs" => cmd.args(["-q", "-f"]),
            _ => cmd.args(["-q", "-f"]),
        };
        run_ok(cmd.arg(&dev.dev));
        // The filesystem may be a module the kernel has not loaded yet.
        let _ = Command::new("modprobe")
            .arg(fstype)
            .stderr(std::process::Stdio::null())
            .status();
        let mount = Mount::new(&dir.join(fstype), &["-t", fstype, &dev.dev]);
        LoopFs { mount, _dev: dev }
    }
}

#[test]
fn fsyncs_are_exact_on_ext4_xfs_and_btrfs_without_a_syscall_hook() {
    if !privileged("resources") {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // The agent first, the filesystems after: where a filesystem is a module (Debian's kernels),
    // its tracepoints appear with its first mount, and the agent attaches their programs then.
    let agent = Agent::start(&agent_config(dir.path()));
    agent.wait_ready();
    let filesystems = [
        LoopFs::new(dir.path(), "ext4"),
        LoopFs::new(dir.path(), "xfs"),
        LoopFs::new(dir.path(), "btrfs"),
    ];
    let tmpfs = Mount::new(&dir.path().join("tmpfs"), &["-t", "tmpfs", "tmpfs"]);
    eventually(
        "the filesystems' fsync programs attached",
        scaled(Duration::from_secs(5)),
        || {
            [
                "fsync_ext4_enter",
                "fsync_ext4_exit",
                "fsync_xfs",
                "fsync_btrfs",
            ]
            .iter()
            .all(|p| agent.attached(p))
            .then_some(())
        },
    );
    let count = |id: &str| {
        (
            metric(&agent, "brokerscope_fsync_total", &[("broker", id)]),
            metric(
                &agent,
                "brokerscope_fsync_duration_seconds_count",
                &[("broker", id)],
            ),
        )
    };
    let view = |id: &str| {
        let (_, body) = agent.get(&format!("/v1/brokers/{id}"));
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let logs: Vec<(&str, std::path::PathBuf)> = filesystems
        .iter()
        .map(|fs| fs.mount.target.as_path())
        .chain([tmpfs.target.as_path()])
        .zip(["ext4", "xfs", "btrfs", "tmpfs"])
        .map(|(target, fstype)| (fstype, target.join("logs")))
        .collect();
    let mut running = Vec::new();
    for (i, (fstype, logs)) in logs.iter().enumerate() {
        let id = format!("4{i}");
        let mut b = broker_with(
            &agent,
            dir.path(),
            &id,
            &format!("log.dirs={}\n", logs.display()),
        );
        let v = view(&id);
        assert_eq!(v["log_dir_filesystems"], serde_json::json!([fstype]));
        std::fs::create_dir_all(logs).unwrap();
        let file = logs.join("00000000000000000000.log");
        let (n, m) = (7 + i as u32, 3);
        sync_calls(&mut b, "fsync", n, &file);
        sync_calls(&mut b, "fdatasync", m, &file);
        let all = f64::from(n + m);
        // Exact where a filesystem's tracepoints see it: ext4 timed, xfs and btrfs counted
        // without a duration, tmpfs not measured.
        let (expected, how) = match *fstype {
            "ext4" => ((all, all), "count+duration"),
            "xfs" | "btrfs" => ((all, 0.0), "count"),
            _ => ((0.0, 0.0), "not measured"),
        };
        assert_eq!(
            count(&id),
            expected,
            "{fstype}: {n} fsyncs + {m} fdatasyncs"
        );
        assert_eq!(v["log_dir_fsync"], serde_json::json!([how]), "{fstype}");
        eprintln!("{fstype}: {} of {n}+{m} counted ({how})", count(&id).0);
        running.push(b);
    }
    // No broker situation brought a syscall hook: not in the agent's account, nor in the
    // kernel's (its link info, while the tmpfs broker, whose fsyncs nothing measures, runs).
    let ids: Vec<u32> = agent.program_ids();
    kernel::assert_no_syscall_tracepoint(&ids);
    for program in [
        "fsync_enter",
        "fsync_exit",
        "fdatasync_enter",
        "fdatasync_exit",
    ] {
        assert!(!agent.attached(program), "{program}");
    }
}

#[test]
fn node_wide_hooks_when_allowed_count_fsyncs_on_other_filesystems_while_needed() {
    if !privileged("resources") {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = Mount::new(&dir.path().join("tmpfs"), &["-t", "tmpfs", "tmpfs"]);
    let agent = Agent::start(&format!(
        "{}[probes]\nnode_wide_hooks = true\n",
        agent_config(dir.path())
    ));
    agent.wait_ready();
    let syscall_hooks = [
        "fsync_enter",
        "fsync_exit",
        "fdatasync_enter",
        "fdatasync_exit",
    ];
    let attached = |want: bool| {
        eventually(
            &format!("syscall fsync hooks attached: {want}"),
            // Detached once no broker needs them and STANDBY_LINGER (2 s) has passed.
            Duration::from_secs(6),
            || {
                syscall_hooks
                    .iter()
                    .all(|p| agent.attached(p) == want)
                    .then_some(())
            },
        )
    };
    attached(false);
    let mut b = broker_with(
        &agent,
        dir.path(),
        "32",
        &format!("log.dirs={}\n", tmpfs.target.join("logs").display()),
    );
    attached(true);
    let (_, ready) = agent.get("/ready");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let node_wide: Vec<&str> = ready["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["scope"] == "node-wide")
        .filter_map(|h| h["program"].as_str())
        .filter(|p| p.starts_with("fsync_") || p.starts_with("fdatasync_"))
        .collect();
    assert_eq!(node_wide, syscall_hooks, "{ready}");
    // The kernel's link info, which the default-config tests rely on to show no syscall
    // tracepoint is attached, does see these (where it names tracepoints: 6.6+).
    if let Some(links) = kernel::tracepoint_links() {
        let ids = agent.program_ids();
        let standby = agent.standby_program_ids();
        let syscall: Vec<&str> = links
            .iter()
            .filter(|(prog, _)| ids.contains(prog) || standby.contains(prog))
            .map(|(_, tp)| tp.as_str())
            .filter(|tp| tp.starts_with("sys_"))
            .collect();
        for tp in [
            "sys_enter_fsync",
            "sys_exit_fsync",
            "sys_enter_fdatasync",
            "sys_exit_fdatasync",
        ] {
            assert!(syscall.contains(&tp), "{tp} in {syscall:?}");
        }
    }
    let on_tmpfs = tmpfs.target.join("synced");
    sync_calls(&mut b, "fsync", 7, &on_tmpfs);
    sync_calls(&mut b, "fdatasync", 3, &on_tmpfs);
    assert_eq!(
        metric(&agent, "brokerscope_fsync_total", &[("broker", "32")]),
        10.0
    );
    // A broker on xfs meanwhile: its syncs pass both the xfs tracepoint and the syscall pair,
    // and are counted once.
    let xfs = LoopFs::new(dir.path(), "xfs");
    let xfs_logs = xfs.mount.target.join("logs");
    let mut c = broker_with(
        &agent,
        dir.path(),
        "33",
        &format!("log.dirs={}\n", xfs_logs.display()),
    );
    std::fs::create_dir_all(&xfs_logs).unwrap();
    sync_calls(&mut c, "fsync", 4, &xfs_logs.join("synced"));
    sync_calls(&mut c, "fdatasync", 2, &xfs_logs.join("synced"));
    assert_eq!(
        metric(&agent, "brokerscope_fsync_total", &[("broker", "33")]),
        6.0
    );
    drop(c);
    // Once it stops, they are detached again.
    drop(b);
    attached(false);
}

/// Pins every thread of `pid` to CPU 0.
fn pin(pid: u32) {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &pid.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn runqueue_latency_grows_when_two_burners_share_a_cpu() {
    if !privileged("resources") {
        return;
    }
    let _serial = serial();
    for hooks in SCHEDULER_HOOKS {
        let dir = tempfile::tempdir().unwrap();
        runqueue_latency(&agent_with_hooks(dir.path(), hooks), dir.path(), hooks.1);
    }
}

fn runqueue_latency(agent: &Agent, dir: &Path, program: &str) {
    let mut a = broker(agent, dir, "31");
    let mut b = broker(agent, dir, "32");
    pin(a.pid);
    pin(b.pid);
    let sum = |id: &str| {
        metric(
            agent,
            "brokerscope_runqueue_latency_seconds_sum",
            &[("broker", id)],
        )
    };

    // Alone on CPU 0.
    let before = sum("31");
    assert_eq!(a.command("burn 1000", Duration::from_secs(30)), "burned");
    let alone = sum("31") - before;

    // Sharing CPU 0 with another burner of as much CPU: about as long again waiting.
    let (before, kernel_before) = (sum("31"), run_delay_seconds(a.pid));
    b.send("burn 1000");
    assert_eq!(a.command("burn 1000", Duration::from_secs(30)), "burned");
    assert_eq!(
        b.next_line(Duration::from_secs(30)).as_deref(),
        Some("burned")
    );
    // The burner now waits on stdin: its last slice has ended, and with it the agent's count.
    std::thread::sleep(Duration::from_millis(50));
    let shared = sum("31") - before;
    let kernel = run_delay_seconds(a.pid) - kernel_before;
    eprintln!(
        "run-queue wait of a 1 s burn on CPU 0 through {program}: alone {alone:.4} s, shared \
         {shared:.4} s, the kernel's schedstat {kernel:.4} s"
    );
    // The same figure as the kernel's own per-thread total, less at most a microsecond per
    // slice (the histogram counts whole microseconds).
    assert!(
        shared <= kernel + 1e-6 && kernel - shared <= 0.002 + 0.01 * kernel,
        "{program}: agent {shared} s, /proc schedstat {kernel} s"
    );
    assert!(
        shared > 0.5,
        "{program}: sharing a CPU means waiting for it: {shared}"
    );
    assert!(
        shared > alone + 0.4,
        "{program}: alone {alone}, shared {shared}"
    );
}

/// Threads of one set of the kernel's per-thread array (ids equal modulo this: its slots over
/// its ways, `THREADS_CAPACITY / THREAD_WAYS` in brokerscope-common).
const THREAD_SET_STRIDE: u32 = 16384 / 4;

#[test]
fn a_fifth_thread_in_a_four_way_set_takes_a_slot_and_is_counted_as_an_eviction() {
    if !privileged("resources") {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_with_hooks(dir.path(), SCHEDULER_HOOKS[0]);
    let mut b = broker(&agent, dir.path(), "41");
    let threads = [("map", "threads")];
    let evictions = || agent.metric("brokerscope_map_evictions_total", &threads);
    // Context switches: the agent's count, and the kernel's for the process (its exited threads'
    // included), asked of the broker, which then waits on stdin.
    let counted = || {
        ["voluntary", "involuntary"]
            .map(|kind| {
                metric(
                    &agent,
                    "brokerscope_context_switches_total",
                    &[("broker", "41"), ("kind", kind)],
                )
            })
            .iter()
            .sum::<f64>()
    };
    let kernel = |b: &mut FakeBroker| -> f64 {
        let reply = b.command("switches", Duration::from_secs(10));
        let n = reply
            .strip_prefix("switches ")
            .unwrap_or_else(|| panic!("{reply}"));
        // The reply's own switch-out, once the broker waits on stdin, is in the agent's count.
        std::thread::sleep(Duration::from_millis(50));
        n.parse().unwrap()
    };
    // The broker's own threads, once each has been switched out (the count is refreshed once a
    // second). Its command thread may have blocked before the broker was discovered, and would
    // take its slot at the first command below: one command first, so the level before counts
    // it (a full run once read 0 before and 1 after).
    let _ = kernel(&mut b);
    std::thread::sleep(Duration::from_millis(1100));
    let (entries, before) = (
        metric(&agent, "brokerscope_map_entries", &threads),
        evictions(),
    );
    assert_eq!(before, Some(0.0), "nothing shares a set yet");

    // Starts `n` threads in one set. The agent counts every switch the kernel counts for the
    // process, and up to one more per exited thread: its last switch-out, after its counts were
    // added to the process's (measured: all of them in some runs, all but one in others), and
    // one more besides: measured once (216 against 211 with 4 threads exited), its source not
    // found; the broker's command thread runs between the kernel's count and its reply.
    let spawn = |b: &mut FakeBroker, n: u32| {
        let (kernel_before, counted_before) = (kernel(b), counted());
        let reply = b.command(
            &format!("threads {n} {THREAD_SET_STRIDE}"),
            Duration::from_secs(30),
        );
        eprintln!("{reply}");
        let spawned: f64 = reply
            .strip_prefix("threads [")
            .and_then(|r| r.rsplit_once(" spawned "))
            .unwrap_or_else(|| panic!("{reply}"))
            .1
            .parse()
            .unwrap();
        let (kernel_after, counted_after) = (kernel(b), counted());
        let (counted, kernel) = (counted_after - counted_before, kernel_after - kernel_before);
        assert!(
            kernel > 0.0 && (kernel..=kernel + spawned + 1.0).contains(&counted),
            "every switch of the broker's threads is counted, a slot taken or not: agent \
             {counted}, kernel {kernel}, {spawned} threads exited"
        );
    };
    // Four fit in the set's four ways; their slots are freed when they exit.
    spawn(&mut b, 4);
    assert_eq!(evictions(), Some(0.0));
    eventually("slots freed", Duration::from_secs(5), || {
        (metric(&agent, "brokerscope_map_entries", &threads) == entries).then_some(())
    });

    // A fifth takes the last way from a live thread, at least once while all five take turns.
    spawn(&mut b, 5);
    let evicted = evictions().unwrap();
    eprintln!("five threads of one set: {evicted} slots taken from a live thread");
    assert!(evicted >= 1.0, "{evicted} evictions");
    let freed = eventually_or_none(Duration::from_secs(5), || {
        (metric(&agent, "brokerscope_map_entries", &threads) == entries).then_some(())
    });
    if freed.is_none() {
        panic!(
            "slots not freed: {} taken, {entries} before; held: {:?}",
            metric(&agent, "brokerscope_map_entries", &threads),
            held_threads(agent.pid())
        );
    }
}

/// `f` until it gives a value, for at most `within`.
fn eventually_or_none<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The thread ids holding a slot of the THREADS map of the agent `pid` (its map descriptors'
/// `map_id` in /proc, then bpftool), each with whether that thread still lives: for a
/// failure's message.
fn held_threads(pid: u32) -> Vec<(u32, bool)> {
    let ids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            let id = text.lines().find_map(|l| l.strip_prefix("map_id:"))?;
            Some(id.trim().to_string())
        })
        .collect();
    // bpftool's JSON, or null when it fails (a diagnostic must not panic on its own).
    let bpftool = |args: &[&str]| -> serde_json::Value {
        std::process::Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default()
    };
    let Some(id) = ids
        .into_iter()
        .find(|id| bpftool(&["map", "show", "id", id])["name"] == "THREADS")
    else {
        return Vec::new();
    };
    let dump = bpftool(&["map", "dump", "id", &id]);
    let byte = |v: &serde_json::Value| {
        v.as_str()
            .and_then(|h| u8::from_str_radix(h.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0)
    };
    dump.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let v = e["value"].as_array()?;
            let tid = u32::from_le_bytes([byte(&v[0]), byte(&v[1]), byte(&v[2]), byte(&v[3])]);
            (tid != 0).then(|| (tid, std::path::Path::new(&format!("/proc/{tid}")).exists()))
        })
        .collect()
}
