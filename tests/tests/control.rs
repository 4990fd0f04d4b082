//! The operator's control channel, end to end against the real agent: live config (GET/PATCH
//! /v1/config), logs, diagnostics, the event stream and the CLI client.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use brokerscope_tests::{Agent, FakeBroker, FakeBrokerSpec, eventually, free_port, privileged};
use serde_json::{Value, json};

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
        let lines: Vec<String> = agent
            .log_text()
            .lines()
            .filter(|l| l.contains("config changed"))
            .map(str::to_string)
            .collect();
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
