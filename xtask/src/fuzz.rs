//! `cargo xtask fuzz [TARGET] [--seconds N]`: builds the cargo-fuzz targets (fuzz/) once, then
//! runs each for a bounded time, failing on any crash with the crashing input's path.
//!
//! Corpus layout (docs/fuzzing.md): `fuzz/seeds/<target>/` (in git, read-only to the fuzzer),
//! `fuzz/regressions/<target>/` (kept crash inputs, in git), `fuzz/corpus/<target>/` (what the
//! fuzzer learns, kept between local runs, git-ignored) and `fuzz/artifacts/<target>/` (crash
//! inputs, git-ignored). The built binaries are run directly (libFuzzer's own flags); each
//! run's output goes to `target/fuzz-logs/<target>.log`: only a summary line, and a crash's
//! report, are printed.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{Totals, run},
    setup,
};

/// Seconds each target runs for by hand (`cargo xtask fuzz`).
pub const DEFAULT_SECONDS: u64 = 30;
/// Seconds each target runs for in `cargo xtask test`: 8 targets x 15 s plus the build (about
/// 2 minutes from scratch) keep the fuzzing part of CI near 4 minutes on a 2-core machine.
pub const TEST_SECONDS: u64 = 15;
/// Longest one input may run before libFuzzer reports it as a hang (a crash).
const INPUT_TIMEOUT_SECS: u64 = 10;

#[derive(clap::Args)]
pub struct Args {
    /// Only this target (a file name of fuzz/fuzz_targets/ without `.rs`); every target when
    /// absent.
    target: Option<String>,
    /// How long each target runs.
    #[arg(long, default_value_t = DEFAULT_SECONDS)]
    seconds: u64,
    /// Build with AddressSanitizer (slower to build and to run; for long runs).
    #[arg(long)]
    asan: bool,
}

/// `cargo xtask fuzz`.
pub fn main(root: &Path, args: Args) -> anyhow::Result<()> {
    setup::ensure(setup::Needs::Fuzz)?;
    let all = targets(root)?;
    let chosen: Vec<String> = match &args.target {
        Some(t) if all.contains(t) => vec![t.clone()],
        Some(t) => bail!("no fuzz target `{t}`; targets: {}", all.join(", ")),
        None => all,
    };
    let mut totals = Totals::default();
    run_targets(root, &chosen, args.seconds, args.asan, &mut totals)
}

/// The fuzz targets a `cargo xtask test` filter selects: every target when there is no filter
/// or the filter names fuzzing itself (`fuzz`, `fuzzing::tests`); else those whose name
/// contains it (`cargo xtask test properties` fuzzes the properties parser).
pub fn selected(root: &Path, filter: Option<&str>) -> anyhow::Result<Vec<String>> {
    let all = targets(root)?;
    Ok(match filter {
        None => all,
        Some(f) if f.contains("fuzz") => all,
        Some(f) => all.into_iter().filter(|t| t.contains(f)).collect(),
    })
}

/// Every fuzz target: the files of fuzz/fuzz_targets/, sorted.
fn targets(root: &Path) -> anyhow::Result<Vec<String>> {
    let dir = root.join("fuzz/fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".rs")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// How the targets are built. cargo-fuzz's default (release, one codegen unit, thin LTO from
/// the workspace profile, AddressSanitizer) took 8 minutes from scratch on the 2-core CI
/// machine; the dev profile at opt-level 1 with no sanitizer builds in about 2, runs 3-4 times
/// faster than with AddressSanitizer, and keeps what finds bugs in safe Rust: debug assertions,
/// overflow checks and the fuzzer's coverage (docs/fuzzing.md). `--asan` builds with
/// AddressSanitizer, into a target directory of its own.
struct Build {
    asan: bool,
    /// The host triple: cargo-fuzz builds for it.
    host: String,
}

impl Build {
    fn new(asan: bool) -> anyhow::Result<Self> {
        let version = crate::cmd::output(Command::new("rustc").args(["+nightly", "-vV"]))?;
        let host = version
            .lines()
            .find_map(|l| l.strip_prefix("host: "))
            .context("`rustc +nightly -vV` names no host")?
            .trim()
            .to_string();
        Ok(Self { asan, host })
    }

    fn target_dir(&self, root: &Path) -> PathBuf {
        let base = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        base.join(if self.asan { "fuzz-asan" } else { "fuzz" })
    }

    /// The built target's binary (cargo-fuzz builds for the host triple).
    fn binary(&self, root: &Path, target: &str) -> PathBuf {
        self.target_dir(root)
            .join(&self.host)
            .join("debug")
            .join(target)
    }

    fn command(&self, root: &Path, targets: &[String]) -> Command {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root)
            .args(["+nightly", "fuzz", "build", "--fuzz-dir", "fuzz", "--dev"])
            .args(["--sanitizer", if self.asan { "address" } else { "none" }])
            .arg("--target-dir")
            .arg(self.target_dir(root))
            .env("CARGO_PROFILE_DEV_OPT_LEVEL", "1")
            .env("CARGO_PROFILE_DEV_DEBUG", "0")
            .env("CARGO_INCREMENTAL", "0")
            // A stray RUSTFLAGS would be appended to cargo-fuzz's own flags.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        if let [one] = targets {
            cmd.arg(one);
        }
        cmd
    }
}

/// Builds every target once, then runs each for `seconds`; adds one passed or failed test per
/// target to `totals`. Every target runs even after a crash; the crashes fail the whole.
pub fn run_targets(
    root: &Path,
    targets: &[String],
    seconds: u64,
    asan: bool,
    totals: &mut Totals,
) -> anyhow::Result<()> {
    if targets.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let build = Build::new(asan)?;
    run(&mut build.command(root, targets)).context("building the fuzz targets")?;
    println!(
        "fuzz: built {} target(s) in {:.0} s",
        targets.len(),
        started.elapsed().as_secs_f64()
    );

    let logs = root.join("target/fuzz-logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut crashed = Vec::new();
    for target in targets {
        let binary = build.binary(root, target);
        match run_one(root, &binary, target, seconds, &logs)? {
            Outcome::Clean { execs, secs } => {
                totals.passed += 1;
                println!("fuzz {target}: ok, {execs} runs in {secs:.0} s, no crash");
            }
            Outcome::Crashed { inputs, log } => {
                totals.failed += 1;
                println!("fuzz {target}: FAILED (log {})", log.display());
                print_tail(&log, 60);
                for input in &inputs {
                    println!("fuzz {target}: crashing input {}", input.display());
                    println!("  reproduce: {} {}", binary.display(), input.display());
                }
                println!(
                    "  keep it: copy it (minimized: `{} -minimize_crash=1 -runs=10000 INPUT`) to \
                     fuzz/regressions/{target}/, where `cargo test -p brokerscope fuzzing` replays it",
                    binary.display()
                );
                if inputs.is_empty() {
                    println!("fuzz {target}: no input was written; see the log");
                }
                crashed.push(target.clone());
            }
        }
    }
    println!(
        "fuzz: {} target(s) in {:.0} s",
        targets.len(),
        started.elapsed().as_secs_f64()
    );
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {} (inputs under fuzz/artifacts/)",
            crashed.join(", ")
        );
    }
    Ok(())
}

enum Outcome {
    Clean { execs: u64, secs: f64 },
    Crashed { inputs: Vec<PathBuf>, log: PathBuf },
}

fn run_one(
    root: &Path,
    binary: &Path,
    target: &str,
    seconds: u64,
    logs: &Path,
) -> anyhow::Result<Outcome> {
    let fuzz = root.join("fuzz");
    let corpus = fuzz.join("corpus").join(target);
    let artifacts = fuzz.join("artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut cmd = Command::new(binary);
    cmd.current_dir(root).args([
        format!("-max_total_time={seconds}"),
        format!("-timeout={INPUT_TIMEOUT_SECS}"),
        "-print_final_stats=1".to_string(),
    ]);
    let mut prefix = artifacts.into_os_string();
    prefix.push("/");
    let artifacts = PathBuf::from(&prefix);
    let mut arg = std::ffi::OsString::from("-artifact_prefix=");
    arg.push(&prefix);
    cmd.arg(arg);
    let dict = fuzz.join("dicts").join(format!("{target}.dict"));
    if dict.exists() {
        let mut arg = std::ffi::OsString::from("-dict=");
        arg.push(&dict);
        cmd.arg(arg);
    }
    // New inputs go to the first directory only: the seeds and regressions stay as they are.
    cmd.arg(&corpus);
    for extra in ["seeds", "regressions"] {
        let dir = fuzz.join(extra).join(target);
        if dir.is_dir() {
            cmd.arg(dir);
        }
    }
    let log = logs.join(format!("{target}.log"));
    let out =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let since = SystemTime::now();
    let started = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let secs = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if status.success() {
        let execs = text
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        return Ok(Outcome::Clean { execs, secs });
    }
    Ok(Outcome::Crashed {
        inputs: written_since(&artifacts, since),
        log,
    })
}

/// Files of `dir` modified at or after `since`: the inputs libFuzzer wrote for this run.
fn written_since(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let since = since.checked_sub(Duration::from_secs(1)).unwrap_or(since);
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t >= since)
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn print_tail(log: &Path, lines: usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    for line in &all[all.len().saturating_sub(lines)..] {
        println!("  | {line}");
    }
}
