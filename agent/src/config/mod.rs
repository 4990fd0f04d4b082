//! The agent's configuration: one typed struct, TOML on disk, `BROKERSCOPE_<SECTION>_<KEY>`
//! environment overrides, and validation that names the offending key.
//!
//! Owns parsing and validation only; it never opens sockets or files other than the config file.

pub mod isolation;
mod log_filter;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use brokerscope_common::{sockets, telemetry::Program};

pub use log_filter::parse_filter;

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
    /// How lines are written to stderr (restart to change).
    pub format: LogFormat,
}

/// `log.format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// For people: time, level, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line for log shippers: `timestamp`, `level`, `target`, `fields`
    /// (with `message`), and `span`/`spans` where there are spans.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        // What an operator reads: startup steps, brokers found and lost, warnings.
        Self {
            level: "info".into(),
            format: LogFormat::Text,
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
    pub pod_listeners: bool,
    pub pod_listen_port: u16,
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
            // Off: only the node listener. On: also `pod_listen_port` inside each broker pod's
            // own network namespace, serving that broker's Strimzi state (server::pods).
            pod_listeners: false,
            // Where Strimzi's Cluster Operator asks a broker pod for its state.
            pod_listen_port: 8443,
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
    #[error("config key `{key}`{}: {message}", at_text(at))]
    Type {
        key: String,
        message: String,
        /// Where the value came from (file line, environment variable), when known.
        at: Option<String>,
    },
    #[error("config key `{key}`{} is invalid: {reason}", at_text(at))]
    Invalid {
        key: String,
        reason: String,
        at: Option<String>,
    },
    #[error(
        "{} problems in the configuration:\n{}",
        errors.len(),
        errors.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n")
    )]
    Several { errors: Vec<ConfigError> },
}

fn at_text(at: &Option<String>) -> String {
    at.as_ref().map(|a| format!(" ({a})")).unwrap_or_default()
}

/// Where the values of a loaded configuration came from, to name them in errors.
#[derive(Default)]
struct Sources {
    /// The file and its text.
    file: Option<(PathBuf, String)>,
    /// Dotted key → the environment variable that set it.
    env: BTreeMap<String, String>,
}

impl Sources {
    fn of(&self, key: &str) -> Option<String> {
        if let Some(var) = self.env.get(key) {
            return Some(format!("environment variable {var}"));
        }
        let (path, text) = self.file.as_ref()?;
        let (section, name) = key.split_once('.')?;
        let mut current = "";
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(header) = line.strip_prefix('[') {
                current = header.split(']').next().unwrap_or("").trim();
                continue;
            }
            let is_key = line
                .strip_prefix(name)
                .is_some_and(|rest| rest.trim_start().starts_with('='));
            if current == section && is_key {
                return Some(format!("{} line {}", path.display(), i + 1));
            }
        }
        None
    }

    /// `e` with where its key's value came from.
    fn locate(&self, mut e: ConfigError) -> ConfigError {
        if let ConfigError::Type { key, at, .. } | ConfigError::Invalid { key, at, .. } = &mut e
            && at.is_none()
        {
            *at = self.of(key);
        }
        e
    }
}

/// A serde message in plain words: `invalid type: string "fifty", expected u32` becomes
/// `expected a whole number from 0 to 4294967295, got the string "fifty"`.
fn plain(message: &str) -> String {
    // The TOML deserializer adds lines naming the key, which the error names already.
    let message = message.lines().next().unwrap_or(message).trim();
    let expected = |what: &str| match what.trim() {
        "u16" => "a whole number from 0 to 65535".to_string(),
        "u32" => "a whole number from 0 to 4294967295".to_string(),
        "u64" => "a whole number from 0".to_string(),
        "a sequence" => "a list, such as [\"a\", \"b\"]".to_string(),
        other if other.starts_with("struct ") => "a table".to_string(),
        other => other.to_string(),
    };
    let got = |what: &str| {
        what.replacen("string ", "the string ", 1)
            .replacen("integer ", "the number ", 1)
            .replace('`', "")
    };
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((what, wanted)) = message
            .strip_prefix(prefix)
            .and_then(|r| r.rsplit_once(", expected "))
        {
            return format!("expected {}, got {}", expected(wanted), got(what));
        }
    }
    if let Some((field, keys)) = message
        .strip_prefix("unknown field `")
        .and_then(|r| r.split_once("`, expected "))
    {
        let keys = keys
            .strip_prefix("one of ")
            .unwrap_or(keys)
            .replace('`', "");
        return format!("there is no key `{field}` here; the keys are {keys}");
    }
    message.to_string()
}

impl ConfigError {
    /// The dotted key the error is about (the first one's, of several), when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Type { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Several { errors } => errors.first().and_then(ConfigError::key),
            _ => None,
        }
    }

    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
            at: None,
        }
    }

    /// One error, or all of them.
    fn all(mut errors: Vec<ConfigError>) -> Result<(), ConfigError> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Several { errors }),
        }
    }
}

impl Config {
    /// Loads the file (if any), applies environment overrides from `env`, and validates.
    pub fn load(
        path: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut sources = Sources::default();
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                let table = text
                    .parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: path.into(),
                        message: e.to_string(),
                    })?;
                sources.file = Some((path.into(), text));
                table
            }
            None => toml::Table::new(),
        };
        sources.env = apply_env(&mut table, env)?;
        Config::from_table_at(table, &sources)
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

    #[cfg(test)]
    fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
        Config::from_table_at(table, &Sources::default())
    }

    /// Every key checked on its own (its type, whether it exists), then the whole: every
    /// error at once, each with where its value came from.
    fn from_table_at(table: toml::Table, sources: &Sources) -> Result<Config, ConfigError> {
        let deserialize = |t: toml::Table| {
            serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(t)).map_err(|e| {
                ConfigError::Type {
                    key: e.path().to_string(),
                    message: plain(&e.into_inner().to_string()),
                    at: None,
                }
            })
        };
        let mut errors = Vec::new();
        let mut good = toml::Table::new();
        for (section, value) in table {
            let toml::Value::Table(keys) = value else {
                let mut one = toml::Table::new();
                one.insert(section.clone(), value);
                errors.extend(deserialize(one).err());
                continue;
            };
            let mut kept = toml::Table::new();
            for (key, value) in keys {
                let mut inner = toml::Table::new();
                inner.insert(key.clone(), value.clone());
                let mut one = toml::Table::new();
                one.insert(section.clone(), toml::Value::Table(inner));
                match deserialize(one) {
                    Ok(_) => {
                        kept.insert(key, value);
                    }
                    // An unknown section: said once, not once per key.
                    Err(e) if e.key() == Some(section.as_str()) => {
                        errors.push(e);
                        break;
                    }
                    Err(e) => errors.push(e),
                }
            }
            good.insert(section, toml::Value::Table(kept));
        }
        let config = deserialize(good)?;
        let typed: Vec<String> = errors
            .iter()
            .filter_map(|e| e.key().map(str::to_string))
            .collect();
        // The keys refused above are at their defaults here: their value errors are moot.
        errors.extend(
            config
                .validate_all()
                .into_iter()
                .filter(|e| e.key().is_none_or(|k| !typed.iter().any(|t| t == k))),
        );
        ConfigError::all(errors.into_iter().map(|e| sources.locate(e)).collect())?;
        Ok(config)
    }

    /// Checks every value and names every offending key (live config answers them all).
    pub fn validate_all(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let listen = self.server.listen_addr().map_err(|e| errors.push(e)).ok();
        self.validate_server(&mut errors);
        self.validate_lists(&mut errors);
        self.validate_discovery(listen, &mut errors);
        self.validate_probes(&mut errors);
        if let Err(e) = parse_filter(&self.log.level) {
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

    /// The server section's own values.
    fn validate_server(&self, errors: &mut Vec<ConfigError>) {
        let s = &self.server;
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
        if s.pod_listen_port == 0 {
            errors.push(ConfigError::invalid(
                "server.pod_listen_port",
                "must be 1..=65535 (the operator dials a fixed port)",
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
    }

    /// Lengths of the lists and of their entries.
    fn validate_lists(&self, errors: &mut Vec<ConfigError>) {
        let s = &self.server;
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
    }

    /// Discovery's patterns and ports, and the ports the endpoint must keep apart from them
    /// (`listen`: `server.listen`, when it parsed).
    fn validate_discovery(&self, listen: Option<SocketAddr>, errors: &mut Vec<ConfigError>) {
        let s = &self.server;
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
            && let Err(e) = isolation::check_isolation(
                listen,
                self.discovery.listener_ports.iter().copied(),
                "discovery.listener_ports",
            )
        {
            errors.push(ConfigError::invalid("server.listen", e.to_string()));
        }
        // Nor do the pod listeners (a broker's own port there would only be found taken).
        if s.pod_listen_port != 0 && self.discovery.listener_ports.contains(&s.pod_listen_port) {
            errors.push(ConfigError::invalid(
                "server.pod_listen_port",
                format!(
                    "port {} is also a broker data-plane port (from discovery.listener_ports)",
                    s.pod_listen_port
                ),
            ));
        }
    }

    /// The probes section: map sizes, release time, pin directory, program names.
    fn validate_probes(&self, errors: &mut Vec<ConfigError>) {
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
/// Applies the `BROKERSCOPE_<SECTION>_<KEY>` variables; which variable set each dotted key.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut set = BTreeMap::new();
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
                set.insert(format!("{section}.{key}"), var.clone());
                t.insert(key, value);
            }
            _ => {
                return Err(ConfigError::invalid(section, "must be a table"));
            }
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests;
