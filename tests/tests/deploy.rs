//! The Kubernetes manifests (deploy/), checked offline: every overlay renders, every object
//! validates strictly against Kubernetes 1.30 or its CRD's schema, the alert rules pass promtool
//! and fire as written, the ConfigMap's config is one the agent accepts, and every metric the
//! rules and the dashboard name exists in a live agent's /metrics.
//!
//! Only the last needs root (it runs the agent with a broker); the others run anywhere
//! `cargo xtask setup` has run (kubectl, promtool, the validators' virtualenv).

use std::{io::Write as _, net::TcpStream, path::Path, process::Command, time::Duration};

use brokerscope_tests::{
    Agent, FakeBroker, FakeBrokerSpec, agent_bin, broker_properties,
    deploy::{
        dashboard_queries, exported_names, find, metric_names, objects, overlays, render, validate,
        workspace,
    },
    discovery_config, eventually, fake_request, privileged, wait_broker_running,
};
use serde_json::Value;

/// The Kubernetes version the manifests are validated against: the oldest we support.
const KUBERNETES_VERSION: &str = "1.30.0";

fn write_temp(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

#[test]
fn every_overlay_renders_and_every_object_validates_strictly() {
    let overlays = overlays();
    let names: Vec<String> = overlays
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&"plain".to_string()) && names.contains(&"prometheus-operator".to_string()),
        "overlays: {names:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    for (overlay, name) in overlays.iter().zip(&names) {
        let yaml = render(overlay);
        let objects = objects(&yaml);
        let file = write_temp(dir.path(), &format!("{name}.yaml"), &yaml);
        let (ok, out) = validate(&file, KUBERNETES_VERSION);
        eprintln!("overlay {name}:\n{out}");
        assert!(ok, "overlay {name} does not validate:\n{out}");
        // One verdict per object: none was skipped.
        assert_eq!(
            out.lines().filter(|l| l.starts_with("ok ")).count(),
            objects.len(),
            "{out}"
        );
        for (kind, object) in [
            ("Namespace", "brokerscope"),
            ("ServiceAccount", "brokerscope"),
            ("DaemonSet", "brokerscope"),
            ("ConfigMap", "brokerscope-config"),
            ("NetworkPolicy", "brokerscope"),
            ("Certificate", "brokerscope-server"),
            ("Certificate", "brokerscope-client-prometheus"),
            ("Certificate", "brokerscope-client-cluster-operator"),
        ] {
            find(&objects, kind, object);
        }
        // No RBAC: the agent never calls the API.
        assert!(
            !objects.iter().any(|o| o["kind"]
                .as_str()
                .is_some_and(|k| k.ends_with("Role") || k.ends_with("RoleBinding"))),
            "{name} ships RBAC"
        );
        if name == "prometheus-operator" {
            find(&objects, "PodMonitor", "brokerscope");
            find(&objects, "PrometheusRule", "brokerscope");
            let dashboard = find(&objects, "ConfigMap", "brokerscope-dashboard");
            assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
        }
    }
}

/// The validation can fail: one misspelt or mistyped field per schema family is refused, and
/// named.
#[test]
fn the_validators_refuse_a_misspelt_field_in_each_schema_family() {
    let yaml = render(&workspace().join("deploy/overlays/prometheus-operator"));
    let cases = [
        (
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesytem: true",
            "DaemonSet/brokerscope",
            "readOnlyRootFilesytem",
        ),
        (
            "renewBefore: 24h",
            "renewBefore: 24",
            "Certificate/brokerscope-server",
            "renewBefore",
        ),
        (
            "keySecret:",
            "keySecrett:",
            "PodMonitor/brokerscope",
            "keySecrett",
        ),
        (
            "- name: brokerscope.agent",
            "- nam: brokerscope.agent",
            "PrometheusRule/brokerscope",
            "nam",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (from, to, object, named) in cases {
        assert!(yaml.contains(from), "the rendered overlay has {from:?}");
        let file = write_temp(dir.path(), "bad.yaml", &yaml.replacen(from, to, 1));
        let (ok, out) = validate(&file, KUBERNETES_VERSION);
        assert!(!ok, "{to:?} was accepted:\n{out}");
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("invalid {object}")))
            .unwrap_or_else(|| panic!("{object} not refused for {to:?}:\n{out}"));
        assert!(line.contains(named), "{line}");
        assert_eq!(
            out.lines().filter(|l| l.starts_with("invalid ")).count(),
            1,
            "only {object} is invalid:\n{out}"
        );
    }
}

fn prometheus_rule() -> Value {
    let objects = objects(&render(
        &workspace().join("deploy/overlays/prometheus-operator"),
    ));
    find(&objects, "PrometheusRule", "brokerscope").clone()
}

fn dashboard() -> Value {
    let objects = objects(&render(
        &workspace().join("deploy/overlays/prometheus-operator"),
    ));
    let map = find(&objects, "ConfigMap", "brokerscope-dashboard");
    serde_json::from_str(
        map["data"]["brokerscope.json"]
            .as_str()
            .expect("the dashboard JSON"),
    )
    .expect("the dashboard is JSON")
}

fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool is installed by cargo xtask setup (Debian's prometheus)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_alert_rules_pass_promtool_and_fire_as_written() {
    let rule = prometheus_rule();
    let dir = tempfile::tempdir().unwrap();
    // JSON is YAML: the PrometheusRule's spec is a Prometheus rule file.
    write_temp(dir.path(), "all.yml", &rule["spec"].to_string());
    let (ok, out) = promtool(&["check", "rules", "all.yml"], dir.path());
    eprintln!("{out}");
    assert!(ok, "promtool check rules:\n{out}");
    let alerts: Vec<&str> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{out}"
    );
    for wanted in [
        "BrokerscopeAgentNotReady",
        "BrokerscopeProbeDetached",
        "BrokerscopeCertificateExpiringSoon",
        "KafkaBrokerStuckInRecovery",
        "BrokerscopeMapEvictions",
        "KafkaBrokerRestarted",
    ] {
        assert!(alerts.contains(&wanted), "{wanted} in {alerts:?}");
    }

    // The unit tests compare labels and annotations; annotations are prose, checked above.
    let mut bare = rule["spec"].clone();
    for group in bare["groups"].as_array_mut().unwrap() {
        for r in group["rules"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("annotations");
        }
    }
    write_temp(dir.path(), "rules.yml", &bare.to_string());
    std::fs::copy(
        workspace().join("tests/deploy/rules_test.yml"),
        dir.path().join("rules_test.yml"),
    )
    .unwrap();
    let (ok, out) = promtool(&["test", "rules", "rules_test.yml"], dir.path());
    eprintln!("{out}");
    assert!(ok && out.contains("SUCCESS"), "promtool test rules:\n{out}");
}

/// The ConfigMap's config passes the agent's own `check-config`, and the DaemonSet mounts what
/// it names where it names it.
#[test]
fn the_configmap_config_is_one_the_agent_accepts_and_the_daemonset_mounts_it() {
    let objects = brokerscope_tests::deploy::plain();
    let config_map = find(&objects, "ConfigMap", "brokerscope-config");
    let toml = config_map["data"]["brokerscope.toml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = write_temp(dir.path(), "brokerscope.toml", toml);
    // check-config also reads the TLS files and tries the port, as `run` would: in the pod
    // those are the Secret's files and the pod's own port; here, a test PKI and a free port.
    let pki = brokerscope_tests::Pki::new();
    let out = Command::new(agent_bin())
        .arg("check-config")
        .arg(&file)
        .env("BROKERSCOPE_SERVER_CERT_FILE", pki.path("tls.crt"))
        .env("BROKERSCOPE_SERVER_KEY_FILE", pki.path("tls.key"))
        .env("BROKERSCOPE_SERVER_CLIENT_CA_FILE", pki.path("ca.crt"))
        .env("BROKERSCOPE_SERVER_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run brokerscope check-config");
    assert!(
        out.status.success(),
        "check-config refused the ConfigMap's config: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ds = find(&objects, "DaemonSet", "brokerscope");
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mount_of = |volume: &str| -> String {
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume)
            .unwrap_or_else(|| panic!("no mount of volume {volume}"))["mountPath"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "run",
            "--config",
            &format!("{}/brokerscope.toml", mount_of("config"))
        ]
    );
    let tls = mount_of("tls");
    for key in ["cert_file", "key_file", "client_ca_file"] {
        let line = toml
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} in the ConfigMap"));
        assert!(
            line.contains(&format!("\"{tls}/")),
            "{line} is not under {tls}"
        );
    }
    // The probes present the mounted server certificate to the agent on loopback.
    for probe in ["livenessProbe", "readinessProbe"] {
        let command: Vec<&str> = container[probe]["exec"]["command"]
            .as_array()
            .unwrap_or_else(|| panic!("{probe} is an exec probe"))
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(command[0], container["command"][0], "{probe}");
        assert!(
            command.contains(&format!("--cert={tls}/tls.crt").as_str()),
            "{command:?}"
        );
        assert!(
            command.contains(&"--url=https://127.0.0.1:8443"),
            "{command:?}"
        );
    }
    // The Secret is the server Certificate's.
    let secret = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "tls")
        .unwrap()["secret"]["secretName"]
        .clone();
    assert_eq!(
        find(&objects, "Certificate", "brokerscope-server")["spec"]["secretName"],
        secret
    );
}

/// The names the alert rules and the dashboard query, and those a live agent exports, never
/// drift: an agent with a discovered broker that has served a request exports every one.
#[test]
fn every_metric_the_rules_and_the_dashboard_use_exists_in_a_live_agent() {
    // Checked here, without root, so the test cannot pass by finding no names.
    let mut used: Vec<String> = Vec::new();
    let rule = prometheus_rule();
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            used.extend(metric_names(r["expr"].as_str().unwrap()));
        }
    }
    let queries = dashboard_queries(&dashboard());
    assert!(queries.len() >= 15, "dashboard queries: {queries:?}");
    for q in &queries {
        used.extend(metric_names(q));
    }
    used.sort();
    used.dedup();
    assert!(used.len() >= 20, "names used: {used:?}");
    // `up` is Prometheus's own series for every target; every other name is the agent's.
    used.retain(|n| n != "up");

    if !privileged("every_metric_the_rules_and_the_dashboard_use_exists_in_a_live_agent") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&discovery_config(dir.path(), ""));
    agent.wait_ready();
    let props = broker_properties(dir.path(), "server.properties", "61");
    let broker = FakeBroker::start(FakeBrokerSpec::new(&props));
    wait_broker_running(&agent, "61", broker.pid);
    let port = broker.listeners[0].1;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    fake_request(&mut s, 100, 1000).unwrap();
    s.flush().unwrap();
    drop(s);
    let missing = eventually("the broker's series", Duration::from_secs(10), || {
        let (_, page) = agent.get("/metrics");
        let exported = exported_names(&page);
        let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
        // Per-broker series appear with the broker; allow a scrape or two for them.
        (missing.is_empty()
            || exported.contains("brokerscope_bytes_received_total")
                && exported.contains("brokerscope_connections_closed_total"))
        .then(|| missing.into_iter().cloned().collect::<Vec<String>>())
    });
    assert!(
        missing.is_empty(),
        "the rules or the dashboard use names a live agent does not export: {missing:?}"
    );
    eprintln!("{} names used, all exported: {used:?}", used.len());
}
