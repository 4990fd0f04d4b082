//! The operator CLI as a person and a script meet it, end to end: the real `brokerscope` binary
//! as a client process of a real agent over mTLS, with fake brokers and real traffic. Tables,
//! `-o json|yaml|wide|tar.gz`, exit codes, `--broker` hints, `logs -f` and `events -f`, the
//! rate limit, and `top` driven in a real terminal (tmux).

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use brokerscope_tests::{
    Agent, FakeBroker, FakeBrokerSpec, KillOnDrop, agent_bin, broker_properties, discovery_config,
    eventually, fake_request, privileged, wait_broker_running,
};
use serde_json::Value;

/// A POSIX TZ for UTC+05:30 (no tz database needed): local times must carry this offset.
const TZ: &str = "IST-5:30";

/// `brokerscope <args> --url … --cacert … --cert … --key …` against `agent`.
fn command(agent: &Agent, args: &[&str]) -> Command {
    let mut cmd = Command::new(agent_bin());
    cmd.args(args)
        .arg("--url")
        .arg(format!("https://localhost:{}", agent.port()))
        .args(agent.client_args())
        .env("TZ", TZ)
        .stdin(Stdio::null());
    cmd
}

/// Runs the CLI to its end: (exit code, stdout, stderr).
fn cli(agent: &Agent, args: &[&str]) -> (i32, String, String) {
    let out = command(agent, args).output().expect("run the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Byte offset of each header word in `header` and where the same column's cell starts in
/// `row`: a table is aligned when they are the same.
fn column_starts(line: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut prev_space = true;
    let mut gap = 0;
    for (i, c) in line.char_indices() {
        if c == ' ' {
            gap += 1;
        } else {
            // Columns are three spaces apart; single spaces are inside a cell ("RUNNING (3)").
            if prev_space && (i == 0 || gap >= 2) {
                starts.push(i);
            }
            gap = 0;
        }
        prev_space = c == ' ';
    }
    starts
}

fn one_broker(dir: &Path, id: &str, pod: &str) -> FakeBroker {
    let props = broker_properties(dir, &format!("b{id}.properties"), id);
    FakeBroker::start(FakeBrokerSpec {
        hostname: Some(pod),
        ..FakeBrokerSpec::new(&props)
    })
}

#[test]
fn cli_tables_line_up_and_every_get_speaks_json_yaml_and_wide() {
    if !privileged("cli_tables_line_up_and_every_get_speaks_json_yaml_and_wide") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = one_broker(dir.path(), "5", "kafka-5");
    let port = broker.listeners[0].1;
    let agent = Agent::start(&discovery_config(dir.path(), ""));
    wait_broker_running(&agent, "5", broker.pid);

    let (code, out, err) = cli(&agent, &["get", "brokers"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let words: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        words,
        ["ID", "STATE", "PID", "POD", "RESTARTS", "AGE", "LISTENERS"]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row[..6],
        [
            "5",
            "RUNNING",
            "(3)",
            &broker.pid.to_string(),
            "kafka-5",
            "0"
        ]
    );
    assert!(row[6].ends_with('s'), "age {}: {out}", row[6]);
    assert_eq!(row[7], format!("PLAINTEXT:{port}"));
    // Every cell starts under its header.
    assert_eq!(column_starts(lines[0]), column_starts(lines[1]), "{out}");
    assert_eq!(column_starts(lines[0]).len(), 7, "{out}");

    let (code, out, err) = cli(&agent, &["get", "brokers", "-o", "wide"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    for column in ["PROCESS", "NETNS", "CONNECTIONS", "LOG DIRS", "LAST CHANGE"] {
        assert!(lines[0].contains(column), "{out}");
    }
    assert_eq!(column_starts(lines[0]), column_starts(lines[1]), "{out}");
    assert!(
        lines[1].contains("running") && lines[1].contains(" ago"),
        "{out}"
    );

    // JSON and YAML: the agent's own fields, both spellings of the flag.
    for flag in ["-o", "--output"] {
        let (code, out, err) = cli(&agent, &["get", "brokers", flag, "json"]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["id"], "5");
        assert_eq!(v[0]["broker_state"]["name"], "RUNNING");
    }
    let (code, out, err) = cli(&agent, &["get", "brokers", "-o", "yaml"]);
    assert_eq!(code, 0, "{err}");
    // A list of mappings, keys in order, the id quoted (it reads as a number otherwise).
    assert!(
        out.starts_with("- broker_state:\n    name: RUNNING\n    number: 3\n"),
        "{out}"
    );
    assert!(out.contains("\n  id: '5'\n"), "{out}");

    let (code, out, err) = cli(&agent, &["get", "state"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "STATE         RECOVERY\nRUNNING (3)   -\n");
    let (code, out, _) = cli(&agent, &["get", "state", "-o", "json"]);
    assert_eq!((code, out.as_str()), (0, "{\n  \"brokerState\": 3\n}\n"));
    let (code, out, _) = cli(&agent, &["get", "state", "-o", "yaml"]);
    assert_eq!((code, out.as_str()), (0, "brokerState: 3\n"));

    // Metrics: the exposition as is, or its samples as JSON (no longer ignored).
    let (code, text, _) = cli(&agent, &["get", "metrics"]);
    assert_eq!(code, 0);
    assert!(text.contains("# TYPE brokerscope_broker_state gauge"));
    let (code, out, err) = cli(&agent, &["get", "metrics", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let samples: Vec<Value> = serde_json::from_str(&out).unwrap();
    let state = samples
        .iter()
        .find(|s| s["name"] == "brokerscope_broker_state" && s["labels"]["broker"] == "5")
        .unwrap_or_else(|| panic!("no broker_state sample: {out}"));
    assert_eq!(state["value"], 3.0);
    let (code, out, _) = cli(&agent, &["get", "metrics", "-o", "yaml"]);
    assert_eq!(code, 0);
    assert!(out.contains("  name: brokerscope_broker_state\n"), "{out}");

    let (code, out, err) = cli(&agent, &["get", "config", "-o", "yaml"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\nserver:\n") || out.starts_with("server:"),
        "{out}"
    );
    let (code, out, err) = cli(&agent, &["get", "diagnostics", "-o", "wide"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["AGENT", "PID", "KERNEL", "READY", "BROKERS"]
    );
    assert_eq!(column_starts(lines[0]), column_starts(lines[1]), "{out}");
    assert!(
        out.contains("\nPROGRAM ") && out.contains("\nMAP "),
        "{out}"
    );

    // The diagnostics archive, saved by redirecting stdout, is the agent's tar.gz.
    let saved = dir.path().join("diagnostics.tar.gz");
    let status = command(&agent, &["get", "diagnostics", "-o", "tar.gz"])
        .stdout(std::fs::File::create(&saved).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let listing = Command::new("tar").arg("tzf").arg(&saved).output().unwrap();
    assert!(listing.status.success(), "{listing:?}");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.lines().any(|l| l == "diagnostics.json"),
        "{listing}"
    );
}

#[test]
fn cli_exit_codes_name_what_went_wrong() {
    if !privileged("cli_exit_codes_name_what_went_wrong") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let b1 = one_broker(dir.path(), "1", "kafka-1");
    let b2 = one_broker(dir.path(), "2", "kafka-2");
    let agent = Agent::start(&discovery_config(dir.path(), ""));
    wait_broker_running(&agent, "1", b1.pid);
    wait_broker_running(&agent, "2", b2.pid);

    // Two brokers on the node: the request needs one, the error says which flag and ids.
    let (code, out, err) = cli(&agent, &["get", "state"]);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert_eq!(
        err.trim(),
        "error: several brokers on this node (1, 2): choose one with --broker ID, e.g. --broker 1"
    );
    let (code, out, _) = cli(&agent, &["get", "state", "--broker", "2"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "STATE         RECOVERY\nRUNNING (3)   -\n")
    );

    // Not found: 3, with the ids there are.
    for args in [
        &["get", "brokers", "--broker", "9"][..],
        &["get", "state", "--broker", "9"][..],
    ] {
        let (code, out, err) = cli(&agent, args);
        assert_eq!((code, out.as_str()), (3, ""), "{args:?}: {err}");
        assert_eq!(
            err.trim(),
            "error: no broker `9` on this node; brokers here: 1, 2 (--broker ID)"
        );
    }

    // Usage: 2, from clap or from us, before any request.
    for (args, says) in [
        (&["get", "brokers", "-o", "xml"][..], "invalid value 'xml'"),
        (&["logs", "--since", "5 minutes"][..], "neither a duration"),
        (
            &["get", "config", "--broker", "1"][..],
            "applies to `get brokers` and `get state` only",
        ),
        (
            &["get", "brokers", "-o", "tar.gz"][..],
            "only `get diagnostics` is an archive",
        ),
        (&["set", "config", "server"][..], "expected KEY=VALUE"),
    ] {
        let (code, out, err) = cli(&agent, args);
        assert_eq!((code, out.as_str()), (2, ""), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // The agent refusing a value is an error (1), not a usage mistake.
    let (code, _, err) = cli(&agent, &["set", "config", "server.rate_limit_rps=fast"]);
    assert_eq!(code, 1, "{err}");

    // Unavailable: 5. Nothing listens on that port.
    let url = format!("https://localhost:{}", brokerscope_tests::free_port());
    let out = Command::new(agent_bin())
        .args(["get", "brokers", "--url", &url])
        .args(agent.client_args())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: cannot connect to localhost:"),
        "{err}"
    );

    // Denied: 4. A client certificate from a CA the agent does not trust.
    let stranger = brokerscope_tests::Pki::new();
    let out = Command::new(agent_bin())
        .args(["get", "brokers", "--url"])
        .arg(format!("https://localhost:{}", agent.port()))
        .arg("--cacert")
        .arg(agent.pki.path("ca.crt"))
        .arg("--cert")
        .arg(stranger.path("client.crt"))
        .arg("--key")
        .arg(stranger.path("client.key"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");

    // --version names the commit it was built from.
    let out = Command::new(agent_bin()).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    let re =
        regex::Regex::new(r"^brokerscope \d+\.\d+\.\d+ \(git ([0-9a-f]{12}|unknown)\)\n$").unwrap();
    assert!(out.status.success() && re.is_match(&version), "{version}");
}

#[test]
fn cli_completions_and_man_pages_come_from_the_command_line() {
    if !privileged("cli_completions_and_man_pages_come_from_the_command_line") {
        return;
    }
    let run = |args: &[&str]| {
        let out = Command::new(agent_bin()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("complete -F _brokerscope"), "{bash}");
    // Every subcommand and the output formats are offered.
    for word in [
        "top",
        "logs",
        "events",
        "completions",
        "tar.gz",
        "yaml",
        "wide",
    ] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    // bash itself accepts the script.
    let check = Command::new("bash")
        .args(["-n", "-c", &bash])
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    assert!(run(&["completions", "zsh"]).starts_with("#compdef brokerscope"));
    assert!(run(&["completions", "fish"]).contains("complete -c brokerscope"));
    let (code, _, err) = {
        let out = Command::new(agent_bin())
            .args(["completions", "tcsh"])
            .output()
            .unwrap();
        (
            out.status.code(),
            (),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(2), "{err}");

    let man = run(&["man"]);
    assert!(man.contains(".TH brokerscope 1"), "{man}");
    assert!(man.contains("Exit codes"), "{man}");
    let dir = tempfile::tempdir().unwrap();
    run(&["man", "--dir", dir.path().to_str().unwrap()]);
    for page in [
        "brokerscope.1",
        "brokerscope-get.1",
        "brokerscope-top.1",
        "brokerscope-logs.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.starts_with(".ie"), "{page}: {text}");
    }
}

/// Reads a child's stdout lines on a thread; each line arrives on the channel.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if f(&line) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no line {what}; saw:\n{}", seen.join("\n")),
        }
    }
}

#[test]
fn cli_logs_and_events_follow_in_local_time() {
    if !privileged("cli_logs_and_events_follow_in_local_time") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&discovery_config(dir.path(), ""));
    agent.wait_ready();

    // A duration as people type it, and times in the local offset.
    let (code, out, err) = cli(&agent, &["logs", "--since", "5m", "--level", "info"]);
    assert_eq!(code, 0, "{err}");
    let listening = out
        .lines()
        .find(|l| l.contains("step 5/5: listening"))
        .unwrap_or_else(|| panic!("{out}"));
    let time = regex::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+05:30 INFO  ").unwrap();
    assert!(time.is_match(listening), "{listening}");

    let mut logs = KillOnDrop(
        command(&agent, &["logs", "-f", "--level", "info"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let log_lines = lines_of(&mut logs.0);
    wait_line(&log_lines, "from the ring", |l| {
        l.contains("step 5/5: listening")
    });
    let mut events = KillOnDrop(
        command(&agent, &["events", "-f", "--kind", "broker_started"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let event_lines = lines_of(&mut events.0);
    agent.wait_for_log("kernel connection events switched on=true");

    // A broker appears after both started following.
    let broker = one_broker(dir.path(), "7", "kafka-7");
    let found = wait_line(&log_lines, "about broker 7", |l| {
        l.contains("broker found") && l.contains("broker=7")
    });
    assert!(time.is_match(&found), "{found}");
    let started = wait_line(&event_lines, "broker_started", |l| {
        l.contains("broker_started")
    });
    let event = regex::Regex::new(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+05:30 broker_started +broker=7 listener=- ",
    )
    .unwrap();
    assert!(event.is_match(&started), "{started}");
    assert!(
        started.contains(&format!("pid={}", broker.pid)),
        "{started}"
    );
    // Each line once: the next poll starts at the newest time seen and skips what it printed.
    std::thread::sleep(Duration::from_millis(2500));
    let again: Vec<String> = log_lines.try_iter().collect();
    assert!(
        !again
            .iter()
            .any(|l| l.contains("broker found") && l.contains("broker=7")),
        "printed twice: {again:?}"
    );
    // Still following: the process runs until stopped.
    assert!(logs.0.try_wait().unwrap().is_none());
    assert!(events.0.try_wait().unwrap().is_none());
}

#[test]
fn cli_waits_out_the_rate_limit_instead_of_failing() {
    if !privileged("cli_waits_out_the_rate_limit_instead_of_failing") {
        return;
    }
    // One request a second, no burst: the second command within the second is refused (429)
    // and retried after Retry-After.
    let agent = Agent::start("rate_limit_rps = 1\nrate_limit_burst = 1\n");
    let started = Instant::now();
    let runs: Vec<(i32, String, String)> =
        (0..3).map(|_| cli(&agent, &["get", "config"])).collect();
    for (code, out, err) in &runs {
        assert_eq!(*code, 0, "{err}");
        assert!(out.contains("server.rate_limit_rps = 1"), "{out}");
    }
    let waited = runs
        .iter()
        .filter(|(_, _, err)| err.contains("rate limited by the agent; retrying in 1s"))
        .count();
    assert!(waited >= 1, "{runs:?}");
    // Three requests at one a second take about two seconds, not more than a few.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// A tmux server of the test's own (its socket in a temp dir), killed on drop.
struct Tmux {
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmux {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            socket: dir.path().join("tmux.sock"),
            _dir: dir,
        }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        // The first command starts the server: its environment is the panes'.
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env("TZ", TZ)
            .output()
            .expect("tmux (cargo xtask setup installs it)")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.ok(&["capture-pane", "-p", "-t", "top"])
    }

    /// Captures the pane until `f` holds (10 s at most); the last screen.
    fn wait(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let screen = self.screen();
            if f(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The screen's line holding `needle`.
fn line_with<'a>(screen: &'a str, needle: &str) -> &'a str {
    screen
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle}:\n{screen}"))
}

#[test]
fn top_shows_brokers_and_listeners_live_in_a_terminal() {
    if !privileged("top_shows_brokers_and_listeners_live_in_a_terminal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = one_broker(dir.path(), "7", "kafka-7");
    let port = broker.listeners[0].1;
    let mut agent = Agent::start(&discovery_config(dir.path(), ""));
    wait_broker_running(&agent, "7", broker.pid);

    // Not a terminal: refused plainly, exit 2.
    let (code, _, err) = cli(&agent, &["top"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs a terminal"), "{err}");

    let tmux = Tmux::new();
    let status = dir.path().join("top.status");
    let mut top = vec![agent_bin().display().to_string()];
    top.extend(
        [
            "top",
            "--interval",
            "500ms",
            "--url",
            &format!("https://localhost:{}", agent.port()),
        ]
        .map(String::from),
    );
    top.extend(agent.client_args());
    let shell = format!("{}; echo \"exit $?\" > {}", top.join(" "), status.display());
    tmux.ok(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "120",
        "-y",
        "40",
        "sh",
        "-c",
        &shell,
    ]);
    tmux.wait("the brokers table", |s| s.contains("brokers (1)"));

    // Real traffic while top watches: one connection stays open and keeps sending; short ones
    // open, answer and close (their RTT is observed when they close).
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut long = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            while !stop.load(Ordering::Relaxed) {
                fake_request(&mut long, 64 * 1024, 16 * 1024).unwrap();
                let mut short = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                fake_request(&mut short, 100, 100).unwrap();
                drop(short);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let rate = regex::Regex::new(r"[1-9][0-9.]* [kM]B/s").unwrap();
    let rtt = regex::Regex::new(r"<[0-9]+(us|ms) +<[0-9]+(us|ms) *│").unwrap();
    let screen = tmux.wait("traffic, rates and RTT on the listener row", |s| {
        s.lines()
            .any(|l| l.contains("PLAINTEXT") && rate.find_iter(l).count() == 2 && rtt.is_match(l))
    });
    eprintln!("top at 120x40:\n{screen}");
    let header = line_with(&screen, "LISTENER");
    for column in [
        "CONNS", "IN/s", "OUT/s", "RESETS", "RETRANS", "RTT p50", "RTT p99",
    ] {
        assert!(header.contains(column), "{screen}");
    }
    let row = line_with(&screen, "PLAINTEXT");
    let cells: Vec<&str> = row
        .trim_matches(['│', ' '])
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        cells[..3],
        ["7", "PLAINTEXT", &port.to_string()],
        "{screen}"
    );
    // The long connection is open (a short one may be too at that instant).
    assert!(["1", "2"].contains(&cells[3]), "{screen}");
    let b = line_with(&screen, "kafka-7");
    assert!(
        b.contains("RUNNING (3)") && b.contains(&broker.pid.to_string()),
        "{screen}"
    );
    assert!(screen.contains("https://localhost:"), "{screen}");
    // The refresh time is local (the test's TZ).
    assert!(
        line_with(&screen, "brokerscope top").contains("+05:30"),
        "{screen}"
    );

    // Sort and filter from the keyboard.
    tmux.ok(&["send-keys", "-t", "top", "s"]);
    tmux.wait("sort by connections", |s| {
        s.contains("sort conns desc") && s.contains("CONNSv")
    });
    tmux.ok(&["send-keys", "-t", "top", "/", "z", "z", "z", "Enter"]);
    tmux.wait("a filter matching nothing", |s| {
        s.contains("brokers (0)") && s.contains("listeners (0)") && s.contains("filter: zzz")
    });
    tmux.ok(&["send-keys", "-t", "top", "/", "Escape"]);
    tmux.wait("the filter cleared", |s| s.contains("brokers (1)"));

    // Narrower: the essential columns stay.
    tmux.ok(&["resize-window", "-t", "top", "-x", "80", "-y", "30"]);
    let narrow = tmux.wait("the narrow layout", |s| {
        s.lines().next().is_some_and(|l| l.chars().count() <= 80)
            && s.contains("RTT p99")
            && !s.contains("RTT p50")
    });
    // The title keeps what matters when it is short of room: the sort.
    assert!(
        narrow.lines().next().unwrap().contains("sort conns desc"),
        "{narrow}"
    );
    eprintln!("top at 80x30:\n{narrow}");
    assert!(
        line_with(&narrow, "PLAINTEXT").contains(&port.to_string()),
        "{narrow}"
    );
    // Short: the brokers only, said so.
    tmux.ok(&["resize-window", "-t", "top", "-x", "80", "-y", "9"]);
    let short = tmux.wait("the short layout", |s| s.contains("listeners hidden"));
    eprintln!("top at 80x9:\n{short}");
    assert!(
        short.contains("RUNNING (3)") && !short.contains("PLAINTEXT"),
        "{short}"
    );
    // Tiny: one sentence, no garbage.
    tmux.ok(&["resize-window", "-t", "top", "-x", "24", "-y", "4"]);
    tmux.wait("the too-small notice", |s| s.contains("terminal too"));
    // Back to full size: everything again.
    tmux.ok(&["resize-window", "-t", "top", "-x", "120", "-y", "40"]);
    tmux.wait("the full layout again", |s| {
        s.contains("RTT p50") && s.contains("PLAINTEXT")
    });

    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();

    // The agent goes away: the last rows stay, the footer says why they are not refreshed,
    // and the keys still answer.
    agent.kill();
    let gone = tmux.wait("the agent's absence in the footer", |s| {
        s.contains("! cannot connect to localhost:")
    });
    assert!(
        gone.contains("RUNNING (3)") && gone.contains("PLAINTEXT"),
        "{gone}"
    );

    // 'q' quits cleanly: exit 0, the session (and terminal) handed back.
    tmux.ok(&["send-keys", "-t", "top", "q"]);
    let status = eventually("top to exit", Duration::from_secs(5), || {
        std::fs::read_to_string(&status)
            .ok()
            .filter(|s| s.ends_with('\n'))
    });
    assert_eq!(status, "exit 0\n");
    eventually("the tmux session to end", Duration::from_secs(5), || {
        (!tmux.run(&["has-session", "-t", "top"]).status.success()).then_some(())
    });
}
