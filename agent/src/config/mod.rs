//! The agent's configuration: one typed struct, TOML on disk, `BROKERSCOPE_<SECTION>_<KEY>`
//! environment overrides, and validation that names the offending key.
//!
//! Owns parsing and validation only; it never opens sockets or files other than the config file.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use brokerscope_common::{sockets, telemetry::Program};

/// The whole configuration. Every key has a default, so an empty file (or none) is valid.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub discovery: DiscoveryConfig,
    pub probes: ProbesConfig,
    pub log: LogConfig,
}

/// `[log]`: the agent's own log (beyond docs/interface.md; live-switchable). `RUST_LOG`, when set,
/// wins at startup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A level (`error`, `warn`, `info`, `debug`, `trace`) or a `tracing` filter directive.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        // What an operator reads: startup steps, brokers found and lost, warnings.
        Self {
            level: "info".into(),
        }
    }
}

/// `[server]`: the mTLS endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: PathBuf,
    pub allowed_client_names: Vec<String>,
    pub rate_limit_rps: u32,
    pub rate_limit_burst: u32,
    pub access_log: AccessLog,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            // All interfaces: the operator reaches the pod IP; the port is kept apart from the
            // brokers' data-plane ports.
            listen: "0.0.0.0:8443".into(),
            // Where a Kubernetes Secret volume of type kubernetes.io/tls is usually mounted.
            cert_file: "/etc/brokerscope/tls/tls.crt".into(),
            key_file: "/etc/brokerscope/tls/tls.key".into(),
            // A PEM bundle: several CAs are allowed so a CA can be rotated.
            client_ca_file: "/etc/brokerscope/tls/ca.crt".into(),
            // Empty: any client certificate that chains to the CA is allowed.
            allowed_client_names: Vec::new(),
            // Per client identity; Prometheus and the operator need a request every few seconds.
            rate_limit_rps: 20,
            rate_limit_burst: 40,
            // One line per request.
            access_log: AccessLog::Info,
        }
    }
}

/// `server.access_log`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    Off,
    Info,
    Debug,
}

/// `[discovery]`: how brokers are found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    pub cmdline_patterns: Vec<String>,
    pub listener_ports: Vec<u16>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            // The main class of every Kafka broker JVM (ZooKeeper and KRaft modes alike).
            cmdline_patterns: vec![r"kafka\.Kafka".into()],
            // None: listeners are read from each broker's server.properties.
            listener_ports: Vec::new(),
        }
    }
}

/// `[probes]`: kernel map capacities (not in docs/interface.md's minimal set; added so memory is
/// bounded by configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbesConfig {
    pub listeners_capacity: u32,
    pub connections_capacity: u32,
    pub watch_all_listeners: bool,
    pub disabled_programs: Vec<String>,
    pub node_wide_hooks: bool,
    pub pin_dir: PathBuf,
    pub listener_release_seconds: u64,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        Self {
            // (network namespace, port) pairs that ever accepted a connection.
            listeners_capacity: sockets::LISTENERS_CAPACITY,
            // Connections accepted and not yet closed, node-wide.
            connections_capacity: sockets::CONNECTIONS_CAPACITY,
            // Only brokers' listeners. `true` counts every TCP listener on the node by
            // (netns, port): a debugging aid, it can fill the maps with non-broker traffic.
            watch_all_listeners: false,
            // Every program this kernel takes. Naming one here leaves its capability to its
            // fallback, as if the kernel had refused it.
            disabled_programs: Vec::new(),
            // No hook whose mere attachment slows processes other than the brokers: syscall
            // tracepoints put every syscall of every task on the node through the kernel's
            // slow path (+17-21% per syscall measured). `true` allows them for deeper
            // debugging: fsync on filesystems other than ext4/xfs/btrfs, and file opens during
            // a broker's log recovery.
            node_wide_hooks: false,
            // Maps and links pinned here (a directory per layout) keep counting while the
            // agent is down and are adopted by the next one; empty: nothing pinned, every
            // start counts from zero.
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            // A stopped broker's listeners keep their counters and series this long (time for
            // Prometheus's last scrapes), then release both.
            listener_release_seconds: 300,
        }
    }
}

/// Where the kernel maps and links are pinned by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/brokerscope";
/// Longest `probes.listener_release_seconds`: a day.
pub const MAX_LISTENER_RELEASE_SECONDS: u64 = 86_400;

impl ProbesConfig {
    /// Most records one iterator run may return: every tracked connection and listener.
    pub fn max_live_records(&self) -> usize {
        self.connections_capacity as usize + self.listeners_capacity as usize
    }
}

/// Most entries of a list key (patterns, names, ports): config, not data.
pub const MAX_LIST: usize = 64;
/// Longest pattern or client name, in bytes.
pub const MAX_STRING: usize = 1024;

/// The sections the environment may override.
const SECTIONS: [&str; 4] = ["server", "discovery", "probes", "log"];
const ENV_PREFIX: &str = "BROKERSCOPE_";

/// Why a configuration was refused. `key` is the dotted path of the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Type { key: String, message: String },
    #[error("config key `{key}` is invalid: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    /// The dotted key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Type { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }

    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl Config {
    /// Loads the file (if any), applies environment overrides from `env`, and validates.
    pub fn load(
        path: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: path.into(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, env)?;
        Config::from_table(table)
    }

    /// Parses a TOML text (no environment), validating it.
    #[cfg(test)]
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Syntax {
                path: "<inline>".into(),
                message: e.to_string(),
            })?;
        Config::from_table(table)
    }

    fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                ConfigError::Type {
                    key: e.path().to_string(),
                    message: e.into_inner().to_string(),
                }
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; the first offending key is named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.validate_all().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Checks every value and names every offending key (live config answers them all).
    pub fn validate_all(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let s = &self.server;
        let listen = s.listen_addr().map_err(|e| errors.push(e)).ok();
        for (key, path) in [
            ("server.cert_file", &s.cert_file),
            ("server.key_file", &s.key_file),
            ("server.client_ca_file", &s.client_ca_file),
        ] {
            if path.as_os_str().is_empty() {
                errors.push(ConfigError::invalid(key, "must not be empty"));
            }
        }
        if s.allowed_client_names.iter().any(|n| n.trim().is_empty()) {
            errors.push(ConfigError::invalid(
                "server.allowed_client_names",
                "names must not be empty",
            ));
        }
        if !(1..=100_000).contains(&s.rate_limit_rps) {
            errors.push(ConfigError::invalid(
                "server.rate_limit_rps",
                "must be 1..=100000",
            ));
        }
        if s.rate_limit_burst < 1 || s.rate_limit_burst > 1_000_000 {
            errors.push(ConfigError::invalid(
                "server.rate_limit_burst",
                "must be 1..=1000000",
            ));
        }
        for (key, len, max) in [
            (
                "server.allowed_client_names",
                s.allowed_client_names.len(),
                MAX_LIST,
            ),
            (
                "discovery.cmdline_patterns",
                self.discovery.cmdline_patterns.len(),
                MAX_LIST,
            ),
            (
                "discovery.listener_ports",
                self.discovery.listener_ports.len(),
                MAX_LIST,
            ),
        ] {
            if len > max {
                errors.push(ConfigError::invalid(
                    key,
                    format!("{len} entries; at most {max}"),
                ));
            }
        }
        for (key, list) in [
            ("server.allowed_client_names", &s.allowed_client_names),
            (
                "discovery.cmdline_patterns",
                &self.discovery.cmdline_patterns,
            ),
        ] {
            if list.iter().any(|v| v.len() > MAX_STRING) {
                errors.push(ConfigError::invalid(
                    key,
                    format!("entries are at most {MAX_STRING} bytes"),
                ));
            }
        }
        if let Some(e) = self
            .discovery
            .cmdline_patterns
            .iter()
            .take(MAX_LIST)
            .find_map(|pattern| {
                regex::Regex::new(pattern).err().map(|e| {
                    ConfigError::invalid(
                        "discovery.cmdline_patterns",
                        format!("`{pattern}` is not a valid regex: {e}"),
                    )
                })
            })
        {
            errors.push(e);
        }
        if self.discovery.listener_ports.contains(&0) {
            errors.push(ConfigError::invalid(
                "discovery.listener_ports",
                "port 0 is not a port",
            ));
        }
        // The control endpoint never shares a port with a broker's data plane.
        if let Some(listen) = listen
            && let Err(e) = crate::server::isolation::check_isolation(
                listen,
                self.discovery.listener_ports.iter().copied(),
                "discovery.listener_ports",
            )
        {
            errors.push(ConfigError::invalid("server.listen", e.to_string()));
        }
        for (key, value) in [
            ("probes.listeners_capacity", self.probes.listeners_capacity),
            (
                "probes.connections_capacity",
                self.probes.connections_capacity,
            ),
        ] {
            if let Err(e) = sockets::checked_capacity(value) {
                errors.push(ConfigError::invalid(
                    key,
                    format!(
                        "{} is outside {}..={}",
                        e.requested,
                        sockets::MIN_CAPACITY,
                        sockets::MAX_CAPACITY
                    ),
                ));
            }
        }
        if self.probes.listener_release_seconds > MAX_LISTENER_RELEASE_SECONDS {
            errors.push(ConfigError::invalid(
                "probes.listener_release_seconds",
                format!(
                    "{} is more than a day ({MAX_LISTENER_RELEASE_SECONDS})",
                    self.probes.listener_release_seconds
                ),
            ));
        }
        let pin_dir = &self.probes.pin_dir;
        if !pin_dir.as_os_str().is_empty()
            && (!pin_dir.is_absolute()
                || pin_dir
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir)))
        {
            errors.push(ConfigError::invalid(
                "probes.pin_dir",
                format!(
                    "`{}` is not an absolute path without `..` (or empty: pin nothing)",
                    pin_dir.display()
                ),
            ));
        }
        for name in &self.probes.disabled_programs {
            if !Program::ALL.iter().any(|p| p.name() == name) {
                errors.push(ConfigError::invalid(
                    "probes.disabled_programs",
                    format!(
                        "`{name}` is not a program; programs: {}",
                        Program::ALL.map(Program::name).join(", ")
                    ),
                ));
            }
        }
        if let Err(e) = crate::control::logs::parse_filter(&self.log.level) {
            errors.push(ConfigError::invalid(
                "log.level",
                format!(
                    "`{}` is not a level or filter such as `info` or `info,brokerscope=debug`: {e}",
                    self.log.level
                ),
            ));
        }
        errors
    }

    /// The effective configuration as TOML, for `check-config` and diagnostics.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

impl ServerConfig {
    /// `server.listen` as a socket address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| {
            ConfigError::invalid(
                "server.listen",
                format!(
                    "`{}` is not an address:port such as 0.0.0.0:8443",
                    self.listen
                ),
            )
        })
    }
}

/// Applies `BROKERSCOPE_<SECTION>_<KEY>=value` overrides. The value is read as a TOML value
/// (`5`, `true`, `["a", "b"]`) and, when it is not one, as a plain string (`0.0.0.0:8443`).
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let overrides: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    for (var, raw) in overrides {
        let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        // Only variables of a known section are config: Kubernetes injects
        // BROKERSCOPE_SERVICE_HOST, BROKERSCOPE_PORT_8443_TCP, ... for a Service of that name.
        // A known section with an unknown key is still an error (deserialization names it).
        let Some((section, key)) = SECTIONS.iter().find_map(|section| {
            rest.strip_prefix(section)
                .and_then(|r| r.strip_prefix('_'))
                .filter(|k| !k.is_empty())
                .map(|k| (*section, k.to_string()))
        }) else {
            continue;
        };
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        let section_table = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match section_table {
            toml::Value::Table(t) => {
                t.insert(key, value);
            }
            _ => {
                return Err(ConfigError::invalid(section, "must be a table"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
