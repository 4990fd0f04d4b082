//! The operator's control channel, end to end against the real agent: live config (GET/PATCH
//! /v1/config), logs, diagnostics, the event stream and the CLI client.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use brokerscope_tests::{Agent, FakeBroker, FakeBrokerSpec, eventually, free_port, privileged};
use serde_json::{Value, json};

/// The stalled-subscriber test's flood of 34,000 loopback connections (about 100k kernel
/// events) is seen by every agent on the host that watches all listeners, and it loads both
/// CPUs for seconds. It holds this for writing; the tests that wait for one connection's
/// event within a bound, or watch all listeners, hold it for reading, so the flood never runs
/// beside them (a CI run lost an IPv6 test's `connection_open` in it).
static FLOOD: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn beside_no_flood() -> std::sync::RwLockReadGuard<'static, ()> {
    FLOOD
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Matches fake brokers whose properties live under `dir` only.
fn pattern_for(dir: &Path) -> String {
    format!(
        r"kafka\.Kafka {}/",
        regex::escape(&dir.display().to_string())
    )
}

fn patch(agent: &Agent, body: &str) -> (u16, Value) {
    patch_with(&agent.client_args(), &agent.url("/v1/config"), body)
}

/// PATCH with curl and `client` (CA, cert, key); usable from other threads.
fn patch_with(client: &[String], url: &str, body: &str) -> (u16, Value) {
    let mut args: Vec<&str> = client.iter().map(String::as_str).collect();
    args.extend([
        "-X",
        "PATCH",
        "-H",
        "content-type: application/merge-patch+json",
        "--data-binary",
        body,
        url,
    ]);
    let (code, text) =
        brokerscope_tests::curl(&args).unwrap_or_else(|e| panic!("PATCH {body}: {e}"));
    (
        code,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("PATCH answer {text:?}: {e}")),
    )
}

fn config(agent: &Agent) -> Value {
    let (code, text) = agent.get("/v1/config");
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).expect("JSON")
}

fn generation(agent: &Agent) -> f64 {
    agent
        .metric("brokerscope_config_generation", &[])
        .expect("brokerscope_config_generation")
}

fn brokers(agent: &Agent) -> Vec<Value> {
    let (code, body) = agent.get("/v1/brokers");
    assert_eq!(code, 200, "/v1/brokers: {body}");
    serde_json::from_str::<Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn patched_patterns_find_a_broker_without_restart() {
    if !privileged("patched_patterns_find_a_broker_without_restart") {
        return;
    }
    let watched = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let props = write(
        other.path(),
        "b7.properties",
        &format!(
            "node.id=7\nlisteners=PLAINTEXT://127.0.0.1:{}\n",
            free_port()
        ),
    );
    let broker = FakeBroker::start(FakeBrokerSpec::new(&props));
    let agent = Agent::start(&format!(
        "[discovery]\ncmdline_patterns = ['{}']\n",
        pattern_for(watched.path())
    ));
    agent.wait_ready();
    assert_eq!(brokers(&agent), Vec::<Value>::new());
    let pid = agent.pid();

    let new_pattern = pattern_for(other.path());
    let started = Instant::now();
    let (code, answer) = patch(
        &agent,
        &json!({"discovery": {"cmdline_patterns": [new_pattern]}}).to_string(),
    );
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["generation"], 1);
    assert_eq!(
        answer["changed"],
        json!([{"key": "discovery.cmdline_patterns",
                "old": [pattern_for(watched.path())], "new": [new_pattern]}])
    );
    let found = eventually("broker 7 after the patch", Duration::from_secs(5), || {
        brokers(&agent)
            .into_iter()
            .find(|b| b["id"] == "7" && b["pid"] == broker.pid && b["state"] == "running")
    });
    eprintln!("broker found {:?} after the PATCH", started.elapsed());
    assert_eq!(found["evidence"]["matched_pattern"], new_pattern);
    assert_eq!(agent.pid(), pid, "same process: no restart");
    assert_eq!(
        config(&agent)["discovery"]["cmdline_patterns"],
        json!([new_pattern])
    );
    assert_eq!(generation(&agent), 1.0);
    let line = agent.wait_for_log("config changed");
    assert!(
        line.contains("who=cluster-operator") && line.contains("key=discovery.cmdline_patterns"),
        "{line}"
    );
}

#[test]
fn patched_access_log_takes_effect_at_once() {
    if !privileged("patched_access_log_takes_effect_at_once") {
        return;
    }
    let agent = Agent::start("access_log = \"off\"\n");
    let (code, _) = agent.get("/nothing-here-before");
    assert_eq!(code, 404);
    let (code, answer) = patch(&agent, r#"{"server":{"access_log":"info"}}"#);
    assert_eq!(code, 200, "{answer}");
    let (code, _) = agent.get("/nothing-here-after");
    assert_eq!(code, 404);
    agent.wait_for_log("path=/nothing-here-after");
    assert!(
        !agent.log_text().contains("path=/nothing-here-before"),
        "logged while off:\n{}",
        agent.log_text()
    );
    // And back off: the next request is not logged, the one before it was.
    let (code, _) = patch(&agent, r#"{"server":{"access_log":"off"}}"#);
    assert_eq!(code, 200);
    agent.get("/nothing-here-off-again");
    agent.wait_for_log("path=/v1/config");
    let (code, _) = agent.get("/health");
    assert_eq!(code, 200);
    assert!(!agent.log_text().contains("path=/nothing-here-off-again"));
    assert_eq!(config(&agent)["server"]["access_log"], "off");

    // log.level switches the agent's log filter live: at `warn` the access log's info lines
    // stop; the change itself is still recorded, and so is the way back.
    let (code, _) = patch(
        &agent,
        r#"{"server":{"access_log":"info"},"log":{"level":"warn"}}"#,
    );
    assert_eq!(code, 200);
    let line = agent.wait_for_log("key=log.level");
    assert!(line.contains(r#"new="warn""#), "{line}");
    agent.get("/nothing-here-at-warn");
    let (code, _) = patch(&agent, r#"{"log":{"level":"info"}}"#);
    assert_eq!(code, 200);
    agent.wait_for_log(r#"key=log.level old="warn" new="info""#);
    agent.get("/nothing-here-at-info");
    agent.wait_for_log("path=/nothing-here-at-info");
    assert!(!agent.log_text().contains("path=/nothing-here-at-warn"));
}

#[test]
fn invalid_patches_name_the_key_and_change_nothing() {
    if !privileged("invalid_patches_name_the_key_and_change_nothing") {
        return;
    }
    let agent = Agent::start("");
    let before = config(&agent);
    let field = |key: &str| -> Value { json!(key) };
    let cases: [(&str, Vec<Value>); 9] = [
        (
            r#"{"server":{"rate_limit_rps":"fast"}}"#,
            vec![field("server.rate_limit_rps")],
        ),
        (
            r#"{"server":{"colour":"red"}}"#,
            vec![field("server.colour")],
        ),
        (r#"{"telemetry":{"on":true}}"#, vec![field("telemetry")]),
        (
            r#"{"discovery":{"cmdline_patterns":["kafka(["]}}"#,
            vec![field("discovery.cmdline_patterns")],
        ),
        (
            r#"{"server":{"rate_limit_rps":0,"rate_limit_burst":2000000}}"#,
            vec![
                field("server.rate_limit_rps"),
                field("server.rate_limit_burst"),
            ],
        ),
        (
            r#"{"discovery":{"listener_ports":[70000]}}"#,
            vec![field("discovery.listener_ports")],
        ),
        (
            r#"{"server":{"listen":"127.0.0.1:1"}}"#,
            vec![field("server.listen")],
        ),
        (
            r#"{"probes":{"connections_capacity":1024}}"#,
            vec![field("probes.connections_capacity")],
        ),
        ("this is not JSON", vec![field("body")]),
    ];
    for (body, keys) in cases {
        let (code, answer) = patch(&agent, body);
        assert_eq!(code, 400, "{body}: {answer}");
        assert_eq!(answer["error"], "invalid config", "{body}");
        let got: Vec<Value> = answer["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["key"].clone())
            .collect();
        assert_eq!(got, keys, "{body}: {answer}");
    }
    let restart = patch(&agent, r#"{"server":{"listen":"127.0.0.1:1"}}"#).1;
    assert!(
        restart["fields"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("restart"),
        "{restart}"
    );
    // 10 MB: refused before it is read.
    let big = tempfile::NamedTempFile::new().unwrap();
    let mut text = String::from(r#"{"server":{"allowed_client_names":[""#);
    text.push_str(&"a".repeat(10 * 1024 * 1024));
    text.push_str(r#""]}}"#);
    std::fs::write(big.path(), &text).unwrap();
    let data = format!("@{}", big.path().display());
    let (code, body) = agent
        .curl(&[
            "--http1.1",
            "-X",
            "PATCH",
            "--data-binary",
            &data,
            &agent.url("/v1/config"),
        ])
        .expect("curl");
    assert_eq!(code, 413, "{body}");
    assert_eq!(body, r#"{"error":"body too large","limit_bytes":1048576}"#);
    assert_eq!(config(&agent), before);
    assert_eq!(generation(&agent), 0.0);
}

#[test]
fn concurrent_patches_are_serialized_and_none_is_lost() {
    if !privileged("concurrent_patches_are_serialized_and_none_is_lost") {
        return;
    }
    let agent = Agent::start("rate_limit_rps = 1000\nrate_limit_burst = 1000\n");
    let g0 = generation(&agent);
    // 20 PATCHes at once: 10 set the rate, 10 the burst, every value distinct.
    let values: Vec<(&str, u32)> = (0..20)
        .map(|i| {
            let key = if i % 2 == 0 {
                "rate_limit_rps"
            } else {
                "rate_limit_burst"
            };
            (key, 2000 + i)
        })
        .collect();
    let client = agent.client_args();
    let url = agent.url("/v1/config");
    std::thread::scope(|s| {
        for (key, value) in &values {
            let (client, url) = (&client, &url);
            s.spawn(move || {
                let (code, answer) =
                    patch_with(client, url, &json!({"server": {*key: value}}).to_string());
                assert_eq!(code, 200, "{answer}");
                assert_eq!(answer["changed"].as_array().unwrap().len(), 1, "{answer}");
            });
        }
    });
    assert_eq!(generation(&agent), g0 + 20.0);
    // Every change saw the one before it: per key, old -> new links form one chain through
    // all ten values.
    let lines: Vec<String> = eventually("20 change lines", Duration::from_secs(5), || {
        let lines = agent.log_lines("config changed");
        (lines.len() == 20).then_some(lines)
    });
    for key in ["rate_limit_rps", "rate_limit_burst"] {
        let mut links: Vec<(u32, u32)> = lines
            .iter()
            .filter(|l| l.contains(&format!("key=server.{key} ")))
            .map(|l| {
                let num = |field: &str| -> u32 {
                    l.split(&format!(" {field}="))
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| panic!("{field} in {l}"))
                };
                (num("old"), num("new"))
            })
            .collect();
        assert_eq!(links.len(), 10, "{key}: {links:?}");
        let mut at = 1000;
        let mut chain = Vec::new();
        while let Some(i) = links.iter().position(|(old, _)| *old == at) {
            at = links.remove(i).1;
            chain.push(at);
        }
        assert_eq!(
            chain.len(),
            10,
            "{key}: broken chain {chain:?}, left {links:?}"
        );
        assert_eq!(config(&agent)["server"][key], at);
    }
}

#[test]
fn logs_are_served_by_time_and_level() {
    if !privileged("logs_are_served_by_time_and_level") {
        return;
    }
    let agent = Agent::start("");
    agent.wait_ready();
    let (code, body) = agent.get("/v1/logs");
    assert_eq!(code, 200, "{body}");
    let all: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(all["dropped"], 0);
    let lines = all["lines"].as_array().unwrap();
    let listening = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap()
                .starts_with("step 5/5: listening")
        })
        .unwrap_or_else(|| panic!("no listening line in {body}"));
    assert_eq!(listening["level"], "info");
    assert_eq!(listening["target"], "brokerscope");
    // The agent's own debug lines are there (RUST_LOG has brokerscope=debug)...
    assert!(lines.iter().any(|l| l["level"] == "debug"), "{body}");
    // ...and level=info leaves them out.
    let (_, body) = agent.get("/v1/logs?level=info");
    let info: Value = serde_json::from_str(&body).unwrap();
    let info = info["lines"].as_array().unwrap();
    assert!(!info.is_empty());
    assert!(
        info.iter()
            .all(|l| l["level"] == "info" || l["level"] == "warn" || l["level"] == "error")
    );
    // since: a PATCH made now shows, the startup lines do not.
    let since = time_now_rfc3339();
    patch(&agent, r#"{"server":{"rate_limit_rps":21}}"#);
    let (_, body) = agent.get(&format!("/v1/logs?since={since}"));
    let recent: Value = serde_json::from_str(&body).unwrap();
    let recent = recent["lines"].as_array().unwrap();
    assert!(
        recent
            .iter()
            .any(|l| l["message"].as_str().unwrap().starts_with("config changed")),
        "{body}"
    );
    assert!(
        !recent
            .iter()
            .any(|l| l["message"].as_str().unwrap().starts_with("step 5/5")),
        "{body}"
    );
    // Bad parameters are named.
    for (query, parameter) in [
        ("level=loud", "level"),
        ("since=yesterday", "since"),
        ("since=-3", "since"),
        ("colour=red", "query"),
    ] {
        let (code, body) = agent.get(&format!("/v1/logs?{query}"));
        assert_eq!(code, 400, "{query}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["parameter"], parameter, "{query}: {body}");
    }
}

fn time_now_rfc3339() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%NZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn diagnostics_bundle_holds_everything_asked_for() {
    if !privileged("diagnostics_bundle_holds_everything_asked_for") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let props = write(
        dir.path(),
        "b3.properties",
        &format!("node.id=3\nlisteners=PLAINTEXT://127.0.0.1:{port}\n"),
    );
    let broker = FakeBroker::start(FakeBrokerSpec::new(&props));
    let pattern = pattern_for(dir.path());
    let agent = Agent::start(&format!("[discovery]\ncmdline_patterns = ['{pattern}']\n"));
    agent.wait_ready();
    eventually("broker 3", Duration::from_secs(5), || {
        brokers(&agent).into_iter().find(|b| b["id"] == "3")
    });
    // No node-wide hook by default: the open hooks never attach, so the agent runs exactly the
    // programs it attached at start.
    assert!(!agent.attached("state_openat") && !agent.attached("state_openat2"));

    // Connections to the broker while the capture holds BPF stats on.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (code, body) = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::net::TcpStream::connect(("127.0.0.1", port));
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let answer = agent.get("/v1/diagnostics");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        answer
    });
    assert_eq!(code, 200, "{body}");
    let d: Value = serde_json::from_str(&body).unwrap();

    assert_eq!(d["agent"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(d["agent"]["pid"], agent.pid());
    assert!(d["agent"]["build"]["profile"].is_string());
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(d["kernel"]["release"], release.trim());
    assert_eq!(d["kernel"]["facts"]["btf"], "/sys/kernel/btf/vmlinux");
    assert_eq!(d["readiness"]["ready"], true, "{}", d["readiness"]);
    assert_eq!(d["readiness"]["reasons"], json!([]), "{}", d["readiness"]);
    // A program the verifier refused: one line in /ready, its whole log here.
    let refused: Vec<&str> = d["readiness"]["degraded"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|line| line.as_str())
        .filter(|line| line.contains("the kernel's verifier refused it"))
        .filter_map(|line| line.split(' ').next())
        .collect();
    let logged: Vec<&str> = d["verifier_logs"]
        .as_array()
        .expect("verifier_logs")
        .iter()
        .filter_map(|v| v["program"].as_str())
        .collect();
    assert_eq!(refused, logged, "{}", d["verifier_logs"]);
    assert_eq!(
        d["bpf_stats"],
        json!({"enabled_for_ms": 1000, "error": null})
    );

    // Exactly the programs attached at start: no standby one is needed now.
    let mut ids = agent.program_ids();
    let programs = d["programs"].as_array().unwrap();
    let mut listed: Vec<u32> = programs
        .iter()
        .map(|p| p["id"].as_u64().unwrap() as u32)
        .collect();
    ids.sort_unstable();
    listed.sort_unstable();
    assert_eq!(listed, ids, "{programs:?}");
    for p in programs {
        assert!(p["hook"].as_str().unwrap().contains('/'), "{p}");
        // Default config: every hook is broker-only (no syscall tracepoint).
        assert_eq!(p["scope"], "broker-only", "{p}");
    }
    let sock_state = programs
        .iter()
        .find(|p| p["program"] == "sock_state_btf")
        .expect("sock_state_btf (this kernel takes the BTF tracepoint)");
    assert!(
        sock_state["window_run_count"].as_u64().unwrap() > 0,
        "{sock_state}"
    );
    assert!(
        sock_state["window_run_time_ns"].as_u64().unwrap() > 0,
        "{sock_state}"
    );
    assert!(sock_state["run_count"].as_u64() >= sock_state["window_run_count"].as_u64());

    let maps = d["maps"].as_array().unwrap();
    let capacity = |name: &str| {
        maps.iter()
            .find(|m| m["map"] == name)
            .unwrap_or_else(|| panic!("map {name} in {maps:?}"))["capacity"]
            .clone()
    };
    assert_eq!(capacity("listeners"), 4096);
    assert_eq!(capacity("connections"), 65536);

    let b = d["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == "3")
        .expect("broker 3");
    assert_eq!(b["pid"], broker.pid);
    assert_eq!(b["evidence"]["matched_pattern"], pattern);
    assert_eq!(b["evidence"]["properties_read"], true);

    let server = &d["tls"]["server"];
    assert_eq!(server["file"], agent.pki.path("tls.crt").to_str().unwrap());
    assert_eq!(server["certificates"][0]["subject"], "CN=brokerscope");
    assert_eq!(server["certificates"][0]["issuer"], "CN=brokerscope dev CA");
    assert_eq!(
        server["certificates"][0]["not_after"],
        d["tls"]["server_in_use_not_after"]
    );
    assert_eq!(
        d["tls"]["client_ca"]["certificates"][0]["subject"],
        "CN=brokerscope dev CA"
    );
    assert!(!body.contains("PRIVATE KEY"), "no key material");

    assert_eq!(d["config"], config(&agent));
    assert_eq!(d["config_generation"], 0);
    assert!(
        d["logs"]["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["message"]
                .as_str()
                .unwrap()
                .starts_with("step 4/5: probes attached")),
        "logs in the bundle"
    );

    // The same as tar.gz, by Accept.
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("d.tar.gz");
    let mut args = agent.client_args();
    args.extend([
        "-H".into(),
        "Accept: application/gzip".into(),
        "-o".into(),
        archive.display().to_string(),
        agent.url("/v1/diagnostics"),
    ]);
    let (code, _) =
        brokerscope_tests::curl(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    assert_eq!(code, 200);
    let listing =
        brokerscope_tests::run_ok(std::process::Command::new("tar").arg("-tzf").arg(&archive));
    assert_eq!(
        listing.lines().collect::<Vec<_>>(),
        ["diagnostics.json", "logs.txt", "config.toml"]
    );
    let extracted = brokerscope_tests::run_ok(
        std::process::Command::new("tar")
            .args(["-xzOf"])
            .arg(&archive)
            .arg("diagnostics.json"),
    );
    let inner: Value = serde_json::from_str(&extracted).unwrap();
    assert_eq!(inner["brokers"][0]["id"], "3");
}

/// A `/v1/events` subscriber: curl -N in the background, its SSE frames as (event, data).
struct Subscriber {
    _child: brokerscope_tests::KillOnDrop,
    frames: std::sync::mpsc::Receiver<(String, Value)>,
}

impl Subscriber {
    fn start(agent: &Agent, query: &str) -> Self {
        let mut child = std::process::Command::new("curl")
            .args(["-sS", "-N", "--http1.1"])
            .args(agent.client_args())
            .arg(agent.url(&format!("/v1/events{query}")))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("curl");
        let stdout = child.stdout.take().unwrap();
        let (tx, frames) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut event = String::new();
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    let data = serde_json::from_str(d).unwrap_or(Value::Null);
                    if tx.send((std::mem::take(&mut event), data)).is_err() {
                        return;
                    }
                }
            }
        });
        Subscriber {
            _child: brokerscope_tests::KillOnDrop(child),
            frames,
        }
    }

    /// The next frame matching `f`, within `timeout`; a failure shows how many other frames
    /// came meanwhile, and the last of them.
    fn next(&self, timeout: Duration, f: impl Fn(&str, &Value) -> bool) -> (String, Value) {
        let deadline = Instant::now() + timeout;
        let mut others = 0;
        let mut last = std::collections::VecDeque::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.frames.recv_timeout(left) {
                Ok((e, d)) if f(&e, &d) => return (e, d),
                Ok(frame) => {
                    others += 1;
                    if last.len() == 5 {
                        last.pop_front();
                    }
                    last.push_back(frame);
                }
                Err(_) => panic!(
                    "no matching event within {timeout:?}; {others} other frames came, the last \
                     {}: {last:?}",
                    last.len()
                ),
            }
        }
    }
}

/// Waits until the agent counts `n` subscribers' streams as open (the subscription is taken
/// when the response starts).
fn wait_subscribed(agent: &Agent) {
    eventually("the event stream open", Duration::from_secs(5), || {
        let (_, body) = agent.get("/metrics");
        brokerscope_tests::find_sample(
            &body,
            "brokerscope_http_requests_total",
            &[("path", "/v1/events"), ("code", "200")],
        )
        .filter(|n| *n >= 1.0)
    });
}

#[test]
fn broker_events_stream_live_with_filters() {
    if !privileged("broker_events_stream_live_with_filters") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&format!(
        "[discovery]\ncmdline_patterns = ['{}']\n",
        pattern_for(dir.path())
    ));
    agent.wait_ready();
    let all = Subscriber::start(&agent, "");
    let only_9 = Subscriber::start(&agent, "?broker=9&kind=broker_stopped");
    wait_subscribed(&agent);
    let props = |id: u32| {
        write(
            dir.path(),
            &format!("b{id}.properties"),
            &format!(
                "node.id={id}\nlisteners=PLAINTEXT://127.0.0.1:{}\n",
                free_port()
            ),
        )
    };
    let (p8, p9) = (props(8), props(9));
    let b8 = FakeBroker::start(FakeBrokerSpec::new(&p8));
    let (kind, data) = all.next(Duration::from_secs(5), |_, d| d["broker"] == "8");
    assert_eq!(kind, "broker_started");
    assert_eq!(data["kind"], "broker_started");
    assert_eq!(data["detail"]["pid"], b8.pid);
    let b9 = FakeBroker::start(FakeBrokerSpec::new(&p9));
    all.next(Duration::from_secs(5), |e, d| {
        e == "broker_started" && d["broker"] == "9"
    });
    let pid9 = b9.pid;
    b9.kill();
    let (kind, data) = only_9.next(Duration::from_secs(5), |_, _| true);
    assert_eq!(
        (kind.as_str(), &data["broker"], &data["detail"]["pid"]),
        ("broker_stopped", &json!("9"), &json!(pid9))
    );
    b8.kill();
    all.next(Duration::from_secs(5), |e, d| {
        e == "broker_stopped" && d["broker"] == "8"
    });
    // The filtered stream saw nothing of broker 8: its next frame would be 9's again.
    assert!(only_9.frames.try_recv().is_err());
    // Kernel connection events were on while someone listened; the last one leaving turns
    // them off (the stream ended cleanly on the client's disconnect).
    agent.wait_for_log("kernel connection events switched on=true");
    drop((all, only_9));
    agent.wait_for_log("kernel connection events switched on=false");
    let (code, body) = agent.get("/v1/events?kind=open");
    assert_eq!(code, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["parameter"],
        "kind"
    );
}

/// Runs `brokerscope <args>` as a client of `agent` (its PKI); returns (exit code, stdout, stderr).
fn cli(agent: &Agent, pki: &brokerscope_tests::Pki, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(brokerscope_tests::agent_bin())
        .args(args)
        .arg("--url")
        .arg(format!("https://localhost:{}", agent.port()))
        .arg("--cacert")
        .arg(agent.pki.path("ca.crt"))
        .arg("--cert")
        .arg(pki.path("client.crt"))
        .arg("--key")
        .arg(pki.path("client.key"))
        .output()
        .expect("run the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_prints_brokers_sets_config_and_explains_refusals() {
    if !privileged("cli_prints_brokers_sets_config_and_explains_refusals") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let props = write(
        dir.path(),
        "b5.properties",
        &format!("node.id=5\nlisteners=PLAINTEXT://127.0.0.1:{port}\n"),
    );
    let broker = FakeBroker::start(FakeBrokerSpec {
        hostname: Some("kafka-5"),
        ..FakeBrokerSpec::new(&props)
    });
    let agent = Agent::start(&format!(
        "[discovery]\ncmdline_patterns = ['{}']\n",
        pattern_for(dir.path())
    ));
    agent.wait_ready();
    let own = &agent.pki;

    let (code, out, err) = cli(&agent, own, &["get", "brokers"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["ID", "STATE", "PID", "POD", "RESTARTS", "AGE", "LISTENERS"]
    );
    // Kafka's state by name and number (the process state is in `-o wide`); the age varies.
    assert_eq!(
        [&lines[1][..6], &lines[1][7..]].concat(),
        [
            "5",
            "RUNNING",
            "(3)",
            &broker.pid.to_string(),
            "kafka-5",
            "0",
            &format!("PLAINTEXT:{port}")
        ]
    );
    assert_eq!(lines.len(), 2, "{out}");

    let (code, out, err) = cli(&agent, own, &["get", "brokers", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["id"], "5");

    let (code, out, err) = cli(
        &agent,
        own,
        &[
            "set",
            "config",
            "server.access_log=debug",
            "server.rate_limit_rps=30",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        // Agent::start raises the rate limit for polling tests: 100000 is its value.
        "server.access_log: \"info\" -> \"debug\"\nserver.rate_limit_rps: 100000 -> 30\ngeneration 1\n"
    );
    assert_eq!(config(&agent)["server"]["access_log"], "debug");
    let (code, out, _) = cli(&agent, own, &["get", "config"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().any(|l| l == "server.rate_limit_rps = 30"),
        "{out}"
    );

    let (code, _, err) = cli(
        &agent,
        own,
        &["set", "config", "server.rate_limit_rps=fast"],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("refused (400): server.rate_limit_rps:"),
        "{err}"
    );

    // A certificate from a CA the agent does not trust.
    let stranger = brokerscope_tests::Pki::new();
    let (code, out, err) = cli(&agent, &stranger, &["get", "brokers"]);
    // 4: access denied (docs/cli.md, "Exit codes").
    assert_eq!((code, out.as_str()), (4, ""));
    assert!(
        err.contains("the server refused our client certificate"),
        "{err}"
    );
}

#[test]
fn cli_exits_non_zero_with_a_clear_message_on_403() {
    if !privileged("cli_exits_non_zero_with_a_clear_message_on_403") {
        return;
    }
    let agent = Agent::start("allowed_client_names = [\"prometheus\"]\n");
    let (code, out, err) = cli(&agent, &agent.pki, &["get", "brokers"]);
    // 4: access denied (docs/cli.md, "Exit codes").
    assert_eq!((code, out.as_str()), (4, ""));
    assert_eq!(
        err.trim(),
        "error: forbidden: the agent knows us as `cluster-operator`, which is not in its server.allowed_client_names"
    );
}

#[test]
fn cli_null_puts_a_key_back_to_its_default() {
    if !privileged("cli_null_puts_a_key_back_to_its_default") {
        return;
    }
    // The file leaves rate_limit_rps at its default.
    let agent = Agent::start("rate_limit_burst = 1000\n");
    let rps = |agent: &Agent| config(agent)["server"]["rate_limit_rps"].clone();
    let default = rps(&agent);
    assert_eq!(default, json!(20));
    let (code, out, err) = cli(
        &agent,
        &agent.pki,
        &[
            "set",
            "config",
            "server.rate_limit_rps=7",
            "server.access_log=debug",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(rps(&agent), json!(7));
    let (code, out, err) = cli(
        &agent,
        &agent.pki,
        &[
            "set",
            "config",
            "server.rate_limit_rps=null",
            "server.access_log=null",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("server.rate_limit_rps: 7 -> ") && !out.contains("nothing changed"),
        "{out}"
    );
    assert_eq!(rps(&agent), default);
    assert_eq!(config(&agent)["server"]["access_log"], json!("info"));
}

#[test]
fn cli_output_cut_short_by_its_reader_ends_quietly() {
    if !privileged("cli_output_cut_short_by_its_reader_ends_quietly") {
        return;
    }
    let agent = Agent::start("");
    // `brokerscope get metrics | head -2`: the reader goes after two lines.
    let mut child = std::process::Command::new(brokerscope_tests::agent_bin())
        .args(["get", "metrics", "--url"])
        .arg(format!("https://localhost:{}", agent.port()))
        .args(agent.client_args())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert!(first.starts_with('#'), "{first}");
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "nothing on stderr (no panic): {stderr}");
    // Ended by SIGPIPE, as `cat` would be, or done before the reader went.
    assert!(
        out.status.success()
            || std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(libc::SIGPIPE),
        "{:?}",
        out.status
    );
}

#[test]
fn a_log_level_that_is_not_one_is_refused_by_check_config_and_live() {
    if !privileged("a_log_level_that_is_not_one_is_refused_by_check_config_and_live") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "loud.toml", "[log]\nlevel = \"loud\"\n");
    let out = std::process::Command::new(brokerscope_tests::agent_bin())
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("log.level") && stderr.contains("`loud` is neither a level"),
        "{stderr}"
    );
    let agent = Agent::start("");
    let (code, out, err) = cli(&agent, &agent.pki, &["set", "config", "log.level=loud"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("log.level") && err.contains("neither a level"),
        "{err}"
    );
    // The agent still logs.
    let (code, _) = agent.get("/ready");
    assert_eq!(code, 200);
    let (code, out, err) = cli(&agent, &agent.pki, &["logs", "--level", "info"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("step 5/5: listening"), "{out}");
}

/// Resident set of a process, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[test]
fn connection_events_arrive_within_100ms_with_tuple_bytes_and_duration() {
    if !privileged("connection_events_arrive_within_100ms_with_tuple_bytes_and_duration") {
        return;
    }
    let _no_flood = beside_no_flood();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let props = write(
        dir.path(),
        "b4.properties",
        &format!("node.id=4\nlisteners=PLAINTEXT://127.0.0.1:{port}\n"),
    );
    let _broker = FakeBroker::start(FakeBrokerSpec::new(&props));
    let agent = Agent::start(&format!(
        "[discovery]\ncmdline_patterns = ['{}']\n",
        pattern_for(dir.path())
    ));
    agent.wait_ready();
    eventually("broker 4", Duration::from_secs(5), || {
        brokers(&agent).into_iter().find(|b| b["id"] == "4")
    });
    let sub = Subscriber::start(&agent, "?broker=4&kind=connection_open,connection_close");
    wait_subscribed(&agent);

    let mut latencies = Vec::new();
    for round in 0..10 {
        let started = Instant::now();
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let client = stream.local_addr().unwrap().to_string();
        let (kind, open) = sub.next(Duration::from_secs(2), |_, d| {
            d["detail"]["remote"] == client
        });
        latencies.push(started.elapsed());
        assert_eq!(kind, "connection_open", "round {round}: {open}");
        assert_eq!(open["broker"], "4");
        assert_eq!(open["listener"], "PLAINTEXT");
        assert_eq!(open["detail"]["local"], format!("127.0.0.1:{port}"));
        assert_eq!(open["detail"]["netns"], brokerscope_tests::own_netns());

        brokerscope_tests::fake_request(&mut stream, 100 + round, 1000 * (round + 1)).unwrap();
        drop(stream);
        let (kind, close) = sub.next(Duration::from_secs(5), |_, d| {
            d["detail"]["remote"] == client
        });
        assert_eq!(kind, "connection_close", "{close}");
        assert_eq!(
            close["detail"]["bytes_received"],
            9 + 100 + round,
            "{close}"
        );
        assert_eq!(close["detail"]["bytes_sent"], 1000 * (round + 1), "{close}");
        assert!(
            close["detail"]["duration_ns"].as_u64().unwrap() > 0,
            "{close}"
        );
    }
    latencies.sort();
    eprintln!(
        "connection_open event latency over 10 connections: min {:?}, median {:?}, max {:?}",
        latencies[0], latencies[5], latencies[9]
    );
    assert!(latencies[9] < Duration::from_millis(100), "{latencies:?}");
}

/// IPv6 connections carry both addresses in their events, whichever hook counts them: the BTF
/// program loads each address as two halves, the raw one reads the socket, the classic one
/// its record.
#[test]
fn connection_events_carry_ipv6_addresses_through_every_hook() {
    if !privileged("connection_events_carry_ipv6_addresses_through_every_hook") {
        return;
    }
    let _no_flood = beside_no_flood();
    for (program, disabled) in [
        ("sock_state_btf", ""),
        ("sock_state_raw", "\"sock_state_btf\""),
        ("sock_state", "\"sock_state_btf\", \"sock_state_raw\""),
    ] {
        let agent = Agent::start(&format!(
            "[probes]\nwatch_all_listeners = true\ndisabled_programs = [{disabled}]\n"
        ));
        agent.wait_ready();
        assert!(agent.attached(program), "{program} should serve");
        let listener = std::net::TcpListener::bind("[::1]:0").unwrap();
        let local = listener.local_addr().unwrap().to_string();
        let sub = Subscriber::start(&agent, "?kind=connection_open,connection_close");
        wait_subscribed(&agent);
        let stream = std::net::TcpStream::connect(&local).unwrap();
        let (server, _) = listener.accept().unwrap();
        let remote = stream.local_addr().unwrap().to_string();
        assert!(remote.starts_with("[::1]:"), "{remote}");
        let (kind, open) = sub.next(Duration::from_secs(2), |_, d| {
            d["detail"]["remote"] == remote
        });
        assert_eq!(kind, "connection_open", "{program}: {open}");
        assert_eq!(open["detail"]["local"], local, "{program}: {open}");
        drop(server);
        drop(stream);
        let (kind, close) = sub.next(Duration::from_secs(5), |_, d| {
            d["detail"]["remote"] == remote
        });
        assert_eq!(kind, "connection_close", "{program}: {close}");
        assert_eq!(close["detail"]["local"], local, "{program}: {close}");
    }
}

/// SO_LINGER 0: close sends an RST (no TIME_WAIT left behind on the client side).
fn reset_close(stream: std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

#[test]
fn a_stalled_subscriber_costs_bounded_memory_and_learns_what_it_lost() {
    if !privileged("a_stalled_subscriber_costs_bounded_memory_and_learns_what_it_lost") {
        return;
    }
    let _flood = FLOOD
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let agent = Agent::start("[probes]\nwatch_all_listeners = true\n");
    agent.wait_ready();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let sub = Subscriber::start(
        &agent,
        "?kind=connection_open,connection_close,connection_reset",
    );
    wait_subscribed(&agent);
    let first = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let client = first.local_addr().unwrap().to_string();
    sub.next(Duration::from_secs(2), |e, d| {
        e == "connection_open" && d["detail"]["remote"] == client
    });
    reset_close(first);

    let curl = sub._child.0.id() as i32;
    // SAFETY: signals to our own child.
    unsafe { libc::kill(curl, libc::SIGSTOP) };
    let before = rss(agent.pid());
    let started = Instant::now();
    // Each connection: open, the peer's reset, close — about 100k events.
    let connections = 34_000;
    for _ in 0..connections {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => reset_close(s),
            Err(e) => panic!("connect: {e}"),
        }
    }
    let fired = started.elapsed();
    let after = rss(agent.pid());
    // SAFETY: as above.
    unsafe { libc::kill(curl, libc::SIGCONT) };
    eprintln!(
        "{connections} connections in {fired:?}; agent RSS {} -> {} KiB while the subscriber was stopped",
        before / 1024,
        after / 1024
    );
    assert!(
        after < before + 32 * 1024 * 1024,
        "RSS grew from {before} to {after}"
    );

    let (_, dropped) = sub.next(Duration::from_secs(10), |e, _| e == "dropped");
    let mut lost = dropped["lost"].as_u64().unwrap();
    assert!(lost > 0);
    // Every loss this client was told of is in the metric, and nothing else is.
    eventually(
        "events_dropped_total == what the client was told",
        Duration::from_secs(10),
        || {
            while let Ok((e, d)) = sub.frames.try_recv() {
                if e == "dropped" {
                    lost += d["lost"].as_u64().unwrap();
                }
            }
            let metric = agent.metric("brokerscope_events_dropped_total", &[])?;
            (metric == lost as f64).then_some(())
        },
    );
    eprintln!("the stalled subscriber was told of {lost} lost events");
}

#[test]
fn a_changed_config_file_applies_live_through_the_same_validation() {
    if !privileged("a_changed_config_file_applies_live_through_the_same_validation") {
        return;
    }
    let agent = Agent::start("rate_limit_rps = 100\n");
    let path = agent.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    let pid = agent.pid();

    // Polled: the file changes, the agent applies it.
    std::fs::write(
        &path,
        original.replace("rate_limit_rps = 100", "rate_limit_rps = 55"),
    )
    .unwrap();
    eventually(
        "rate_limit_rps 55 from the file",
        Duration::from_secs(5),
        || (config(&agent)["server"]["rate_limit_rps"] == 55).then_some(()),
    );
    let line = agent.wait_for_log("key=server.rate_limit_rps");
    assert!(
        line.contains("who=config-file") && line.contains("old=100 new=55"),
        "{line}"
    );
    assert_eq!(generation(&agent), 1.0);

    // A restart-only key in the file is refused whole, naming the key; nothing changes.
    std::fs::write(
        &path,
        original
            .replace("rate_limit_rps = 100", "rate_limit_rps = 66")
            .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""),
    )
    .unwrap();
    let refused = agent.wait_for_log("config file refused");
    assert!(
        refused.contains("server.listen") && refused.contains("restart"),
        "{refused}"
    );
    assert_eq!(config(&agent)["server"]["rate_limit_rps"], 55);

    // SIGHUP re-reads it too (here: back to the original).
    std::fs::write(&path, &original).unwrap();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    eventually("rate_limit_rps 100 again", Duration::from_secs(5), || {
        (config(&agent)["server"]["rate_limit_rps"] == 100).then_some(())
    });
    assert_eq!(generation(&agent), 2.0);
    assert_eq!(agent.pid(), pid);
}
