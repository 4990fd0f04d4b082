//! The agent's life: start order, readiness, the probe metrics, and a clean detach on SIGTERM.

use std::process::Command;

use brokerscope_tests::{Agent, agent_bin, kernel, privileged};

fn bpftool_has_prog(id: u32) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .expect("bpftool is installed by cargo xtask setup")
        .status
        .success()
}

#[test]
fn ready_reports_attached_probes_and_sigterm_leaves_them_pinned_until_cleanup() {
    if !privileged("ready_reports_attached_probes_and_sigterm_leaves_them_pinned_until_cleanup") {
        return;
    }
    // No broker on this node (a pattern nothing matches): nothing needs the standby programs.
    let mut agent =
        Agent::start("[discovery]\ncmdline_patterns = ['kafka\\.Kafka no-broker-here']\n");
    agent.wait_ready();
    let (code, body) = agent.get("/ready");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(ready["ready"], true, "{body}");
    assert_eq!(ready["reasons"], serde_json::json!([]), "{body}");
    // What this kernel allows, asked of the kernel itself: the agent's choices must follow.
    let map_iters = kernel::map_iterators_allowed();
    let group_dead = kernel::tracepoint_has_field("sched", "sched_process_exit", "group_dead");
    eprintln!("kernel allows: map iterators {map_iters}, group_dead {group_dead}");
    let mut expected_refused = Vec::new();
    if !map_iters {
        expected_refused.extend(["conn_live", "listen_live", "conn_spill_live"]);
    }
    if !group_dead {
        expected_refused.push("process_exit_btf");
    }
    let mut refused: Vec<&str> = ready["degraded"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|s| s.as_str()?.split(' ').next())
                .collect()
        })
        .unwrap_or_default();
    refused.sort_unstable();
    expected_refused.sort_unstable();
    assert_eq!(refused, expected_refused, "refused programs: {body}");
    assert!(ready.get("missing").is_none(), "nothing missing: {body}");
    let (code, health) = agent.get("/health");
    assert_eq!((code, health.as_str()), (200, r#"{"status":"ok"}"#));

    assert_eq!(agent.metric("brokerscope_agent_ready", &[]), Some(1.0));
    assert_eq!(
        agent.metric(
            "brokerscope_probe_attached",
            &[
                ("program", "sock_state_btf"),
                ("hook", "tp_btf/inet_sock_set_state")
            ]
        ),
        Some(1.0),
        "every tested kernel takes the BTF tracepoint, with its direct loads patched in"
    );
    // ... so its fallbacks, the raw and the classic tracepoint, are not attached at all.
    for (program, hook) in [
        ("sock_state_raw", "raw_tracepoint/inet_sock_set_state"),
        ("sock_state", "tracepoint/sock/inet_sock_set_state"),
    ] {
        assert_eq!(
            agent.metric(
                "brokerscope_probe_attached",
                &[("program", program), ("hook", hook)]
            ),
            None,
            "{program}"
        );
    }
    // The scheduler hook too takes its BTF form, and not its raw fallback.
    let btf = [
        ("program", "sched_switch_btf"),
        ("hook", "tp_btf/sched_switch"),
    ];
    assert_eq!(agent.metric("brokerscope_probe_attached", &btf), Some(1.0));
    let raw = [
        ("program", "sched_switch"),
        ("hook", "raw_tracepoint/sched_switch"),
    ];
    assert_eq!(agent.metric("brokerscope_probe_attached", &raw), None);
    // The exit hook takes its BTF form where the kernel passes group_dead (6.13+).
    assert_eq!(agent.attached("process_exit_btf"), group_dead);
    assert_eq!(agent.attached("process_exit"), !group_dead);
    // fsync: the filesystems' own tracepoints, which every tested kernel has.
    for program in [
        "fsync_ext4_enter",
        "fsync_ext4_exit",
        "fsync_xfs",
        "fsync_btrfs",
    ] {
        assert!(agent.attached(program), "{program}");
    }
    for program in ["conn_live", "listen_live", "conn_spill_live"] {
        assert_eq!(agent.attached(program), map_iters, "{program}");
    }
    // Our own scrapes are TCP connections: the program has run.
    let events = agent.metric(
        "brokerscope_probe_events_total",
        &[("program", "sock_state_btf")],
    );
    assert!(events.is_some_and(|n| n > 0.0), "{events:?}");
    assert_eq!(
        agent.metric("brokerscope_map_capacity", &[("map", "connections")]),
        Some(65536.0)
    );
    // The kernel answers with the program's info, misses included (other BPF tools on the
    // machine could cause some, so only the answer itself is certain).
    assert!(
        agent
            .metric(
                "brokerscope_probe_misses_total",
                &[("program", "sock_state_btf")]
            )
            .is_some()
    );

    let ids: Vec<u32> = agent
        .program_ids()
        .into_iter()
        .chain(agent.standby_program_ids())
        .collect();
    // Attached: sock_state_btf, tcp_retransmit, tcp_send_reset, tcp_receive_reset, tcp_live
    // (iterator), process_exec, process_exit_btf or process_exit, state_signal,
    // sched_switch_btf, block_issue, block_insert, block_complete: 12; the ext4 pair, xfs and
    // btrfs (4); the three map iterators where they load. Nothing on standby: node-wide hooks
    // are off by default.
    let expected = 16 + if map_iters { 3 } else { 0 };
    assert_eq!(
        ids.len(),
        expected,
        "every program loaded: {ids:?}\n{}",
        agent.log_text()
    );
    assert!(agent.standby_program_ids().is_empty());
    assert!(ready.get("standby").is_none(), "{body}");
    // Every hook /ready lists is broker-only, and none is a syscall tracepoint.
    let hooks = ready["hooks"].as_array().expect("hooks");
    assert_eq!(hooks.len(), expected, "{hooks:?}");
    for hook in hooks {
        assert_eq!(hook["scope"], "broker-only", "{hook}");
        assert!(
            !hook["hook"].as_str().unwrap().contains("syscalls"),
            "{hook}"
        );
    }
    // And the kernel agrees: no tracepoint link of this agent's programs is a syscall one.
    if kernel::tracepoint_links().is_some() {
        assert!(
            kernel::assert_no_syscall_tracepoint(&ids) > 0,
            "links of {ids:?}"
        );
    } else {
        kernel::assert_no_syscall_tracepoint(&ids);
    }
    for &id in &ids {
        assert!(
            bpftool_has_prog(id),
            "program {id} should be loaded while the agent runs"
        );
    }

    let status = agent.terminate();
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status}\n{}",
        agent.log_text()
    );
    // Pinned, the hooked programs stay attached and counting for the next agent, and the log
    // says so; the iterators (run per scrape, never pinned) go. `brokerscope cleanup`
    // (uninstall) removes the pins.
    let (iterators, hooked): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) = hooks
        .iter()
        .partition(|h| h["hook"].as_str().unwrap().starts_with("iter/"));
    let id_of = |h: &&serde_json::Value| h["id"].as_u64().unwrap() as u32;
    let hooked: Vec<u32> = hooked.iter().map(id_of).collect();
    let iterators: Vec<u32> = iterators.iter().map(id_of).collect();
    assert!(!hooked.is_empty() && !iterators.is_empty(), "{hooks:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    for &id in &iterators {
        while bpftool_has_prog(id) {
            assert!(
                std::time::Instant::now() < deadline,
                "iterator {id} still loaded 2 s after SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    for &id in &hooked {
        assert!(
            bpftool_has_prog(id),
            "program {id} should stay after SIGTERM"
        );
    }
    assert!(
        agent
            .log_text()
            .contains("kernel programs stay attached and counting (pinned)"),
        "{}",
        agent.log_text()
    );
    let out = Command::new(agent_bin())
        .args(["cleanup", "--config"])
        .arg(agent.config_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("removed ") && stdout.contains("its programs detached"),
        "{stdout}"
    );
    assert!(
        agent.pins().layouts().is_empty(),
        "{:?}",
        agent.pins().layouts()
    );
    // Unpinned, nothing holds them: the kernel frees a link's program after an RCU grace
    // period, so the last ids may linger for a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    for id in hooked {
        while bpftool_has_prog(id) {
            assert!(
                std::time::Instant::now() < deadline,
                "program {id} still loaded 2 s after cleanup"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[test]
fn without_pins_sigterm_detaches_everything() {
    if !privileged("without_pins_sigterm_detaches_everything") {
        return;
    }
    let mut agent = Agent::start("[probes]\npin_dir = \"\"\n");
    agent.wait_ready();
    let ids = agent.program_ids();
    assert!(!ids.is_empty(), "{}", agent.log_text());
    assert!(agent.pins().layouts().is_empty());
    let status = agent.terminate();
    assert!(status.success(), "{status}\n{}", agent.log_text());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    for id in ids {
        while bpftool_has_prog(id) {
            assert!(
                std::time::Instant::now() < deadline,
                "program {id} still loaded 2 s after SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    assert!(
        agent
            .log_text()
            .contains("detaching and unloading kernel programs")
    );
}

#[test]
fn configured_capacities_reach_the_kernel_maps() {
    if !privileged("configured_capacities_reach_the_kernel_maps") {
        return;
    }
    let agent = Agent::start("[probes]\nconnections_capacity = 1024\nlisteners_capacity = 64\n");
    agent.wait_ready();
    assert_eq!(
        agent.metric("brokerscope_map_capacity", &[("map", "connections")]),
        Some(1024.0)
    );
    assert_eq!(
        agent.metric("brokerscope_map_capacity", &[("map", "listeners")]),
        Some(64.0)
    );
    // And the kernel agrees: bpftool shows the two tiers of connections adding up to it, a
    // sixteenth in the first as 8 buckets of 8 slots (map names are cut to 15 bytes).
    let show = |name: &str| {
        let out = Command::new("bpftool")
            .args(["map", "show", "name", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let buckets = show("CONNECTIONS");
    assert!(buckets.contains("max_entries 8 "), "{buckets}");
    let slots = show("CONN_STATES");
    assert!(slots.contains("max_entries 64 "), "{slots}");
    let spill = show("CONNECTIONS_SPI");
    assert!(spill.contains("max_entries 960 "), "{spill}");
}

#[test]
fn check_config_names_the_offending_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nrate_limit_rps = 0\n").unwrap();
    let out = Command::new(agent_bin())
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("offending key: server.rate_limit_rps"),
        "{stderr}"
    );

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[server]\nlisten = \"127.0.0.1:9443\"\n").unwrap();
    let out = Command::new(agent_bin())
        .args(["check-config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("listen = \"127.0.0.1:9443\""), "{stdout}");
    assert!(
        stdout.contains("rate_limit_rps = 20"),
        "defaults are printed too: {stdout}"
    );
}

#[test]
fn run_refuses_an_unknown_key_before_loading_anything() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[discovery]\ncmdline_pattern = [\"x\"]\n").unwrap();
    let out = Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("discovery.cmdline_pattern"), "{stderr}");
}

#[test]
fn refuses_to_listen_on_a_discovered_broker_port() {
    if !privileged("refuses_to_listen_on_a_discovered_broker_port") {
        return;
    }
    use brokerscope_tests::{FakeBroker, FakeBrokerSpec, NetNs, Pki, discovery_config};
    let dir = tempfile::tempdir().unwrap();
    let props = dir.path().join("server.properties");
    std::fs::write(&props, "node.id=5\nlisteners=PLAINTEXT://:9092\n").unwrap();
    let ns = NetNs::new();
    let _broker = FakeBroker::start(FakeBrokerSpec {
        netns: Some(&ns),
        ..FakeBrokerSpec::new(&props)
    });
    let pki = Pki::new();
    let config = dir.path().join("agent.toml");
    // Port 9092 is free in our namespace, so only the isolation rule can refuse it.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:9092\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n{}",
            pki.path("tls.crt").display(),
            pki.path("tls.key").display(),
            pki.path("ca.crt").display(),
            discovery_config(dir.path(), "")
        ),
    )
    .unwrap();
    let pins = brokerscope_tests::PinDir::new();
    let out = Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("BROKERSCOPE_PROBES_PIN_DIR", pins.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the agent must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server.listen port 9092 is also a broker data-plane port")
            && stderr.contains("broker 5"),
        "{stderr}"
    );
    // What it attached before refusing stays pinned (a crash-looping pod keeps counting),
    // and it says so; the test's pins go with `pins`.
    assert!(
        stderr.contains("kernel programs stay attached and counting (pinned)"),
        "{stderr}"
    );
    assert_eq!(pins.layouts().len(), 1, "{stderr}");
}

#[test]
fn a_capability_without_any_hook_is_named_missing_and_the_rest_serves() {
    if !privileged("a_capability_without_any_hook_is_named_missing_and_the_rest_serves") {
        return;
    }
    // No kernel of the matrix refuses every form of a capability, so the config refuses all
    // three forms of the TCP state-change hook, as a kernel without them would.
    let dir = tempfile::tempdir().unwrap();
    let pattern = format!(
        r"kafka\.Kafka {}/",
        regex::escape(&dir.path().display().to_string())
    );
    let agent = Agent::start(&format!(
        "[discovery]\ncmdline_patterns = ['{pattern}']\n[probes]\ndisabled_programs = \
         [\"sock_state_btf\", \"sock_state_raw\", \"sock_state\"]\n"
    ));
    agent.wait_ready();
    let (code, body) = agent.get("/ready");
    assert_eq!(code, 200, "degraded, not dead: {body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    let missing = ready["missing"].as_array().expect("a missing list");
    assert_eq!(missing.len(), 1, "{body}");
    let line = missing[0].as_str().unwrap();
    for part in [
        "connections",
        "sock_state_btf: disabled by probes.disabled_programs",
        "sock_state_raw",
        "sock_state:",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    assert!(!agent.attached("sock_state_btf") && !agent.attached("sock_state"));
    // The rest serves: a broker is discovered and its state and CPU are there.
    let props = dir.path().join("server.properties");
    std::fs::write(
        &props,
        format!(
            "node.id=5\nlisteners=PLAINTEXT://127.0.0.1:{}\n",
            brokerscope_tests::free_port()
        ),
    )
    .unwrap();
    let b = brokerscope_tests::FakeBroker::start(brokerscope_tests::FakeBrokerSpec::new(&props));
    brokerscope_tests::eventually(
        "broker 5 running",
        std::time::Duration::from_secs(10),
        || {
            let (code, body) = agent.get("/v1/broker-state/?broker=5");
            (code == 200 && body == r#"{"brokerState":3}"#).then_some(())
        },
    );
    assert!(
        agent
            .metric("brokerscope_cpu_seconds_total", &[("broker", "5")])
            .is_some()
    );
    assert!(agent.attached("sched_switch_btf"));
    drop(b);
}
