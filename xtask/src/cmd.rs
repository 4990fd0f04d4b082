//! Running commands for every xtask step: the workspace root, `cargo`, running a command and
//! failing with its command line, running tests and counting their results, building the
//! agent. A leaf: the steps (`setup`, `bench`, `fuzz`, `vmtest`, ...) use it; it uses none.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .into()
}

/// Runs a command, failing with its command line when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its standard output, failing with its command line and standard
/// error when it fails.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn build_agent(root: &Path, release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo(root);
    cmd.args(["build", "--package", "brokerscope"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(root
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("brokerscope"))
}

/// Test totals parsed from cargo's `test result:` lines.
#[derive(Default)]
pub struct Totals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// Runs a `cargo test`, echoing its output, and adds its `test result:` lines to `totals`.
pub fn run_tests(cmd: &mut Command, totals: &mut Totals) -> anyhow::Result<()> {
    run_counting(cmd, totals, |line| line.strip_prefix("test result: "))
}

/// Runs `cmd`, echoing its output, and adds to `totals` the `N passed`, `N failed` and
/// `N ignored` parts of each line `counts` picks out.
pub fn run_counting(
    cmd: &mut Command,
    totals: &mut Totals,
    counts: impl Fn(&str) -> Option<&str>,
) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let stdout = child.stdout.take().context("stdout is piped")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading test output")?;
        println!("{line}");
        if let Some(rest) = counts(&line) {
            for part in rest.split([';', '.', ',']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => totals.passed += n,
                        "failed" => totals.failed += n,
                        "ignored" => totals.ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}
