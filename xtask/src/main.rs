//! `cargo xtask`: set-up, run, test and benchmark orchestration. No build logic lives here:
//! the eBPF object is built by agent/build.rs; this only makes sure its tools exist.
//!
//! - `setup`: rust-src for nightly, bpf-linker built against nightly's own LLVM, the Debian
//!   packages the tests use, and the kernel facilities (BTF, tracefs, bpffs, cgroup v2).
//!   Idempotent; a no-op in well under a second once done.
//! - `run`: setup, build, dev certificates under `.dev/pki` (git-ignored), then the agent on
//!   127.0.0.1:8443 with the built-in defaults plus those certificates.
//! - `test`: setup, the module-cycle check (as `layers` does), build, every unit test, then the
//!   image (as `image` does) and the privileged end-to-end tests as root, then every fuzz
//!   target for a few seconds each.
//! - `layers`: no module imports another that imports it back, in any crate (cargo-modules).
//! - `fuzz`: the cargo-fuzz targets (fuzz/), each for a bounded time (docs/fuzzing.md).
//! - `image`: the release binary as an OCI image archive under target/image (README, "Install
//!   on Kubernetes").

mod agent;
mod bench;
mod cmd;
mod fuzz;
mod image;
mod layers;
mod scrape;
mod setup;
mod vmtest;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;
use clap::{Parser, Subcommand};

use crate::cmd::{
    Totals, build_agent, cargo, is_root, run, run_counting, run_tests, workspace_root,
};

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
        /// Only the node-tax part: an unrelated process's syscalls and a broker's produce
        /// throughput, agent detached vs attached, with the brokers' log dirs on ext4, xfs,
        /// btrfs, tmpfs, unreadable, and while a broker recovers.
        #[arg(long, conflicts_with = "scrape_only")]
        node_tax_only: bool,
        /// Only our /proc readers against the procfs crate's, ns per read (written to
        /// target/bench/procfs.md).
        #[arg(long, conflicts_with_all = ["scrape_only", "node_tax_only"])]
        procfs_only: bool,
        /// Only the soak and churn run (docs/performance.md): 10k short connections/s, broker
        /// restarts in new namespaces, a scrape a second and an agent kill -9 + restart halfway,
        /// the agent's RSS, fds, threads, map fill, series and CPU plotted over time
        /// (target/bench/soak/).
        #[arg(long, conflicts_with_all = ["scrape_only", "node_tax_only"])]
        soak: bool,
        /// The soak's length in minutes.
        #[arg(long, default_value_t = 10.0, requires = "soak")]
        soak_minutes: f64,
        /// Only the scrape latency with 0, 10k and 50k open connections, agent with the kernel's
        /// hooks against the socket-table fallback, in QEMU guests of Debian 12's 6.1 and 6.12
        /// kernels, which allow the map iterators this kernel may refuse
        /// (target/bench/scrape-vm.md).
        #[arg(long, conflicts_with_all = ["scrape_only", "node_tax_only", "procfs_only", "soak"])]
        scrape_vm: bool,
        /// Inside that guest: the open-connections stages alone with this agent binary, their
        /// table written into the directory given.
        #[arg(long, hide = true, num_args = 2, value_names = ["AGENT", "OUT"])]
        connections_only: Option<Vec<PathBuf>>,
        /// Soak experiments (target/bench/soak-<what>/): without the connection load.
        #[arg(long, hide = true, requires = "soak")]
        soak_no_load: bool,
        /// Soak experiments: without the broker restarts.
        #[arg(long, hide = true, requires = "soak")]
        soak_no_churn: bool,
        /// Soak experiments: the agents' GLIBC_TUNABLES (e.g. glibc.malloc.arena_max=2).
        #[arg(long, hide = true, requires = "soak")]
        soak_glibc_tunables: Option<String>,
    },
    /// Set up, build and run every test: unit, end-to-end on this kernel, every fuzz target for
    /// a few seconds, then the end-to-end subset on Debian 12's 6.1 and 6.12 kernels in QEMU
    /// (the end-to-end ones need root).
    Test {
        /// Only tests whose name contains this (passed to every test run).
        filter: Option<String>,
        /// Skip the kernel matrix in QEMU (`cargo xtask vmtest`): this kernel only.
        #[arg(long)]
        host_only: bool,
    },
    /// Check that no module imports another that imports it back, in any crate (cargo-modules;
    /// `test` runs it first).
    Layers,
    /// Build the agent's OCI image (release binary and the shared objects it loads, nothing
    /// else) as an OCI archive, by default target/image/brokerscope.oci.tar.
    Image(image::Args),
    /// Build the fuzz targets (fuzz/, nightly) and run each for a bounded time; fails on a
    /// crash, naming the crashing input (docs/fuzzing.md).
    Fuzz(fuzz::Args),
    /// Boot Debian's 6.1/6.12 kernels in QEMU and run the end-to-end subset in them, or capture
    /// their tracepoint formats and BTF (docs/vmtest.md).
    Vmtest(vmtest::Args),
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
    /// The soak's broker (started by `bench --soak`): serves short connections on `ADDR` with
    /// `WORKERS` accepting threads (0: a thread per connection).
    #[command(hide = true)]
    BenchSoakBroker {
        addr: String,
        workers: u32,
        /// `kafka.Kafka`, so the agent discovers it.
        main_class: String,
        /// Its server.properties (listener and log dir).
        properties: std::path::PathBuf,
    },
    /// The scrape bench's broker (started by `bench`): listens on each of `ADDRS`
    /// (comma-separated) and holds every connection open.
    #[command(hide = true)]
    BenchHoldingBroker {
        addrs: String,
        /// `kafka.Kafka`, so the agent discovers it.
        main_class: String,
        /// Its server.properties (listeners).
        properties: std::path::PathBuf,
    },
    /// A worker of the scrape bench's broker (started by it): accepts on the inherited
    /// listening descriptors `FDS` (comma-separated) and holds the connections.
    #[command(hide = true)]
    BenchHoldingWorker { fds: String },
    /// The scrape bench's clients (started by `bench`): opens `COUNT` connections over `ADDRS`
    /// and holds them until stdin closes.
    #[command(hide = true)]
    BenchConnect { addrs: String, count: usize },
    /// The node-tax bench's unrelated process (started by `bench`): `CALLS` getppid calls in
    /// `CHUNKS` timed chunks, pinned to `CPU`; prints each chunk's wall and CPU ns.
    #[command(hide = true)]
    BenchSyscalls { calls: u64, chunks: u32, cpu: usize },
    /// The node-tax bench's recovering broker (started by `bench`): opens every segment under
    /// its properties' log dirs, one per `PACE_MS`, keeping them open, then listens.
    #[command(hide = true)]
    BenchRecoveringBroker {
        pace_ms: u64,
        /// `kafka.Kafka`, so the agent discovers it.
        main_class: String,
        /// Its server.properties (listener and log dirs).
        properties: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Cmd::Setup => setup::ensure(setup::Needs::Test),
        Cmd::Layers => layers::check(&root),
        Cmd::Run { listen, release } => run_agent(&root, &listen, release),
        Cmd::Test { filter, host_only } => test(&root, filter.as_deref(), host_only),
        Cmd::Vmtest(args) => vmtest::main(&root, args),
        Cmd::Fuzz(args) => fuzz::main(&root, args),
        Cmd::Image(args) => image::main(&root, args),
        Cmd::BenchBroker {
            case,
            fetch_file,
            port,
            ..
        } => bench::serve_broker(&case, &fetch_file, port),
        Cmd::BenchSoakBroker { addr, workers, .. } => bench::soak::serve_broker(&addr, workers),
        Cmd::BenchHoldingBroker { addrs, .. } => scrape::hold_connections(&addrs),
        Cmd::BenchHoldingWorker { fds } => scrape::hold_worker(&fds),
        Cmd::BenchConnect { addrs, count } => scrape::connect_and_hold(&addrs, count),
        Cmd::BenchSyscalls { calls, chunks, cpu } => {
            bench::node_tax::syscall_loop(calls, chunks, cpu)
        }
        Cmd::BenchRecoveringBroker {
            pace_ms,
            properties,
            ..
        } => bench::node_tax::recovering_broker(&properties, pace_ms),
        Cmd::Bench {
            scrape_only,
            node_tax_only,
            procfs_only,
            soak,
            soak_minutes,
            soak_no_load,
            soak_no_churn,
            soak_glibc_tunables,
            scrape_vm,
            connections_only,
        } => {
            if let Some([agent, out]) = connections_only.as_deref() {
                return scrape::run_connections_only(agent, out);
            }
            if scrape_vm {
                return scrape::run_in_vm(&root, &build_agent(&root, true)?);
            }
            if procfs_only {
                return bench::run_procfs_only(&root, &build_agent(&root, true)?);
            }
            // The node-tax part and the soak need only the tests' packages (mkfs.ext4/xfs/btrfs,
            // curl, iproute2).
            setup::ensure(if node_tax_only || soak {
                setup::Needs::Test
            } else {
                setup::Needs::Bench
            })?;
            if !is_root() {
                bail!("the benchmark loads eBPF programs: run `sudo -E cargo xtask bench`");
            }
            let bin = build_agent(&root, true)?;
            if scrape_only {
                let out_dir = root.join("target/bench");
                std::fs::create_dir_all(&out_dir)?;
                let report = scrape::run(&root, &bin, &out_dir)?;
                let (md, _) = scrape::report(&report);
                println!("{md}");
                return Ok(());
            }
            if node_tax_only {
                return bench::run_node_tax_only(&root, &bin);
            }
            if soak {
                let options = bench::soak::Options {
                    minutes: soak_minutes,
                    no_load: soak_no_load,
                    no_churn: soak_no_churn,
                    glibc_tunables: soak_glibc_tunables,
                };
                return bench::soak::run(&bin, &root.join("target/bench"), &options);
            }
            bench::run(&root, &bin)
        }
    }
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

/// The end-to-end subset on Debian 12's 6.1 and 6.12 kernels (`cargo xtask vmtest --kernel
/// all`), its per-kernel `vmtest <kernel>: N passed, N failed` lines added to `totals` (the
/// guests' own `test result:` lines are echoed but not counted twice).
fn test_kernels(root: &Path, filter: Option<&str>, totals: &mut Totals) -> anyhow::Result<()> {
    let mut cmd = cargo(root);
    cmd.args([
        "run",
        "--quiet",
        "--package",
        "xtask",
        "--",
        "vmtest",
        "--kernel",
        "all",
    ]);
    if let Some(f) = filter {
        cmd.arg(f);
    }
    run_counting(&mut cmd, totals, |line| {
        line.strip_prefix("vmtest ")
            .and_then(|rest| rest.split_once(": "))
            .map(|(_, counts)| counts)
    })
}

fn test(root: &Path, filter: Option<&str>, host_only: bool) -> anyhow::Result<()> {
    let mut totals = Totals::default();
    let mut result = test_all(root, filter, &mut totals);
    if result.is_ok() && !host_only {
        result = test_kernels(root, filter, &mut totals);
    }
    // One closing line for the whole run, in the form CI reads.
    println!(
        "xtask: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    result
}

/// Where the tests' agents pin (`brokerscope_tests::TEST_PIN_ROOT`): what is left there,
/// removed.
fn leftover_pins() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/bpf/brokerscope-tests");
    let left: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for path in &left {
        let _ = std::fs::remove_dir_all(path);
    }
    let _ = std::fs::remove_dir(root);
    left
}

fn test_all(root: &Path, filter: Option<&str>, totals: &mut Totals) -> anyhow::Result<()> {
    setup::ensure(setup::Needs::Test)?;
    layers::check(root)?;
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
    // The image the image tests run under runc (tests/tests/image.rs): the release build, as
    // shipped.
    let image = root.join(image::ARCHIVE);
    image::build(root, &build_agent(root, true)?, &image)?;
    let mut e2e = cargo(root);
    // Every test binary runs even when one fails: the closing totals count them all.
    e2e.args(["test", "--no-fail-fast", "--package", "brokerscope-tests"])
        .env("BROKERSCOPE_TEST_BIN", &bin)
        .env("BROKERSCOPE_TEST_IMAGE", &image);
    if let Some(f) = filter {
        e2e.args(["--", f]);
    }
    let ran = run_tests(&mut e2e, totals);
    // Each test's agent pins under a directory of its own there and removes it when done,
    // even on panic: anything left is a test's bug (and would keep programs attached).
    let left = leftover_pins();
    if !left.is_empty() {
        eprintln!("xtask: the end-to-end tests left pins behind (removed now): {left:?}");
        totals.failed += 1;
    }
    ran?;
    if !left.is_empty() {
        bail!("the end-to-end tests left pins behind: {left:?}");
    }

    // The fuzz targets, briefly: each one a test in the totals. A filter picks the targets
    // whose name contains it (all of them for `fuzz`).
    let targets = fuzz::selected(root, filter)?;
    fuzz::run_targets(root, &targets, fuzz::TEST_SECONDS, false, totals)
}
