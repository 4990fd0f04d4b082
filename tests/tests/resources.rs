//! Per-broker resources, end to end: fake brokers burn CPU, fsync, write with O_DIRECT to a loop
//! device and fight over one CPU, and the real agent's counters are checked against what the
//! kernel says elsewhere (/proc) or what the broker did (calls made, bytes written).

use std::{path::Path, process::Command, time::Duration};

use brokerscope_tests::{Agent, FakeBroker, FakeBrokerSpec, eventually, free_port, privileged};

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
        "[probes]\ndisabled_programs = [\"sched_switch_btf\", \"sched_wakeup_btf\", \
         \"sched_wakeup_new_btf\"]\n",
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
    let props = dir.join(format!("{id}.properties"));
    std::fs::write(
        &props,
        format!(
            "node.id={id}\nlisteners=PLAINTEXT://127.0.0.1:{}\n",
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
    let before = sum("31");
    b.send("burn 1000");
    assert_eq!(a.command("burn 1000", Duration::from_secs(30)), "burned");
    assert_eq!(
        b.next_line(Duration::from_secs(30)).as_deref(),
        Some("burned")
    );
    let shared = sum("31") - before;
    eprintln!(
        "run-queue wait of a 1 s burn on CPU 0 through {program}: alone {alone:.4} s, shared \
         {shared:.4} s"
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
