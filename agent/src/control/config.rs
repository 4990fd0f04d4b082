//! Live configuration: `GET`/`PATCH /v1/config` and config file reloads share one path.
//!
//! A change is a JSON merge patch (RFC 7386) over the effective configuration, shaped like the
//! TOML sections. It is validated whole (every offending key named) before anything changes,
//! keys that need a restart are refused unless unchanged, and the change is applied to the
//! running parts (server policy, discovery, probes, log filter) under one lock, so concurrent
//! changes are serialized and none is lost. Each change is logged with who, what, old → new,
//! and bumps the config generation.
//!
//! Owns the effective [`Config`]; it never reloads programs nor touches maps itself.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
};

use serde_json::{Map, Value};

use super::logs::LogLevel;
use crate::{
    config::{Config, ConfigError},
    discovery::Discovery,
    locks::Recover as _,
    model::Model,
    policy::ListenerPolicy,
};

/// Keys that only a restart can change: the listening socket, the TLS files (watched by path),
/// and kernel map sizes (fixed at load).
pub const RESTART_KEYS: [&str; 10] = [
    "server.listen",
    "server.cert_file",
    "server.key_file",
    "server.client_ca_file",
    "probes.listeners_capacity",
    "probes.connections_capacity",
    "probes.disabled_programs",
    "probes.pin_dir",
    "probes.listener_release_seconds",
    "log.format",
];

/// Deepest JSON nesting a patch may have (the config is two levels deep).
const MAX_DEPTH: usize = 8;

/// One refused key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    pub key: String,
    pub reason: String,
}

/// Why a change was refused; nothing was applied.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("invalid config: {}", fields.iter().map(|f| format!("{}: {}", f.key, f.reason)).collect::<Vec<_>>().join("; "))]
    Invalid { fields: Vec<FieldError> },
    #[error("config file: {source}")]
    File {
        #[source]
        source: ConfigError,
    },
    #[error("cannot apply `{key}`: {reason}")]
    Apply { key: String, reason: String },
}

impl ChangeError {
    fn field(key: &str, reason: impl Into<String>) -> Self {
        ChangeError::Invalid {
            fields: vec![FieldError {
                key: key.into(),
                reason: reason.into(),
            }],
        }
    }
}

/// One changed key.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Change {
    pub key: String,
    pub old: Value,
    pub new: Value,
}

/// What an accepted change did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Applied {
    pub generation: u64,
    pub changed: Vec<Change>,
}

/// The running parts a change reaches. Discovery is absent in unit tests.
pub struct Targets {
    pub model: Arc<Model>,
    pub server: Arc<ListenerPolicy>,
    pub discovery: Option<Arc<Discovery>>,
    pub log_level: LogLevel,
}

/// The effective configuration and the one way to change it.
pub struct LiveConfig {
    current: Mutex<Config>,
    targets: Targets,
    path: Option<PathBuf>,
}

impl LiveConfig {
    pub fn new(config: Config, path: Option<PathBuf>, targets: Targets) -> Self {
        Self {
            current: Mutex::new(config),
            targets,
            path,
        }
    }

    /// Over the defaults, applied to nothing: no discovery, no log subscriber to switch
    /// (setting the level only checks it). For unit tests and the fuzz targets.
    pub fn unattached() -> Self {
        let config = Config::default();
        let stats = Arc::new(crate::stats::ServerStats::default());
        let server = ListenerPolicy::new(&config.server, stats);
        Self::new(
            config,
            None,
            Targets {
                model: Arc::new(Model::default()),
                server,
                discovery: None,
                log_level: LogLevel::detached(),
            },
        )
    }

    pub fn current(&self) -> Config {
        self.lock().clone()
    }

    pub fn server_stats(&self) -> crate::stats::ServerSnapshot {
        self.targets.server.stats.snapshot()
    }

    pub fn generation(&self) -> u64 {
        self.targets
            .server
            .stats
            .config_generation
            .load(Ordering::Relaxed)
    }

    /// The effective configuration as JSON, shaped like the TOML sections. No key holds a
    /// secret today (key *paths* are shown; file contents never are).
    pub fn view(&self) -> Value {
        to_value(&self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Config> {
        self.current.lock().recover()
    }

    /// Applies a JSON merge patch from `who`. Blocking (discovery rescans /proc): call it from
    /// a blocking context.
    pub fn patch(&self, who: &str, body: &[u8]) -> Result<Applied, ChangeError> {
        let patch: Value = serde_json::from_slice(body)
            .map_err(|e| ChangeError::field("body", format!("not JSON: {e}")))?;
        if !patch.is_object() {
            return Err(ChangeError::field(
                "body",
                "must be a JSON object shaped like the config sections, e.g. {\"server\":{\"access_log\":\"debug\"}}",
            ));
        }
        if depth(&patch) > MAX_DEPTH {
            return Err(ChangeError::field("body", "nested too deeply"));
        }
        let mut current = self.lock();
        let mut merged = to_value(&current);
        merge_patch(&mut merged, &patch);
        let next = parse(&merged, &patch)?;
        self.apply(&mut current, next, who)
    }

    /// Reads the config file again (SIGHUP, or it changed) and applies it like a patch.
    pub fn reload_file(&self) -> Result<Applied, ChangeError> {
        let next = Config::load(self.path.as_deref(), std::env::vars())
            .map_err(|source| ChangeError::File { source })?;
        let mut current = self.lock();
        self.apply(&mut current, next, "config-file")
    }

    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// Validates `next` against `current`, then applies it live. Holds the lock throughout.
    fn apply(&self, current: &mut Config, next: Config, who: &str) -> Result<Applied, ChangeError> {
        let mut fields: Vec<FieldError> = next
            .validate_all()
            .into_iter()
            .map(|e| FieldError {
                key: e.key().unwrap_or("config").to_string(),
                reason: match e {
                    ConfigError::Invalid { reason, .. } => reason,
                    ConfigError::Type { message, .. } => message,
                    other => other.to_string(),
                },
            })
            .collect();
        let changed = diff(&to_value(current), &to_value(&next));
        for change in &changed {
            if RESTART_KEYS.contains(&change.key.as_str()) {
                fields.push(FieldError {
                    key: change.key.clone(),
                    reason: "cannot change while running; restart the agent with the new value"
                        .into(),
                });
            }
        }
        if !fields.is_empty() {
            return Err(ChangeError::Invalid { fields });
        }
        if changed.is_empty() {
            return Ok(Applied {
                generation: self.generation(),
                changed,
            });
        }
        self.apply_live(&next, &changed)?;
        let generation = self
            .targets
            .server
            .stats
            .config_generation
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        // The change lines go out under whichever log filter shows them: a change to a quieter
        // level is still recorded, and so is one to a louder level.
        let log_lines = || {
            for c in &changed {
                tracing::info!(
                    target: "brokerscope::config",
                    who = %who,
                    key = %c.key,
                    old = %c.old,
                    new = %c.new,
                    generation,
                    "config changed"
                );
            }
        };
        let shown_now = tracing::enabled!(target: "brokerscope::config", tracing::Level::INFO);
        if shown_now {
            log_lines();
        }
        // Validated already: parsing cannot fail; a reload error means no subscriber is left.
        if changed.iter().any(|c| c.key == "log.level")
            && let Err(e) = self.targets.log_level.set(&next.log.level)
        {
            tracing::warn!(error = %e, "log.level not applied");
        }
        if !shown_now {
            log_lines();
        }
        *current = next;
        Ok(Applied {
            generation,
            changed,
        })
    }

    /// The only fallible step (a kernel map write) goes first, so a failure leaves everything
    /// as it was. `log.level` is switched by the caller, around the change's log lines.
    fn apply_live(&self, next: &Config, changed: &[Change]) -> Result<(), ChangeError> {
        let t = &self.targets;
        let is = |key: &str| changed.iter().any(|c| c.key == key);
        if is("probes.watch_all_listeners") {
            t.model
                .set_watch_all(next.probes.watch_all_listeners)
                .map_err(|reason| ChangeError::Apply {
                    key: "probes.watch_all_listeners".into(),
                    reason,
                })?;
        }
        let s = &next.server;
        if is("server.rate_limit_rps") || is("server.rate_limit_burst") {
            t.server
                .limiter
                .set_rates(s.rate_limit_rps, s.rate_limit_burst);
        }
        if is("server.access_log") {
            t.server.set_access_log(s.access_log);
        }
        if is("server.pod_listeners") || is("server.pod_listen_port") {
            t.server
                .set_pod_listeners(s.pod_listeners, s.pod_listen_port);
        }
        if is("server.allowed_client_names") {
            t.server.set_allowed_client_names(&s.allowed_client_names);
        }
        if let Some(discovery) = &t.discovery {
            if is("discovery.listener_ports") {
                discovery.set_listener_ports(&next.discovery.listener_ports);
            }
            if is("discovery.cmdline_patterns") {
                // Validated already: compiling cannot fail here.
                if let Err(e) = discovery.set_patterns(&next.discovery.cmdline_patterns) {
                    tracing::warn!(error = %e, "discovery patterns not applied");
                }
                if let Err(e) = discovery.scan_all() {
                    tracing::warn!(error = %e, "rescan after new patterns failed");
                }
            }
        }
        Ok(())
    }
}

fn to_value(config: &Config) -> Value {
    serde_json::to_value(config).unwrap_or(Value::Null)
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// RFC 7386: objects merge key by key, `null` removes (here: back to the default), anything
/// else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Turns the merged JSON into a [`Config`], naming every unknown key and every value of the
/// wrong type (each patched key is checked on its own, so all are reported at once).
fn parse(merged: &Value, patch: &Value) -> Result<Config, ChangeError> {
    let defaults = to_value(&Config::default());
    let mut fields = Vec::new();
    if let Value::Object(sections) = patch {
        for (section, keys) in sections {
            let Some(known) = defaults.get(section) else {
                fields.push(FieldError {
                    key: section.clone(),
                    reason: "unknown section".into(),
                });
                continue;
            };
            match keys {
                Value::Object(keys) => {
                    for (key, value) in keys {
                        let dotted = format!("{section}.{key}");
                        if known.get(key).is_none() {
                            fields.push(FieldError {
                                key: dotted,
                                reason: "unknown key".into(),
                            });
                            continue;
                        }
                        if value.is_null() {
                            continue;
                        }
                        let mut one = defaults.clone();
                        one[section.as_str()][key.as_str()] = value.clone();
                        if let Err(e) = serde_json::from_value::<Config>(one) {
                            fields.push(FieldError {
                                key: dotted,
                                reason: type_reason(&e),
                            });
                        }
                    }
                }
                Value::Null => {}
                _ => fields.push(FieldError {
                    key: section.clone(),
                    reason: "must be an object of keys".into(),
                }),
            }
        }
    }
    if !fields.is_empty() {
        return Err(ChangeError::Invalid { fields });
    }
    serde_path_to_error::deserialize::<_, Config>(merged.clone())
        .map_err(|e| ChangeError::field(&e.path().to_string(), type_reason(e.inner())))
}

/// serde's message without its " at line 1 column 2" tail (meaningless for a patch).
fn type_reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Every leaf key whose value differs, as dotted keys.
pub fn diff(old: &Value, new: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    let (Value::Object(old), Value::Object(new)) = (old, new) else {
        return out;
    };
    for (section, new_keys) in new {
        let Value::Object(new_keys) = new_keys else {
            continue;
        };
        for (key, value) in new_keys {
            let before = old
                .get(section)
                .and_then(|s| s.get(key))
                .cloned()
                .unwrap_or(Value::Null);
            if &before != value {
                out.push(Change {
                    key: format!("{section}.{key}"),
                    old: before,
                    new: value.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::AccessLog;

    fn live() -> LiveConfig {
        LiveConfig::unattached()
    }

    fn keys(e: ChangeError) -> Vec<String> {
        match e {
            ChangeError::Invalid { fields } => fields.into_iter().map(|f| f.key).collect(),
            other => panic!("not a field error: {other}"),
        }
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
        let mut doc = json!({"a": [1]});
        merge_patch(&mut doc, &json!({"a": {"b": 1}}));
        assert_eq!(doc, json!({"a": {"b": 1}}));
    }

    #[test]
    fn a_patch_applies_live_and_bumps_the_generation() {
        let live = live();
        let applied = live
            .patch(
                "cluster-operator",
                br#"{"server":{"access_log":"debug","rate_limit_rps":7}}"#,
            )
            .unwrap();
        assert_eq!(applied.generation, 1);
        assert_eq!(
            applied.changed,
            [
                Change {
                    key: "server.access_log".into(),
                    old: json!("info"),
                    new: json!("debug")
                },
                Change {
                    key: "server.rate_limit_rps".into(),
                    old: json!(20),
                    new: json!(7)
                },
            ]
        );
        assert_eq!(live.targets.server.access_log(), AccessLog::Debug);
        assert_eq!(live.current().server.rate_limit_rps, 7);
        // The same patch again changes nothing and keeps the generation.
        let again = live
            .patch("x", br#"{"server":{"access_log":"debug"}}"#)
            .unwrap();
        assert_eq!((again.generation, again.changed.len()), (1, 0));
        // null puts the default back.
        live.patch("x", br#"{"server":{"rate_limit_rps":null}}"#)
            .unwrap();
        assert_eq!(live.current().server.rate_limit_rps, 20);
        assert_eq!(live.generation(), 2);
    }

    #[test]
    fn every_bad_key_is_named_and_nothing_changes() {
        let live = live();
        let before = live.view();
        let e = live
            .patch(
                "x",
                br#"{"server":{"rate_limit_rps":"fast","colour":"red","rate_limit_burst":0},
                     "discovery":{"cmdline_patterns":["("]},"nope":{}}"#,
            )
            .unwrap_err();
        assert_eq!(keys(e), ["nope", "server.colour", "server.rate_limit_rps"]);
        // Types fine, values not: every invalid value is named.
        let e = live
            .patch(
                "x",
                br#"{"server":{"rate_limit_burst":0,"rate_limit_rps":0},"discovery":{"cmdline_patterns":["("]}}"#,
            )
            .unwrap_err();
        assert_eq!(
            keys(e),
            [
                "server.rate_limit_rps",
                "server.rate_limit_burst",
                "discovery.cmdline_patterns"
            ]
        );
        assert_eq!(keys(live.patch("x", b"not json").unwrap_err()), ["body"]);
        assert_eq!(keys(live.patch("x", b"[1]").unwrap_err()), ["body"]);
        assert_eq!(
            keys(
                live.patch("x", br#"{"server":{"listen":"127.0.0.1:9"}}"#)
                    .unwrap_err()
            ),
            ["server.listen"]
        );
        assert_eq!(
            keys(
                live.patch("x", br#"{"probes":{"connections_capacity":1024}}"#)
                    .unwrap_err()
            ),
            ["probes.connections_capacity"]
        );
        assert_eq!(
            keys(
                live.patch("x", br#"{"log":{"level":"info,,=["}}"#)
                    .unwrap_err()
            ),
            ["log.level"]
        );
        // Unchanged restart keys are fine.
        live.patch("x", br#"{"server":{"listen":"0.0.0.0:8443"}}"#)
            .unwrap();
        assert_eq!(live.view(), before);
        assert_eq!(live.generation(), 0);
    }
}
