//! Per-broker resources, end to end: fake brokers burn CPU, fsync, write with O_DIRECT to a loop
//! device and fight over one CPU, and the real agent's counters are checked against what the
//! kernel says elsewhere (/proc) or what the broker did (calls made, bytes written).

use std::{path::Path, process::Command, time::Duration};

use brokerscope_tests::{
    Agent, FakeBroker, FakeBrokerSpec, eventually, free_port, privileged, run_ok,
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
    assert_eq!(metric(&agent, "brokerscope_fsync_total", &labels), 40.0);
    assert_eq!(
        metric(&agent, "brokerscope_fsync_duration_seconds_count", &labels),
        40.0
    );
    // The default log dir's filesystem decides which hooks time them: the ext4 hooks (no
    // syscall tracepoint) when it is ext4, the syscall ones otherwise.
    let (_, body) = agent.get("/v1/brokers/11");
    let filesystems =
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["log_dir_filesystems"].clone();
    let ext4 = filesystems == serde_json::json!(["ext4"]);
    assert_eq!(agent.attached("fsync_enter"), !ext4, "{filesystems}");

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
    assert_eq!(b.command("burn 3000", Duration::from_secs(30)), "burned");
    // The burn ended with a switch out (the broker now waits on stdin): everything is counted.
    let proc_cpu = proc_cpu_seconds(b.pid);
    let ours = metric(agent, "brokerscope_cpu_seconds_total", &[("broker", "11")]);
    let diff = (ours - proc_cpu).abs() / proc_cpu;
    eprintln!(
        "cpu through {program}: agent {ours:.4} s, /proc utime+stime {proc_cpu:.4} s, {:.2}% \
         apart",
        diff * 100.0
    );
    assert!(proc_cpu > 2.9, "the burn used the CPU: {proc_cpu}");
    // The agent reads the scheduler's own figure; /proc rounds it to 10 ms ticks.
    assert!(
        diff <= 0.02,
        "{program}: agent {ours} s vs /proc {proc_cpu} s"
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
    let dev = Loop::new(&dir.path().join("disk.img"), 64 << 20);
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

#[test]
fn syscall_fsync_hooks_serve_only_while_a_broker_keeps_logs_off_ext4() {
    if !privileged("resources") {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // An ext4 of the test's own, whatever the machine's disks are, and a tmpfs.
    let dev = Loop::new(&dir.path().join("ext4.img"), 32 << 20);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev.dev]));
    let ext4 = Mount::new(&dir.path().join("ext4"), &[&dev.dev]);
    let tmpfs = Mount::new(&dir.path().join("tmpfs"), &["-t", "tmpfs", "tmpfs"]);
    let agent = Agent::start(&agent_config(dir.path()));
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
    let fsyncs = |id: &str| metric(&agent, "brokerscope_fsync_total", &[("broker", id)]);
    let filesystems = |id: &str| {
        let (_, body) = agent.get(&format!("/v1/brokers/{id}"));
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["log_dir_filesystems"].clone()
    };

    // A broker with its logs on ext4: the ext4 hooks time its syncs, no syscall hook is needed.
    let logs = ext4.target.join("logs");
    let mut a = broker_with(
        &agent,
        dir.path(),
        "31",
        &format!("log.dirs={}\n", logs.display()),
    );
    assert_eq!(filesystems("31"), serde_json::json!(["ext4"]));
    attached(false);
    std::fs::create_dir_all(&logs).unwrap();
    let on_ext4 = logs.join("synced");
    sync_calls(&mut a, "fsync", 10, &on_ext4);
    assert_eq!(fsyncs("31"), 10.0);

    // A second broker with its logs on tmpfs: the syscall hooks serve while it runs ...
    let mut b = broker_with(
        &agent,
        dir.path(),
        "32",
        &format!("log.dirs={}\n", tmpfs.target.join("logs").display()),
    );
    assert_eq!(filesystems("32"), serde_json::json!(["tmpfs"]));
    attached(true);
    let on_tmpfs = tmpfs.target.join("synced");
    sync_calls(&mut b, "fsync", 7, &on_tmpfs);
    sync_calls(&mut b, "fdatasync", 3, &on_tmpfs);
    assert_eq!(fsyncs("32"), 10.0);
    // ... and an ext4 sync, seen by both pairs of hooks, is counted once.
    sync_calls(&mut a, "fdatasync", 5, &on_ext4);
    assert_eq!(fsyncs("31"), 15.0);
    assert_eq!(
        metric(
            &agent,
            "brokerscope_fsync_duration_seconds_count",
            &[("broker", "31")]
        ),
        15.0
    );

    // Once it stops, they are detached again; the ext4 broker is still counted.
    drop(b);
    attached(false);
    sync_calls(&mut a, "fsync", 5, &on_ext4);
    assert_eq!(fsyncs("31"), 20.0);
    drop(a);
    drop(agent);
    drop(tmpfs);
    drop(ext4);
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
    // second).
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
    eventually("slots freed", Duration::from_secs(5), || {
        (metric(&agent, "brokerscope_map_entries", &threads) == entries).then_some(())
    });
}
