//! `cargo xtask`: set-up, run, test and benchmark orchestration. No build logic lives here:
//! the eBPF object is built by agent/build.rs; this only makes sure its tools exist.
//!
//! - `setup`: rust-src for nightly, bpf-linker built against nightly's own LLVM, the Debian
//!   packages the tests use, and the kernel facilities (BTF, tracefs, bpffs, cgroup v2).
//!   Idempotent; a no-op in well under a second once done.
//! - `run`: setup, build, dev certificates under `.dev/pki` (git-ignored), then the agent on
//!   127.0.0.1:8443 with the built-in defaults plus those certificates.
//! - `test`: setup, build, every unit test, then the privileged end-to-end tests as root.

mod bench;
mod scrape;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need; check the kernel.
    Setup,
    /// Set up, build and run the agent on 127.0.0.1:8443 with dev certificates.
    Run {
        /// Listen address (default 127.0.0.1:8443).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        /// Build in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Benchmark the agent's cost to broker-like traffic (needs root); writes target/bench/.
    Bench {
        /// Only the scrape comparison (agent vs node_exporter over mTLS).
        #[arg(long)]
        scrape_only: bool,
    },
    /// Set up, build and run every test (the end-to-end ones need root).
    Test {
        /// Only tests whose name contains this (passed to both test runs).
        filter: Option<String>,
    },
    /// The benchmark's broker (started by `bench`): serves one case on its listener.
    #[command(hide = true)]
    BenchBroker {
        case: String,
        fetch_file: std::path::PathBuf,
        port: u16,
        /// `kafka.Kafka`, so the agent discovers it.
        main_class: String,
        /// Its server.properties (listener and log dir).
        properties: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Cmd::Setup => setup::ensure(setup::Needs::Test),
        Cmd::Run { listen, release } => run_agent(&root, &listen, release),
        Cmd::Test { filter } => test(&root, filter.as_deref()),
        Cmd::BenchBroker {
            case,
            fetch_file,
            port,
            ..
        } => bench::serve_broker(&case, &fetch_file, port),
        Cmd::Bench { scrape_only } => {
            setup::ensure(setup::Needs::Bench)?;
            if !is_root() {
                bail!("the benchmark loads eBPF programs: run `sudo -E cargo xtask bench`");
            }
            let bin = build_agent(&root, true)?;
            if scrape_only {
                let out_dir = root.join("target/bench");
                std::fs::create_dir_all(&out_dir)?;
                let (runs, rss) = scrape::run(&root, &bin, &out_dir)?;
                let (md, _) = scrape::report(&runs, rss);
                println!("{md}");
                return Ok(());
            }
            bench::run(&root, &bin)
        }
    }
}

fn workspace_root() -> PathBuf {
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

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn build_agent(root: &Path, release: bool) -> anyhow::Result<PathBuf> {
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

fn run_agent(root: &Path, listen: &str, release: bool) -> anyhow::Result<()> {
    setup::ensure(setup::Needs::Run)?;
    if !is_root() {
        bail!("the agent loads eBPF programs and needs root: run `sudo -E cargo xtask run`");
    }
    let bin = build_agent(root, release)?;
    let pki = root.join(".dev/pki");
    if !pki.join("client.key").exists() {
        run(Command::new(&bin).args(["pki", "dev", "--out"]).arg(&pki))?;
    }
    let (port, host) = match listen.rsplit_once(':') {
        Some((host, port)) => (
            port,
            if host == "127.0.0.1" || host == "0.0.0.0" {
                "localhost"
            } else {
                host
            },
        ),
        None => bail!("--listen must be host:port, got {listen}"),
    };
    println!();
    println!(
        "brokerscope is starting on {listen} with dev certificates from {}",
        pki.display()
    );
    println!("read its metrics with:");
    println!(
        "  curl --cacert {p}/ca.crt --cert {p}/client.crt --key {p}/client.key https://{host}:{port}/metrics",
        p = pki.display()
    );
    println!();
    let mut cmd = Command::new(&bin);
    cmd.arg("run")
        .env("BROKERSCOPE_SERVER_LISTEN", listen)
        .env("BROKERSCOPE_SERVER_CERT_FILE", pki.join("tls.crt"))
        .env("BROKERSCOPE_SERVER_KEY_FILE", pki.join("tls.key"))
        .env("BROKERSCOPE_SERVER_CLIENT_CA_FILE", pki.join("ca.crt"));
    run(&mut cmd)
}

/// Test totals parsed from cargo's `test result:` lines.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs a `cargo test`, echoing its output, and adds its `test result:` lines to `totals`.
fn run_tests(cmd: &mut Command, totals: &mut Totals) -> anyhow::Result<()> {
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
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split([';', '.']) {
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

fn test(root: &Path, filter: Option<&str>) -> anyhow::Result<()> {
    let mut totals = Totals::default();
    let result = test_all(root, filter, &mut totals);
    // One closing line for the whole run, in the form CI reads.
    println!(
        "xtask: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    result
}

fn test_all(root: &Path, filter: Option<&str>, totals: &mut Totals) -> anyhow::Result<()> {
    setup::ensure(setup::Needs::Test)?;
    let bin = build_agent(root, false)?;

    // Unit tests: no privileges needed.
    let mut unit = cargo(root);
    unit.args([
        "test",
        "--package",
        "brokerscope",
        "--package",
        "brokerscope-common",
        "--package",
        "xtask",
    ]);
    if let Some(f) = filter {
        unit.args(["--", f]);
    }
    run_tests(&mut unit, totals)?;

    if !is_root() {
        bail!(
            "the end-to-end tests load eBPF programs and create network namespaces: run \
             `sudo -E cargo xtask test` (unit tests passed)"
        );
    }
    let mut e2e = cargo(root);
    e2e.args(["test", "--package", "brokerscope-tests"])
        .env("BROKERSCOPE_TEST_BIN", &bin);
    if let Some(f) = filter {
        e2e.args(["--", f]);
    }
    run_tests(&mut e2e, totals)
}
