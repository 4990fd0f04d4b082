//! brokerscope: an eBPF node agent for Kafka brokers.
//!
//! A library with one entry, [`main`] (the `brokerscope` binary is a call to it); its modules
//! stay private. [`fuzzing`] is the fuzz targets' door to the parsers (fuzz/, docs/fuzzing.md).
//!
//! `run` starts the agent in a fixed order, each step logged: config -> TLS material -> kernel
//! checks -> load and attach probes -> bind -> ready. `pki dev` makes a throwaway PKI;
//! `check-config` validates a config file and prints the effective configuration. `get`, `set`,
//! `events`, `logs` and `top` are the operator's client of a running agent (`client`);
//! `completions` and `man` are generated from the command line defined here.

mod broker;
mod capabilities;
mod client;
mod config;
mod control;
mod discovery;
mod events;
mod files;
mod flight;
#[doc(hidden)]
pub mod fuzzing;
mod kernel;
mod locks;
mod model;
mod pki;
mod policy;
mod probes;
mod proc;
mod procbench;
mod render;
mod server;
mod stats;
mod strimzi;
mod tasks;
mod usage;
mod views;

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};

use crate::{config::Config, model::Model};

/// `--version`: the crate's version and the commit it was built from (agent/build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("BROKERSCOPE_GIT_REV"),
    ")"
);

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (refused by the agent, an answer that cannot be read, a file that cannot be read)
  2  usage (a wrong flag or value; a request that needs --broker)
  3  not found (no such broker)
  4  access denied (our certificate or identity refused, or the agent's not trusted)
  5  unavailable (cannot connect, timed out, not ready, rate limited)";

#[derive(Parser)]
#[command(
    name = "brokerscope",
    version = VERSION,
    about = "eBPF node agent for Kafka brokers",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// TOML config file; every key has a default, so none is needed.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Throwaway certificates for local runs and tests.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Validate a config file and print the effective configuration.
    CheckConfig { file: PathBuf },
    /// Remove the pinned kernel maps and links (uninstall): the programs detach and every
    /// counter is gone. Run it after the agent stopped; a running agent keeps counting
    /// unpinned until it stops.
    Cleanup {
        /// Config file naming `probes.pin_dir` (default: /sys/fs/bpf/brokerscope).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Read from a running agent: health, ready, brokers, state, metrics, diagnostics, config.
    #[command(after_help = "\
Examples:
  brokerscope get brokers -o wide
  brokerscope get state --broker 1
  brokerscope get metrics -o json
  brokerscope get diagnostics -o tar.gz > diagnostics.tar.gz")]
    Get {
        what: client::What,
        /// One broker (brokers, state); the error lists the ids when one is needed.
        #[arg(long)]
        broker: Option<String>,
        /// table | wide | json | yaml | tar.gz (diagnostics only).
        #[arg(short, long, value_enum, default_value_t, hide_possible_values = true)]
        output: client::GetOutput,
        #[command(flatten)]
        connection: client::Connection,
    },
    /// Change a running agent's configuration live.
    Set {
        #[command(subcommand)]
        what: SetCommand,
    },
    /// Follow a running agent's live events as they happen (Ctrl-C to stop).
    Events {
        /// Follow (what `events` always does: the agent keeps no event history to list).
        #[arg(short, long)]
        follow: bool,
        /// Only these brokers (comma-separated ids).
        #[arg(long)]
        broker: Option<String>,
        /// Only these listeners (comma-separated names).
        #[arg(long)]
        listener: Option<String>,
        /// Only these kinds, e.g. broker_started,connection_reset.
        #[arg(long)]
        kind: Option<String>,
        /// table | json (a line per event) | yaml (a document per event).
        #[arg(short, long, value_enum, default_value_t, hide_possible_values = true)]
        output: client::Output,
        #[command(flatten)]
        connection: client::Connection,
    },
    /// A running agent's recent log lines (-f: and new ones as they come).
    Logs {
        /// How far back (30s, 5m, 1h30m) or from when (RFC 3339).
        #[arg(long, value_parser = client::parse_since)]
        since: Option<client::Since>,
        /// error | warn | info | debug.
        #[arg(long)]
        level: Option<String>,
        /// Keep printing new lines (Ctrl-C to stop).
        #[arg(short, long)]
        follow: bool,
        /// table | json | yaml.
        #[arg(short, long, value_enum, default_value_t, hide_possible_values = true)]
        output: client::Output,
        #[command(flatten)]
        connection: client::Connection,
    },
    /// A live view of every broker on a node: listeners' traffic and brokers' resources.
    #[command(after_help = "\
Keys: q quit, s next sort column, r reverse the sort, / filter (Enter keeps it, Esc clears it).
Rates are over the last refresh; latencies are over the last 60 s, shown as the upper bound of
the agent's power-of-two bucket that holds the quantile (<2ms). One /metrics request per refresh.")]
    Top {
        #[command(flatten)]
        options: client::top::Options,
        #[command(flatten)]
        connection: client::Connection,
    },
    /// Shell completions on stdout, e.g. `brokerscope completions bash >
    /// /etc/bash_completion.d/brokerscope`.
    Completions { shell: clap_complete::Shell },
    /// The manual page (roff) on stdout, e.g. `brokerscope man | man -l -`; with --dir, one
    /// page per command written there.
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Our /proc readers against the procfs crate's, ns per read (`cargo xtask bench
    /// --procfs-only`).
    #[command(hide = true)]
    BenchProcfs {
        /// Reads per round of each reader.
        #[arg(long, default_value_t = 2000)]
        iterations: u32,
        /// Processes to read (this one's and pid 1's when none).
        pids: Vec<u32>,
    },
}

#[derive(Subcommand)]
enum SetCommand {
    /// KEY=VALUE (dotted key, e.g. server.access_log=debug; VALUE is JSON when it parses, else a
    /// string). Several are applied as one change.
    Config {
        #[arg(required = true)]
        assignments: Vec<String>,
        /// table | json | yaml.
        #[arg(short, long, value_enum, default_value_t, hide_possible_values = true)]
        output: client::Output,
        #[command(flatten)]
        connection: client::Connection,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Write ca.crt/ca.key, tls.crt/tls.key and client.crt/client.key into a directory.
    Dev {
        #[arg(long)]
        out: PathBuf,
        /// Validity of every certificate, in days.
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// Overrides the start of validity (tests): RFC 3339, or an offset from now like `-2d`.
        #[arg(long, hide = true, allow_hyphen_values = true, value_parser = pki::parse_instant)]
        not_before: Option<time::OffsetDateTime>,
        /// Overrides the end of validity (tests): RFC 3339, or an offset from now like `-1h`.
        #[arg(long, hide = true, allow_hyphen_values = true, value_parser = pki::parse_instant)]
        not_after: Option<time::OffsetDateTime>,
    },
}

/// The command line: `brokerscope run | pki dev | check-config | cleanup | get | set | events |
/// logs | top | completions | man`.
// Long: one match arm per subcommand, in the CLI's order.
pub fn main() -> ExitCode {
    std::sync::LazyLock::force(&STARTED);
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // A command whose output goes to `head` ends quietly when the reader is gone, as Unix
        // tools do (Rust ignores SIGPIPE, so a write would fail and printing would panic). The
        // agent itself keeps ignoring it: a peer that goes away is an error to handle there.
        // SAFETY: setting a signal's disposition to its default; no handler runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Pki {
            command:
                PkiCommand::Dev {
                    out,
                    days,
                    not_before,
                    not_after,
                },
        } => pki::generate_dev(
            &out,
            pki::Validity::days(days).with_bounds(not_before, not_after),
        )
        .map(|files| {
            for f in files {
                println!("{}", f.display());
            }
        })
        .with_context(|| format!("brokerscope pki dev --out {}", out.display())),
        Command::Cleanup { config } => cleanup(config.as_deref()),
        Command::CheckConfig { file } => check_config(&file),
        Command::Get {
            what,
            broker,
            output,
            connection,
        } => {
            return client_run(client::get(&connection, what, broker.as_deref(), output));
        }
        Command::Set {
            what:
                SetCommand::Config {
                    assignments,
                    output,
                    connection,
                },
        } => return client_run(client::set_config(&connection, &assignments, output)),
        Command::Events {
            follow: _,
            broker,
            listener,
            kind,
            output,
            connection,
        } => {
            return client_run(client::events(
                &connection,
                broker.as_deref(),
                listener.as_deref(),
                kind.as_deref(),
                output,
            ));
        }
        Command::Logs {
            since,
            level,
            follow,
            output,
            connection,
        } => {
            return client_run(client::logs(
                &connection,
                since,
                level.as_deref(),
                follow,
                output,
            ));
        }
        Command::Top {
            options,
            connection,
        } => return client_run(client::top::run(connection, options)),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "brokerscope",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { dir } => man(dir.as_deref()),
        Command::BenchProcfs { iterations, pids } => bench_procfs(iterations, pids),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `brokerscope check-config FILE`: everything `run` would refuse, before it loads anything:
/// the keys, the TLS files (readable, a certificate and its key, a CA bundle that parses, valid
/// now) and the port. Prints the effective configuration when all is well.
fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let config = match Config::load(Some(file), std::env::vars()) {
        Ok(config) => config,
        Err(e) => {
            if let Some(key) = e.key() {
                eprintln!("offending key: {key}");
            }
            return Err(e.into());
        }
    };
    server::tls::load(&config.server, server::tls::unix_now())?;
    let addr = config.server.listen_addr()?;
    if let Err(e) = std::net::TcpListener::bind(addr) {
        let holder = server::isolation::port_holder(addr.port());
        match holder {
            // The agent this config is for, most likely: `run` would wait for it to stop.
            Some(h) if h.ends_with("(brokerscope)") => {
                eprintln!("note: {addr} (server.listen) is in use by {h}, a running agent")
            }
            _ => anyhow::bail!(
                "server.listen: cannot listen on {addr}: {e}{}",
                holder
                    .map(|h| format!(" (in use by {h})"))
                    .unwrap_or_default()
            ),
        }
    }
    print!("{}", config.to_toml());
    Ok(())
}

/// `brokerscope cleanup`: removes what the agent pinned under `probes.pin_dir`.
fn cleanup(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let config = Config::load(config, std::env::vars())?;
    let base = &config.probes.pin_dir;
    if base.as_os_str().is_empty() {
        println!("probes.pin_dir is empty: the agent pins nothing, nothing to remove");
        return Ok(());
    }
    let removed = probes::pins::cleanup(base)
        .with_context(|| format!("cannot remove the pins under {}", base.display()))?;
    if removed.is_empty() {
        println!("nothing pinned under {}", base.display());
    }
    for path in removed {
        println!(
            "removed {} (its programs detached, its counters gone)",
            path.display()
        );
    }
    Ok(())
}

/// When this process started (forced first thing in [`main`]).
pub static STARTED: std::sync::LazyLock<std::time::SystemTime> =
    std::sync::LazyLock::new(std::time::SystemTime::now);

/// The agent's log: stderr and the in-memory ring behind `/v1/logs`, under one filter that
/// `log.level` switches live. `RUST_LOG`, when set, is the filter until the config changes it.
struct Logging {
    level: control::logs::LogLevel,
    ring: Arc<control::logs::LogRing>,
    from_env: bool,
}

fn init_logging(format: config::LogFormat) -> Logging {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let from_env = env.is_some();
    let filter = env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let ring = Arc::new(control::logs::LogRing::default());
    let json = format == config::LogFormat::Json;
    tracing_subscriber::registry()
        .with(filter)
        .with((!json).then(|| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        }))
        .with(json.then(|| {
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_current_span(false)
        }))
        .with(control::logs::RingLayer(ring.clone()))
        .init();
    Logging {
        level: control::logs::LogLevel::new(handle),
        ring,
        from_env,
    }
}

/// Runs one client command on a small runtime of its own; its error is printed and becomes
/// the exit code that names its kind (`client::exit`).
fn client_run(
    command: impl std::future::Future<Output = Result<(), client::ClientError>>,
) -> ExitCode {
    // Before any thread exists: the local time zone can only be read then.
    client::init_local_offset();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(client::exit::ERROR);
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::from(client::exit::OK),
        Err(e) => {
            let code = e.exit_code();
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::from(code)
        }
    }
}

/// `brokerscope man`: the top page on stdout, or every command's page into `dir`.
fn man(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let command = Cli::command();
    match dir {
        None => clap_mangen::Man::new(command)
            .render(&mut std::io::stdout())
            .context("cannot write the manual page"),
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(command, dir)
                .with_context(|| format!("cannot write the manual pages into {}", dir.display()))?;
            for entry in std::fs::read_dir(dir)?.flatten() {
                println!("{}", entry.path().display());
            }
            Ok(())
        }
    }
}

fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    bound_malloc_arenas();
    // The configuration first: it says how to log. Its errors go to stderr as they are.
    let config = Config::load(config_path.as_deref(), std::env::vars())?;
    let logging = init_logging(config.log.format);
    // Before the runtime starts its threads: setns moves only the calling thread.
    match kernel::join_host_cgroup_namespace() {
        kernel::CgroupNamespace::Host => {}
        kernel::CgroupNamespace::Joined { through } => tracing::info!(
            through_pid = through,
            "joined the node's cgroup namespace: the container's own would show brokers' \
             cgroups as /.."
        ),
        kernel::CgroupNamespace::Kept(why) => tracing::warn!(
            error = %why,
            "cannot join the node's cgroup namespace; brokers in other cgroups read /.. and \
             have no cgroup id (needs hostPID, CAP_SYS_ADMIN and CAP_SYS_PTRACE)"
        ),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("brokerscope")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_async(config_path, config, logging))
}

async fn run_async(
    config_path: Option<PathBuf>,
    config: Config,
    logging: Logging,
) -> anyhow::Result<()> {
    if !logging.from_env {
        logging.level.set(&config.log.level)?;
    }
    tracing::info!(
        config = %config_path.as_ref().map_or("<defaults>".into(), |p| p.display().to_string()),
        "step 1/5: configuration loaded"
    );

    let server_stats = Arc::new(stats::ServerStats::default());
    let tls = server::reload::TlsSource::load(&config.server, server_stats.clone())?;
    tracing::info!(
        cert = %config.server.cert_file.display(),
        serial = %tls.leaf().serial,
        client_ca = %config.server.client_ca_file.display(),
        "step 2/5: TLS material loaded (client certificates required)"
    );

    // The port first: a busy one is said before anything is loaded (a crash-looping pod would
    // otherwise load every program at each try).
    let addr = config.server.listen_addr()?;
    let listener = bind(addr).await?;

    let missing_caps = missing_capabilities();

    let model = Arc::new(Model::default());
    // However run_async ends (a clean stop or an error after the probes attached), the kernel
    // programs are detached before it returns: other threads keep the model alive until exit.
    let _detach = DetachOnExit(model.clone());
    check_kernel_and_load_probes(&model, &config, &missing_caps);

    let (discovery, _rescan) = start_discovery(&config, &model).await?;

    check_brokers_isolation(&model, addr)?;
    let local = listener
        .local_addr()
        .context("listener has no local address")?;
    model.ignore_own_listener(local.port());
    tracing::info!(addr = %local, "step 5/5: listening");

    let state = server::ListenerPolicy::new(&config.server, server_stats);
    let pods_section = config.server.clone();
    let control = control::Control::new(
        config,
        config_path,
        model.clone(),
        state.clone(),
        Some(discovery.clone()),
        logging.level,
        logging.ring,
    );
    let _file_watch = control.clone().spawn_file_watch();
    let app = server::routes::router_with(model.clone(), state.clone(), control);
    let _pods = tasks::spawn(
        "pod-listeners",
        server::pods::run(model.clone(), state.clone(), pods_section),
    );
    server::serve(listener, tls, state, app, shutdown_signal()).await;
    tasks::shutdown();

    tracing::info!("stopped");
    Ok(())
}

/// Each capability withheld is named once, with what it costs, before anything fails on it.
fn missing_capabilities() -> Vec<(String, &'static str)> {
    let missing_caps = match capabilities::effective() {
        Some(effective) => capabilities::missing(effective),
        None => Vec::new(),
    };
    for (capability, lost) in &missing_caps {
        tracing::warn!(%capability, lost, "missing capability");
    }
    missing_caps
}

/// Discovered brokers' listeners, as configured ones were checked with the config: none may
/// share the agent's address.
fn check_brokers_isolation(model: &Model, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    for b in model.brokers().iter().filter(|b| b.is_running()) {
        config::isolation::check_isolation(
            addr,
            b.listeners.iter().map(|l| l.port),
            &format!("the listeners of broker {} (pid {})", b.id, b.pid),
        )?;
    }
    Ok(())
}

/// Steps 3 and 4: checks the kernel and loads and attaches the probes into the model. Either
/// failing is logged and leaves `/ready` at 503; the agent serves on.
fn check_kernel_and_load_probes(
    model: &Model,
    config: &Config,
    missing_caps: &[(String, &'static str)],
) {
    match kernel::check() {
        Ok(facts) => {
            tracing::info!(
                release = %facts.release,
                tracefs = %facts.tracefs.display(),
                cgroup2 = ?facts.cgroup2,
                memlock_raised = facts.memlock_raised,
                "step 3/5: kernel checked"
            );
            model.set_kernel(facts.clone());
            match probes::Probes::load(&facts, &config.probes) {
                Ok(probes) => {
                    tracing::info!(
                        programs = probes.attached().len(),
                        refused = probes.degraded().len(),
                        "step 4/5: probes attached"
                    );
                    for missing in probes.missing() {
                        tracing::warn!(
                            capability = %missing,
                            "step 4/5: no hook this kernel allows; serving the rest"
                        );
                    }
                    model.set_probes(probes);
                    release_load_memory();
                }
                Err(e) => {
                    let hint = if probes::is_permission_error(&e) {
                        let withheld: Vec<&str> = missing_caps
                            .iter()
                            .filter(|(c, _)| c.contains("CAP_BPF") || c.contains("CAP_PERFMON"))
                            .map(|(c, _)| c.as_str())
                            .collect();
                        if withheld.is_empty() {
                            "the agent needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)".to_string()
                        } else {
                            format!("the agent lacks {}", withheld.join(", and "))
                        }
                    } else {
                        "see the error for what this kernel lacks".to_string()
                    };
                    tracing::error!(
                        error = %format!("{e:#}"),
                        hint = %hint,
                        "step 4/5: probes not attached; serving with /ready at 503"
                    );
                    model.set_probe_error(e.to_string());
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "step 3/5: kernel check failed; serving with /ready at 503");
            model.set_probe_error(e.to_string());
        }
    }
}

/// Discovery's first scan, then what keeps it and the model current: the kernel's exec/exit
/// events (or the rescan alone without them), connection events for `/v1/events`, the broker
/// state tracker and the standby programs' demand thread. Returns discovery and its rescan task.
async fn start_discovery(
    config: &Config,
    model: &Arc<Model>,
) -> anyhow::Result<(Arc<discovery::Discovery>, tokio::task::JoinHandle<()>)> {
    let discovery = Arc::new(discovery::Discovery::new(
        discovery::Settings {
            cmdline_patterns: config.discovery.cmdline_patterns.clone(),
            listener_ports: config.discovery.listener_ports.clone(),
            cgroup2: model.kernel().and_then(|k| k.cgroup2),
        },
        model.clone(),
    )?);
    let first = discovery.clone();
    match tokio::task::spawn_blocking(move || first.scan_all()).await {
        Ok(Ok(summary)) => tracing::info!(
            brokers = summary.running,
            processes = summary.processes,
            "discovery: first scan done"
        ),
        Ok(Err(e)) => tracing::error!(error = %e, "discovery: first scan failed; /ready stays 503"),
        Err(e) => tracing::error!(error = %e, "discovery: first scan panicked; /ready stays 503"),
    }
    // Kernel exec/exit events drive discovery; a slow rescan stays as a safety net (a process
    // can change its command line without exec). Without probes, the rescan is all there is.
    let rescan = match model.take_process_events() {
        Some(events) => {
            spawn_discovery_events(discovery.clone(), events);
            discovery::SAFETY_RESCAN
        }
        None => discovery::FALLBACK_RESCAN,
    };
    let rescan_task = discovery.clone().spawn_fallback_rescan(rescan);
    // Kernel connection events flow only while /v1/events has a subscriber.
    if let Some(ring) = model.take_conn_events() {
        let sink = model.clone();
        match probes::sockets_events::spawn_reader(ring, move |events| {
            sink.publish_conn_events(events)
        }) {
            Ok(()) => {
                let weak = Arc::downgrade(model);
                model.events.on_interest(move |on| {
                    if let Some(model) = weak.upgrade() {
                        model.set_conn_events(on);
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "no kernel connection events for /v1/events"),
        }
    }
    spawn_state_tracker(model.clone(), model.take_state_events());
    model.spawn_demand_thread();
    model.spawn_walk_thread();
    Ok((discovery, rescan_task))
}

/// Binds the endpoint; a busy port names its holder where /proc tells it.
async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let holder = server::isolation::port_holder(addr.port())
                .unwrap_or_else(|| "another process".to_string());
            anyhow::bail!(
                "cannot listen on {addr} (server.listen): the port is in use by {holder}; stop \
                 it, or choose another port with server.listen (or BROKERSCOPE_SERVER_LISTEN)"
            )
        }
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("cannot listen on {addr} (server.listen)")))
        }
    }
}

/// Detaches and unloads every kernel program when dropped.
struct DetachOnExit(Arc<Model>);

impl Drop for DetachOnExit {
    fn drop(&mut self) {
        drop(self.0.take_probes());
    }
}

/// Feeds the kernel's exec/exit events to discovery on a thread of its own: discovery reads
/// /proc, which blocks. An exec of a broker is examined on an examiner thread (so one broker's
/// hanging files delay no other); an exit that overtakes it is caught when it ends.
fn spawn_discovery_events(
    discovery: Arc<discovery::Discovery>,
    mut events: tokio::sync::mpsc::Receiver<probes::processes::ProcessSignal>,
) {
    use probes::processes::ProcessSignal;
    let spawned = tasks::thread("discovery", move || {
        while let Some(signal) = events.blocking_recv() {
            match signal {
                ProcessSignal::Exec(pid) => {
                    discovery.on_exec(pid);
                }
                ProcessSignal::Exit(pid) => discovery.on_exit(pid),
                ProcessSignal::Lost => {
                    tracing::warn!("process events were lost; rescanning /proc");
                    if let Err(e) = discovery.scan_all() {
                        tracing::warn!(error = %e, "rescan failed");
                    }
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the discovery thread; relying on rescans");
    }
}

/// Feeds the kernel's SIGTERM events (and opens, from the opt-in `openat` hooks) to the broker
/// state tracker, and derives every broker's state again every [`STATE_TICK`] (listeners appear
/// without an event), or every [`strimzi::POLL_TICK`] while a broker is starting (its open
/// descriptors are polled each tick: that is how log recovery is seen), on a thread of its own:
/// the tracker reads /proc.
fn spawn_state_tracker(
    model: Arc<Model>,
    mut events: Option<tokio::sync::mpsc::Receiver<probes::state::StateSignal>>,
) {
    let handle = tokio::runtime::Handle::current();
    let spawned = tasks::thread("broker-state", move || {
        let mut next_tick = std::time::Instant::now();
        loop {
            let wait = next_tick.saturating_duration_since(std::time::Instant::now());
            // None: the wait elapsed; Some(None): the stream ended.
            let got = match events.as_mut() {
                Some(rx) => {
                    handle.block_on(async { tokio::time::timeout(wait, rx.recv()).await.ok() })
                }
                None => {
                    std::thread::sleep(wait);
                    None
                }
            };
            match got {
                Some(Some(signal)) => model.on_state_signal(&signal),
                Some(None) => events = None,
                None => {}
            }
            if std::time::Instant::now() >= next_tick {
                let polling = model.tick_states();
                let every = if polling {
                    strimzi::POLL_TICK
                } else {
                    STATE_TICK
                };
                next_tick = std::time::Instant::now() + every;
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the broker state thread");
    }
}

/// How often broker states are derived again without an event.
const STATE_TICK: std::time::Duration = std::time::Duration::from_millis(250);

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
    }
}

/// Hands the heap the loader freed back to the kernel. Loading parses the kernel's BTF twice
/// (ours for offsets, aya's for relocations): tens of MiB, freed once the programs are in, but
/// glibc keeps freed memory below its top chunk mapped, and the agent would idle at that
/// high-water mark for the rest of its life.
/// Two malloc arenas, not glibc's eight per CPU: every runtime and worker thread otherwise
/// keeps an arena of its own whose freed memory glibc holds. Measured by the soak bench
/// (docs/performance.md): RSS grew 21.8 -> 25.1 MiB over 5 minutes of churn with the default,
/// flat with two; CPU per 1k connections/s unchanged (0.92 vs 0.94 ms per second).
fn bound_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets an allocator parameter; called before any other thread.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

fn release_load_memory() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only releases free memory; it has no preconditions.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(
            released = released == 1,
            "returned the loader's freed heap to the kernel"
        );
    }
}

/// `brokerscope bench-procfs`: see [`procbench`].
fn bench_procfs(iterations: u32, mut pids: Vec<u32>) -> anyhow::Result<()> {
    if pids.is_empty() {
        pids = vec![std::process::id(), 1];
    }
    let rows = procbench::run(&pids, iterations)?;
    print!("{}", procbench::report(&rows));
    Ok(())
}
