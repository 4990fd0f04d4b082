//! The fuzz targets' door into the agent's parsers (fuzz/, docs/fuzzing.md). Not an API.
//!
//! Each function takes the fuzzer's bytes, drives one parser the agent runs on untrusted input
//! and asserts what must hold beyond "no panic": round trips (properties, listeners, config),
//! values planted in generated input come back out (/proc lines whose process-chosen parts are
//! fuzzed, certificates made from fuzzed names), idempotence (the config patch) and "a malformed
//! request is a 4xx, never a 5xx" (HTTP). A failed assertion is a panic: the fuzzer's crash.
//!
//! The same functions replay the seed corpus (fuzz/seeds/) and every crash kept under
//! fuzz/regressions/ in `cargo test` (see the tests below), so they run on stable without
//! cargo-fuzz too.

mod config;
mod discovery;
mod http;
mod identity;
mod procfs;
mod scratch;

pub use self::{
    config::{config_file, config_patch},
    discovery::{cmdline, listeners, properties},
    http::http,
    identity::identity,
    procfs::proc,
};

/// A fuzz target: the fuzzer's bytes in, a panic when an assertion fails.
pub type Target = fn(&[u8]);

/// Every target, by the name of its fuzz/fuzz_targets/ file.
pub const TARGETS: [(&str, Target); 8] = [
    ("properties", properties),
    ("listeners", listeners),
    ("cmdline", cmdline),
    ("config_file", config_file),
    ("config_patch", config_patch),
    ("proc", proc),
    ("identity", identity),
    ("http", http),
];

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::TARGETS;

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        out.retain(|p| p.is_file());
        out.sort();
        out
    }

    /// Every seed and every kept crash input, through its target's assertions.
    fn replay(name: &str) {
        let (_, target) = TARGETS
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a known target");
        let seeds = files(&fuzz_dir().join("seeds").join(name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name} has no seed");
        for path in seeds
            .iter()
            .chain(&files(&fuzz_dir().join("regressions").join(name)))
        {
            let data = std::fs::read(path).unwrap();
            let result = std::panic::catch_unwind(|| target(&data));
            assert!(result.is_ok(), "{} fails its target", path.display());
        }
    }

    #[test]
    fn every_target_has_a_fuzz_target_file() {
        for (name, _) in TARGETS {
            let file = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
            assert!(file.exists(), "{} is missing", file.display());
        }
    }

    #[test]
    fn seeds_and_regressions_replay_properties() {
        replay("properties");
    }

    #[test]
    fn seeds_and_regressions_replay_listeners() {
        replay("listeners");
    }

    #[test]
    fn seeds_and_regressions_replay_cmdline() {
        replay("cmdline");
    }

    #[test]
    fn seeds_and_regressions_replay_config_file() {
        replay("config_file");
    }

    #[test]
    fn seeds_and_regressions_replay_config_patch() {
        replay("config_patch");
    }

    #[test]
    fn seeds_and_regressions_replay_proc() {
        replay("proc");
    }

    #[test]
    fn seeds_and_regressions_replay_identity() {
        replay("identity");
    }

    #[test]
    fn seeds_and_regressions_replay_http() {
        replay("http");
    }
}
