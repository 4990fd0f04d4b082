//! Loads the embedded kernel programs, attaches them, and reads their maps.
//!
//! Owns every kernel object the agent creates: dropping [`Probes`] detaches and unloads them all.
//! Nothing outside this module touches a map; the model asks for a [`ProbeSnapshot`].

mod btf;
mod netns;
pub mod processes;
pub mod resources;
pub mod sockets;
pub mod state;
mod tracefs;

use std::{os::fd::AsRawFd, path::Path, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray},
    programs::{Iter, RawTracePoint, TracePoint},
};
use brokerscope_common::{
    processes::PROCESS_OFFSETS_GLOBAL,
    resources::RESOURCE_OFFSETS_GLOBAL,
    sockets::{CONNECTIONS_MAP, LISTENERS_MAP, SOCKET_OFFSETS_GLOBAL, WATCHED_MAP},
    state::STATE_OFFSETS_GLOBAL,
    telemetry::{PROBE_ERRORS_MAP, PROBE_EVENTS_MAP, ProbeError, Program},
};
use tokio::io::unix::AsyncFd;

use crate::{config::ProbesConfig, kernel::KernelFacts};

/// The kernel programs, built by build.rs (aya-build) and embedded in the binary.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/brokerscope-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum ProbesError {
    #[error("cannot read kernel BTF: {0}")]
    Btf(#[from] btf::BtfError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] tracefs::FormatError),
    #[error("cannot load kernel BTF for the iterator: {0}")]
    KernelBtf(#[source] Box<aya::BtfError>),
    #[error("cannot load the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF object has no {kind} `{name}` (build mismatch)")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("cannot load or attach program {program} to {hook}: {source}")]
    Program {
        program: &'static str,
        hook: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("cannot open the kernel log ring: {0}")]
    Log(#[source] aya_log::Error),
    #[error("cannot watch the kernel log ring: {0}")]
    LogFd(#[source] std::io::Error),
}

/// A program attached to its hook.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    pub program: &'static str,
    pub hook: &'static str,
    pub id: u32,
}

/// Per-program counters at one instant.
#[derive(Clone, Debug, Default)]
pub struct ProgramStats {
    pub program: &'static str,
    pub events: u64,
    /// From the kernel's BPF stats; zero unless `kernel.bpf_stats_enabled` is on.
    pub run_time: Duration,
}

/// Fill level of a bounded map.
#[derive(Clone, Debug)]
pub struct MapStats {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u32,
}

/// Everything the probes know, read at one instant.
#[derive(Clone, Debug, Default)]
pub struct ProbeSnapshot {
    pub listeners: Vec<sockets::ListenerStats>,
    pub programs: Vec<ProgramStats>,
    pub errors: Vec<(&'static str, u64)>,
    pub maps: Vec<MapStats>,
    /// Per-broker resource counters by tgid.
    pub resources: Vec<(u32, brokerscope_common::resources::ResourceCounters)>,
}

/// The loaded and attached kernel side.
pub struct Probes {
    // Field order is drop order: readers close their map fds before the programs go.
    sockets: sockets::SocketsReader,
    resources: resources::ResourcesReader,
    events: PerCpuArray<MapData, u64>,
    errors: PerCpuArray<MapData, u64>,
    attached: Vec<Attachment>,
    capacities: ProbesConfig,
    namespaces: netns::Namespaces,
    broker_pids: processes::BrokerPids,
    process_events: Option<tokio::sync::mpsc::Receiver<processes::ProcessSignal>>,
    state_events: Option<tokio::sync::mpsc::Receiver<state::StateSignal>>,
    ebpf: Ebpf,
}

impl Probes {
    /// Resolves offsets from the running kernel, loads the object with the configured map
    /// capacities and attaches every program.
    pub fn load(kernel: &KernelFacts, config: &ProbesConfig) -> Result<Self, ProbesError> {
        let offsets = sockets::resolve_offsets(&kernel.tracefs, &kernel.btf)?;
        let process_offsets = processes::resolve_offsets(&kernel.tracefs)?;
        let state_offsets = state::resolve_offsets(&kernel.tracefs)?;
        let resource_offsets = resources::resolve_offsets(&kernel.tracefs, &kernel.btf)?;
        tracing::debug!(
            ?offsets,
            ?process_offsets,
            ?state_offsets,
            "resolved offsets"
        );
        let mut ebpf = EbpfLoader::new()
            .override_global(SOCKET_OFFSETS_GLOBAL, &offsets, true)
            .override_global(PROCESS_OFFSETS_GLOBAL, &process_offsets, true)
            .override_global(STATE_OFFSETS_GLOBAL, &state_offsets, true)
            .override_global(RESOURCE_OFFSETS_GLOBAL, &resource_offsets, true)
            .map_max_entries(LISTENERS_MAP, config.listeners_capacity)
            .map_max_entries(WATCHED_MAP, config.listeners_capacity)
            .map_max_entries(CONNECTIONS_MAP, config.connections_capacity)
            .load(EBPF_OBJECT)
            .map_err(|e| ProbesError::Load(Box::new(e)))?;

        spawn_kernel_log(&mut ebpf)?;

        let btf = aya::Btf::from_sys_fs().map_err(|e| ProbesError::KernelBtf(Box::new(e)))?;
        let mut attached = Vec::new();
        for program in Program::ALL {
            attached.push(attach(&mut ebpf, &btf, program)?);
        }

        let mut sockets = sockets::SocketsReader::take(&mut ebpf)?;
        sockets.set_watch_all(config.watch_all_listeners)?;
        let broker_pids = processes::BrokerPids::take(&mut ebpf)?;
        let resources = resources::ResourcesReader::take(&mut ebpf)?;
        let process_events = Some(processes::spawn_reader(&mut ebpf)?);
        let state_events = Some(state::spawn_reader(&mut ebpf)?);
        let events = take_per_cpu_array(&mut ebpf, PROBE_EVENTS_MAP)?;
        let errors = take_per_cpu_array(&mut ebpf, PROBE_ERRORS_MAP)?;
        Ok(Self {
            sockets,
            resources,
            events,
            errors,
            attached,
            capacities: config.clone(),
            namespaces: netns::Namespaces::default(),
            broker_pids,
            process_events,
            state_events,
            ebpf,
        })
    }

    pub fn attached(&self) -> &[Attachment] {
        &self.attached
    }

    /// The exec/exit event stream for discovery; `None` once taken.
    pub fn take_process_events(
        &mut self,
    ) -> Option<tokio::sync::mpsc::Receiver<processes::ProcessSignal>> {
        self.process_events.take()
    }

    /// The brokers' open/SIGTERM event stream for the state tracker; `None` once taken.
    pub fn take_state_events(&mut self) -> Option<tokio::sync::mpsc::Receiver<state::StateSignal>> {
        self.state_events.take()
    }

    /// Count exactly these (netns, port) listeners (brokers'), besides watch-all mode.
    pub fn set_watched(&mut self, listeners: &[(u32, u16)]) -> Result<(), ProbesError> {
        self.sockets.set_watched(listeners)
    }

    /// Tells the kernel which pids are brokers, so their exits are reported.
    pub fn set_broker_pids(&mut self, pids: &[u32]) -> Result<(), ProbesError> {
        self.resources.retain(pids);
        self.broker_pids.set(pids)
    }

    /// Never count this listener (the agent's own endpoint).
    pub fn ignore_listener(&mut self, netns: u32, port: u16) -> Result<(), ProbesError> {
        self.sockets.ignore(netns, port)
    }

    /// Reads every map, and the live sockets of every watched namespace through the iterator.
    /// `pid_hints` are processes known to live in namespaces of interest (brokers).
    pub fn snapshot(&mut self, pid_hints: &[u32]) -> ProbeSnapshot {
        let live = self.read_live(pid_hints);
        let listeners = self.sockets.read(&live);
        let tracked: u64 = listeners.iter().map(|l| l.counters.active()).sum();
        let programs = Program::ALL
            .iter()
            .map(|&program| ProgramStats {
                program: program.name(),
                events: sum_per_cpu(&self.events, program as u32),
                run_time: self.run_time(program),
            })
            .collect();
        let errors = ProbeError::ALL
            .iter()
            .map(|&e| (e.label(), sum_per_cpu(&self.errors, e as u32)))
            .collect();
        let resources = self.resources.read();
        let mut maps = vec![
            MapStats {
                map: "listeners",
                entries: listeners.len() as u64,
                capacity: self.capacities.listeners_capacity,
            },
            // Every tracked connection is one entry, and is exactly accepted - closed -
            // untracked summed over listeners: no need to walk a map of 64k entries per scrape.
            MapStats {
                map: "connections",
                entries: tracked,
                capacity: self.capacities.connections_capacity,
            },
        ];
        maps.extend(self.resources.map_stats(resources.len()));
        ProbeSnapshot {
            listeners,
            programs,
            errors,
            maps,
            resources,
        }
    }

    /// Runs the live-socket iterator once inside each namespace that has a watched listener.
    fn read_live(&mut self, pid_hints: &[u32]) -> sockets::Live {
        let namespaces = self.sockets.watched_namespaces();
        let handles = self.namespaces.resolve(&namespaces, pid_hints);
        tracing::debug!(
            ?namespaces,
            handles = handles.len(),
            "iterating live sockets"
        );
        let Some(prog) = self.ebpf.program_mut(Program::TcpLive.name()) else {
            return sockets::Live::default();
        };
        let Ok(prog) = <&mut Iter>::try_from(prog) else {
            return sockets::Live::default();
        };
        let mut live = sockets::Live::default();
        for (inode, handle) in handles {
            match sockets::iterate_in(prog, &handle, self.capacities.max_live_records()) {
                Ok(records) => {
                    tracing::debug!(netns = inode, records = records.len(), "live sockets read");
                    live.add(&records)
                }
                Err(e) => {
                    tracing::warn!(netns = inode, error = %e, "cannot read live sockets");
                    live.failed.push(inode);
                }
            }
        }
        live
    }

    fn run_time(&self, program: Program) -> Duration {
        let info = self
            .ebpf
            .program(program.name())
            .and_then(|p| p.info().ok());
        info.map(|i| i.run_time()).unwrap_or_default()
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        let ids: Vec<u32> = self.attached.iter().map(|a| a.id).collect();
        tracing::info!(?ids, "detaching and unloading kernel programs");
    }
}

fn attach(ebpf: &mut Ebpf, btf: &aya::Btf, program: Program) -> Result<Attachment, ProbesError> {
    let (name, hook) = (program.name(), program.hook());
    let err = |source| ProbesError::Program {
        program: name,
        hook,
        source: Box::new(source),
    };
    let prog = ebpf.program_mut(name).ok_or(ProbesError::Missing {
        kind: "program",
        name,
    })?;
    if let Some(tracepoint) = program.raw_tracepoint() {
        let prog: &mut RawTracePoint = prog.try_into().map_err(err)?;
        prog.load().map_err(err)?;
        prog.attach(tracepoint).map_err(err)?;
        let id = prog.info().map_err(err)?.id();
        tracing::info!(program = name, hook, id, "attached");
        return Ok(Attachment {
            program: name,
            hook,
            id,
        });
    }
    let id = match program.tracepoint() {
        Some((category, tracepoint)) => {
            let prog: &mut TracePoint = prog.try_into().map_err(err)?;
            prog.load().map_err(err)?;
            prog.attach(category, tracepoint).map_err(err)?;
            prog.info().map_err(err)?.id()
        }
        None => {
            // The iterator is loaded now and instantiated per scrape, inside each namespace.
            let prog: &mut Iter = prog.try_into().map_err(err)?;
            prog.load("tcp", btf).map_err(err)?;
            prog.info().map_err(err)?.id()
        }
    };
    tracing::info!(program = name, hook, id, "attached");
    Ok(Attachment {
        program: name,
        hook,
        id,
    })
}

fn take_per_cpu_array(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<PerCpuArray<MapData, u64>, ProbesError> {
    let map = ebpf
        .take_map(name)
        .ok_or(ProbesError::Missing { kind: "map", name })?;
    PerCpuArray::try_from(map).map_err(|e| ProbesError::Map {
        name,
        source: Box::new(e),
    })
}

fn sum_per_cpu(array: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    array
        .get(&index, 0)
        .map(|values| values.iter().sum())
        .unwrap_or(0)
}

fn read_file(path: &Path) -> Result<Vec<u8>, ProbesError> {
    std::fs::read(path).map_err(|source| ProbesError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Forwards the kernel side's aya-log records into the agent's own log, target `kernel`.
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        match record.level() {
            log::Level::Error => tracing::error!(target: "kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "kernel", "{message}"),
            log::Level::Debug => tracing::debug!(target: "kernel", "{message}"),
            log::Level::Trace => tracing::trace!(target: "kernel", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Starts the task that drains the kernel log ring. The logger must outlive the programs
/// (dropping it closes the ring's map), so the task owns it for the life of the runtime.
fn spawn_kernel_log(ebpf: &mut Ebpf) -> Result<(), ProbesError> {
    let logger =
        aya_log::EbpfLogger::init_with_logger(ebpf, KernelLog).map_err(ProbesError::Log)?;
    let fd = logger.as_raw_fd();
    tracing::debug!(fd, "kernel log ring open");
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the same for as long as
    // the logger lives, and the AsyncFd owns the logger.
    let mut logger =
        unsafe { AsyncFd::register(logger) }.map_err(|e| ProbesError::LogFd(e.into_parts().1))?;
    tokio::spawn(async move {
        loop {
            let mut guard = match logger.readable_mut().await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::warn!(error = %e, "kernel log reader stopped");
                    return;
                }
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
