//! brokerscope: an eBPF node agent for Kafka brokers.
//!
//! `run` starts the agent in a fixed order, each step logged: config -> TLS material -> kernel
//! checks -> load and attach probes -> bind -> ready. `pki dev` makes a throwaway PKI;
//! `check-config` validates a config file and prints the effective configuration.

mod config;
mod discovery;
mod kernel;
mod model;
mod pki;
mod probes;
mod render;
mod resources;
mod server;
mod state;

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::{config::Config, model::Model};

#[derive(Parser)]
#[command(
    name = "brokerscope",
    version,
    about = "eBPF node agent for Kafka brokers"
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

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Command::CheckConfig { file } => match Config::load(Some(&file), std::env::vars()) {
            Ok(config) => {
                print!("{}", config.to_toml());
                Ok(())
            }
            Err(e) => {
                if let Some(key) = e.key() {
                    eprintln!("offending key: {key}");
                }
                Err(e.into())
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("brokerscope")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_async(config_path))
}

async fn run_async(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config_path.as_deref(), std::env::vars())?;
    tracing::info!(
        config = %config_path.as_ref().map_or("<defaults>".into(), |p| p.display().to_string()),
        "step 1/5: configuration loaded"
    );

    let server_stats = Arc::new(server::stats::ServerStats::default());
    let tls = server::reload::TlsSource::load(&config.server, server_stats.clone())?;
    tracing::info!(
        cert = %config.server.cert_file.display(),
        serial = %tls.leaf().serial,
        client_ca = %config.server.client_ca_file.display(),
        "step 2/5: TLS material loaded (client certificates required)"
    );

    let model = Arc::new(Model::default());
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
                        "step 4/5: probes attached"
                    );
                    model.set_probes(probes);
                }
                Err(e) => {
                    tracing::error!(
                        error = %format!("{e:#}"),
                        "step 4/5: probes not attached; serving with /ready at 503. The agent \
                         needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN) on a kernel with BTF"
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
    let _rescan = discovery.clone().spawn_fallback_rescan(rescan);
    spawn_state_tracker(model.clone(), model.take_state_events());

    let addr = config.server.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (server.listen)"))?;
    let local = listener
        .local_addr()
        .context("listener has no local address")?;
    model.ignore_own_listener(local.port());
    tracing::info!(addr = %local, "step 5/5: listening");

    let state = server::ServerState::new(&config.server, server_stats);
    let app = server::routes::router(model.clone(), state.clone());
    server::serve(listener, tls, state, app, shutdown_signal()).await;

    if let Some(probes) = model.take_probes() {
        drop(probes);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Feeds the kernel's exec/exit events to discovery on a thread of its own: discovery reads
/// /proc, which blocks, and events of one pid must stay in order.
fn spawn_discovery_events(
    discovery: Arc<discovery::Discovery>,
    mut events: tokio::sync::mpsc::Receiver<probes::processes::ProcessSignal>,
) {
    use probes::processes::ProcessSignal;
    let spawned = std::thread::Builder::new()
        .name("discovery".into())
        .spawn(move || {
            while let Some(signal) = events.blocking_recv() {
                match signal {
                    ProcessSignal::Exec(pid) => discovery.on_exec(pid),
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

/// Feeds the kernel's open/SIGTERM events to the broker state tracker, and derives every
/// broker's state again every [`STATE_TICK`] (listeners appear without an event), on a thread of
/// its own: the tracker reads /proc.
fn spawn_state_tracker(
    model: Arc<Model>,
    mut events: Option<tokio::sync::mpsc::Receiver<probes::state::StateSignal>>,
) {
    let handle = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("broker-state".into())
        .spawn(move || {
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
                    model.tick_states();
                    next_tick = std::time::Instant::now() + STATE_TICK;
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
