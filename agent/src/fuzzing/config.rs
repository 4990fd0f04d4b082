//! The configuration: a TOML file (with `BROKERSCOPE_*` environment overrides) into the
//! validated [`Config`], and the live `PATCH /v1/config` body applied to a running config.

use serde_json::Value;

use crate::{
    config::Config,
    control::config::{LiveConfig, RESTART_KEYS},
};

/// A config file, then optionally `\0` and `NAME=value` environment lines. An accepted config
/// validates, and its effective TOML (what `check-config` prints) loads back to the same.
pub fn config_file(data: &[u8]) {
    let (file, env) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let env: Vec<(String, String)> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let path = super::scratch::scratch("config_file").join("config.toml");
    super::scratch::write(&path, file);
    let config = match Config::load(Some(&path), env) {
        Ok(config) => config,
        Err(e) => {
            // The offending key is named when the error is about one.
            if let Some(key) = e.key() {
                assert!(!e.to_string().is_empty() && e.to_string().contains(key));
            }
            return;
        }
    };
    let errors = config.validate_all();
    assert!(errors.is_empty(), "accepted but invalid: {errors:?}");
    let shown = config.to_toml();
    super::scratch::write(&path, shown.as_bytes());
    match Config::load(Some(&path), Vec::new()) {
        Ok(again) => assert_eq!(again, config, "the effective config:\n{shown}"),
        Err(e) => panic!("the effective config does not load ({e}):\n{shown}"),
    }
}

/// A live config over the defaults, with no discovery and no log subscriber to switch.
fn live() -> LiveConfig {
    LiveConfig::unattached()
}

/// A `PATCH /v1/config` body. Refused: nothing changed. Accepted: the new config validates,
/// no restart key changed, the generation moved iff something did, and the same patch again
/// changes nothing (a merge patch is idempotent).
pub fn config_patch(data: &[u8]) {
    let live = live();
    let before = live.view();
    match live.patch("fuzz", data) {
        Err(_) => {
            assert_eq!(live.view(), before, "a refused patch changed the config");
            assert_eq!(live.generation(), 0);
        }
        Ok(applied) => {
            let now = live.current();
            assert!(now.validate_all().is_empty(), "accepted but invalid");
            assert_eq!(
                live.view(),
                serde_json::to_value(&now).unwrap_or(Value::Null)
            );
            assert_eq!(applied.generation, u64::from(!applied.changed.is_empty()));
            for change in &applied.changed {
                assert!(
                    !RESTART_KEYS.contains(&change.key.as_str()),
                    "{}",
                    change.key
                );
                assert_ne!(change.old, change.new);
                let (section, key) = change.key.split_once('.').expect("a dotted key");
                assert_eq!(live.view()[section][key], change.new);
            }
            match live.patch("fuzz", data) {
                Ok(again) => {
                    assert!(
                        again.changed.is_empty(),
                        "not idempotent: {:?}",
                        again.changed
                    );
                    assert_eq!(again.generation, applied.generation);
                }
                Err(e) => panic!("accepted once, refused the second time: {e}"),
            }
            // The whole effective config as a patch is a no-op.
            let whole = live.view().to_string();
            match live.patch("fuzz", whole.as_bytes()) {
                Ok(again) => assert!(again.changed.is_empty()),
                Err(e) => panic!("the effective config as a patch: {e}"),
            }
        }
    }
}
