use super::*;

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn empty_file_is_all_defaults() {
    let config = Config::from_toml("").unwrap();
    assert_eq!(config, Config::default());
    assert_eq!(config.server.listen, "0.0.0.0:8443");
    assert_eq!(config.server.rate_limit_rps, 20);
    assert_eq!(config.server.rate_limit_burst, 40);
    assert_eq!(config.server.access_log, AccessLog::Info);
    assert_eq!(
        config.discovery.cmdline_patterns,
        vec![r"kafka\.Kafka".to_string()]
    );
}

#[test]
fn interface_example_parses() {
    let text = r#"
[server]
listen = "0.0.0.0:8443"
cert_file = "/etc/brokerscope/tls/tls.crt"
key_file = "/etc/brokerscope/tls/tls.key"
client_ca_file = "/etc/brokerscope/tls/ca.crt"
allowed_client_names = []
rate_limit_rps = 20
rate_limit_burst = 40
access_log = "info"

[discovery]
cmdline_patterns = ['kafka\.Kafka']
listener_ports = []
"#;
    assert_eq!(Config::from_toml(text).unwrap(), Config::default());
}

#[test]
fn unknown_key_is_named() {
    let err = Config::from_toml("[server]\nlisten_port = 1\n").unwrap_err();
    assert_eq!(err.key(), Some("server.listen_port"), "{err}");
    assert!(err.to_string().contains("listen_port"), "{err}");
}

#[test]
fn unknown_section_is_named() {
    let err = Config::from_toml("[serverz]\n").unwrap_err();
    assert!(err.to_string().contains("serverz"), "{err}");
}

#[test]
fn wrong_type_names_the_key() {
    let err = Config::from_toml("[server]\nrate_limit_rps = \"fast\"\n").unwrap_err();
    assert_eq!(err.key(), Some("server.rate_limit_rps"), "{err}");
}

#[test]
fn invalid_values_name_the_key() {
    for (text, key) in [
        ("[server]\nlisten = \"localhost\"\n", "server.listen"),
        ("[server]\nrate_limit_rps = 0\n", "server.rate_limit_rps"),
        (
            "[server]\nrate_limit_burst = 0\n",
            "server.rate_limit_burst",
        ),
        ("[server]\ncert_file = \"\"\n", "server.cert_file"),
        ("[server]\npod_listen_port = 0\n", "server.pod_listen_port"),
        (
            "[server]\npod_listen_port = 9092\n[discovery]\nlistener_ports = [9092]\n",
            "server.pod_listen_port",
        ),
        (
            "[server]\nallowed_client_names = [\" \"]\n",
            "server.allowed_client_names",
        ),
        (
            "[discovery]\ncmdline_patterns = [\"kafka(\"]\n",
            "discovery.cmdline_patterns",
        ),
        (
            "[discovery]\nlistener_ports = [0]\n",
            "discovery.listener_ports",
        ),
        (
            "[probes]\nconnections_capacity = 1\n",
            "probes.connections_capacity",
        ),
        (
            "[probes]\nlisteners_capacity = 4294967295\n",
            "probes.listeners_capacity",
        ),
    ] {
        let err = Config::from_toml(text).unwrap_err();
        assert_eq!(err.key(), Some(key), "{text}: {err}");
    }
}

#[test]
fn access_log_levels() {
    for (text, level) in [
        ("off", AccessLog::Off),
        ("info", AccessLog::Info),
        ("debug", AccessLog::Debug),
    ] {
        let config = Config::from_toml(&format!("[server]\naccess_log = \"{text}\"\n")).unwrap();
        assert_eq!(config.server.access_log, level);
    }
    let err = Config::from_toml("[server]\naccess_log = \"loud\"\n").unwrap_err();
    assert_eq!(err.key(), Some("server.access_log"), "{err}");
}

#[test]
fn out_of_range_port_is_a_type_error() {
    let err = Config::from_toml("[discovery]\nlistener_ports = [70000]\n").unwrap_err();
    assert_eq!(err.key(), Some("discovery.listener_ports[0]"), "{err}");
}

#[test]
fn env_overrides_file_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:1\"\nrate_limit_rps = 3\n",
    )
    .unwrap();
    let config = Config::load(
        Some(&path),
        env(&[
            ("BROKERSCOPE_SERVER_LISTEN", "127.0.0.1:9443"),
            (
                "BROKERSCOPE_SERVER_ALLOWED_CLIENT_NAMES",
                r#"["cluster-operator", "prometheus"]"#,
            ),
            ("BROKERSCOPE_DISCOVERY_LISTENER_PORTS", "[9092, 9093]"),
            ("BROKERSCOPE_PROBES_CONNECTIONS_CAPACITY", "1024"),
            ("PATH", "/usr/bin"),
        ]),
    )
    .unwrap();
    assert_eq!(config.server.listen, "127.0.0.1:9443");
    assert_eq!(
        config.server.rate_limit_rps, 3,
        "file value kept when env is silent"
    );
    assert_eq!(
        config.server.allowed_client_names,
        ["cluster-operator", "prometheus"]
    );
    assert_eq!(config.discovery.listener_ports, [9092, 9093]);
    assert_eq!(config.probes.connections_capacity, 1024);
}

#[test]
fn env_with_unknown_key_in_a_known_section_is_refused() {
    let err = Config::load(None, env(&[("BROKERSCOPE_SERVER_LISTENER", "x")])).unwrap_err();
    assert_eq!(err.key(), Some("server.listener"), "{err}");
}

#[test]
fn env_outside_the_config_sections_is_not_config() {
    // What Kubernetes injects for a Service named brokerscope, and our own test variables.
    let config = Config::load(
        None,
        env(&[
            ("BROKERSCOPE_SERVICE_HOST", "10.0.0.1"),
            ("BROKERSCOPE_PORT_8443_TCP", "tcp://10.0.0.1:8443"),
            ("BROKERSCOPE_TEST_BIN", "/x"),
        ]),
    )
    .unwrap();
    assert_eq!(config, Config::default());
}

#[test]
fn env_bad_value_names_the_key() {
    let err = Config::load(None, env(&[("BROKERSCOPE_SERVER_RATE_LIMIT_RPS", "-5")])).unwrap_err();
    assert_eq!(err.key(), Some("server.rate_limit_rps"), "{err}");
}

#[test]
fn missing_file_and_bad_syntax_are_reported() {
    let err = Config::load(
        Some(std::path::Path::new("/nonexistent/brokerscope.toml")),
        no_env(),
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[server\n").unwrap();
    let err = Config::load(Some(&path), no_env()).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
}

#[test]
fn effective_config_round_trips() {
    let mut config = Config::default();
    config.server.allowed_client_names = vec!["cluster-operator".into()];
    config.discovery.listener_ports = vec![9092];
    let again = Config::from_toml(&config.to_toml()).unwrap();
    assert_eq!(again, config);
}

#[test]
fn listen_port_must_not_be_a_broker_port() {
    let err = Config::from_toml(
        "[server]\nlisten = \"0.0.0.0:9092\"\n[discovery]\nlistener_ports = [9093, 9092]\n",
    )
    .unwrap_err();
    assert_eq!(err.key(), Some("server.listen"), "{err}");
    assert_eq!(
        err.to_string(),
        "config key `server.listen` is invalid: server.listen port 9092 is also a broker \
         data-plane port (from discovery.listener_ports); the control endpoint must listen on a \
         port of its own"
    );
}

#[test]
fn pod_listeners_are_off_by_default_on_8443() {
    let config = Config::from_toml("").unwrap();
    assert!(!config.server.pod_listeners);
    assert_eq!(config.server.pod_listen_port, 8443);
    let config =
        Config::from_toml("[server]\npod_listeners = true\npod_listen_port = 9443\n").unwrap();
    assert!(config.server.pod_listeners);
    assert_eq!(config.server.pod_listen_port, 9443);
}

#[test]
fn lists_and_their_entries_are_bounded() {
    let mut config = Config::default();
    config.discovery.listener_ports = (1..=65).collect();
    config.server.allowed_client_names = vec!["x".repeat(MAX_STRING + 1)];
    let keys: Vec<String> = config
        .validate_all()
        .iter()
        .filter_map(|e| e.key().map(str::to_string))
        .collect();
    assert_eq!(
        keys,
        ["discovery.listener_ports", "server.allowed_client_names"]
    );
    config.discovery.listener_ports.truncate(MAX_LIST);
    config.server.allowed_client_names = vec!["x".repeat(MAX_STRING)];
    assert!(config.validate_all().is_empty());
}

#[test]
fn disabled_programs_must_exist() {
    // Any program may be disabled, the last form of the state-change hook too: the agent then
    // serves without its capability and /ready names it missing.
    let ok = Config::from_toml(
        "[probes]\ndisabled_programs = [\"sock_state_raw\", \"tcp_live\", \"sock_state\"]\n",
    )
    .unwrap();
    assert_eq!(
        ok.probes.disabled_programs,
        ["sock_state_raw", "tcp_live", "sock_state"]
    );
    let err = Config::from_toml("[probes]\ndisabled_programs = [\"nope\"]\n").unwrap_err();
    assert_eq!(err.key(), Some("probes.disabled_programs"), "{err}");
    assert!(err.to_string().contains("is not a program"), "{err}");
}

#[test]
fn node_wide_hooks_are_off_unless_asked_for() {
    assert!(!Config::default().probes.node_wide_hooks);
    let on = Config::from_toml("[probes]\nnode_wide_hooks = true\n").unwrap();
    assert!(on.probes.node_wide_hooks);
}

#[test]
fn a_log_level_with_blanks_before_a_multibyte_target_is_checked_not_a_panic() {
    // Found by the `config_file` fuzz target: tracing-subscriber cut a directive with leading
    // blanks at the offsets of its trimmed form, inside the `é` (a panic in validation).
    let c = Config::from_toml("[log]\nlevel = \"info, xé=debug\"\n").unwrap();
    assert_eq!(c.log.level, "info, xé=debug");
    let e = Config::from_toml("[log]\nlevel = \" é=nonsense\"\n").unwrap_err();
    assert_eq!(e.key(), Some("log.level"));
}

#[test]
fn every_bad_value_is_reported_at_once_with_its_line_in_plain_words() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[server]\nrate_limit_rps = \"fifty\"\nlisten = \"nowhere\"\n\n[probes]\nconnections_capacity = 1\nwatch_all_listeners = \"yes\"\n[log]\nlevel = \"loud\"\n",
    )
    .unwrap();
    let err = Config::load(
        Some(&path),
        env(&[("BROKERSCOPE_SERVER_LISTN", "0.0.0.0:1")]),
    )
    .unwrap_err();
    let text = err.to_string();
    let ConfigError::Several { errors } = &err else {
        panic!("{text}");
    };
    let keys: Vec<&str> = errors.iter().filter_map(ConfigError::key).collect();
    for key in [
        "server.rate_limit_rps",
        "server.listen",
        "server.listn",
        "probes.connections_capacity",
        "probes.watch_all_listeners",
        "log.level",
    ] {
        assert!(keys.contains(&key), "{key} missing: {text}");
    }
    assert_eq!(errors.len(), 6, "{text}");
    let file = path.display().to_string();
    for expected in [
        format!("`server.rate_limit_rps` ({file} line 2): expected a whole number from 0 to 4294967295, got the string \"fifty\""),
        format!("`server.listen` ({file} line 3) is invalid"),
        "`server.listn` (environment variable BROKERSCOPE_SERVER_LISTN): there is no key `listn` here; the keys are listen,".to_string(),
        format!("`probes.connections_capacity` ({file} line 6) is invalid"),
        format!("`probes.watch_all_listeners` ({file} line 7): expected a boolean, got the string \"yes\""),
        format!("`log.level` ({file} line 9) is invalid"),
    ] {
        assert!(text.contains(&expected), "{expected}\nnot in\n{text}");
    }
    assert!(
        text.starts_with("6 problems in the configuration:\n"),
        "{text}"
    );
}
