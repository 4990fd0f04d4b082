//! The operator CLI as a person and a script meet it, end to end: the real `brokerscope` binary
//! as a client process of a real agent over mTLS, with fake brokers and real traffic. Tables,
//! `-o json|yaml|wide|tar.gz`, exit codes, `--broker` hints, `logs -f` and `events -f`, the
//! rate limit.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use brokerscope_tests::{
    Agent, FakeBroker, FakeBrokerSpec, KillOnDrop, agent_bin, broker_properties, discovery_config,
    privileged, wait_broker_running,
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
    for word in ["logs", "events", "completions", "tar.gz", "yaml", "wide"] {
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
    for page in ["brokerscope.1", "brokerscope-get.1", "brokerscope-logs.1"] {
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
