//! Loads the embedded kernel programs, attaches them, and reads their maps.
//!
//! Owns every kernel object the agent creates: dropping [`Probes`] detaches and unloads them all.
//! Nothing outside this module touches a map; the model asks for a [`ProbeSnapshot`].
//!
//! This file holds [`Probes`] itself (its fields, `load`, the setters); the load's steps are in
//! `loader`, `offsets` and `kernel_log`, the attachment in `attach`, the programs' status at run
//! time in `programs`, and the reads in `reading` and `snapshot`.

mod attach;
mod batch;
mod btf;
#[cfg(test)]
mod captured;
mod coverage;
mod error;
mod fields;
mod kernel_log;
pub mod lacks;
pub mod live;
mod loader;
mod map_iter;
mod maps;
pub mod netns;
mod offsets;
pub mod pins;
pub mod processes;
mod programs;
mod reading;
mod records;
pub mod resources;
pub mod runs;
mod snapshot;
pub mod sockets;
pub mod sockets_events;
pub mod state;
mod status;
mod sys;
mod tracefs;

use std::time::Duration;

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use brokerscope_common::{
    sockets::{CONN_EVENTS_MAP, connection_tiers},
    telemetry::{PROBE_ERRORS_MAP, PROBE_EVENTS_MAP, Program},
};

use crate::{config::ProbesConfig, kernel::KernelFacts};
pub use coverage::{Demand, FsyncCover};
pub use error::{ProbesError, is_permission_error};
use kernel_log::spawn_kernel_log;
use loader::{load_object, log_pins, object_and_refusals};
use maps::{take_per_cpu_array, take_ring};
pub use offsets::Offsets;
use pins::Held;
pub use snapshot::{ProbeSnapshot, WalkStats};
pub use status::MapStats;
// Only tests name it; the snapshot carries it.
#[cfg(test)]
pub use snapshot::ProgramStats;
use status::OnStandby;
pub use status::{Attachment, Degraded};

/// The loaded and attached kernel side.
pub struct Probes {
    // Field order is drop order: readers close their map fds before the programs go.
    sockets: sockets::SocketsReader,
    resources: resources::ResourcesReader,
    events: PerCpuArray<MapData, u64>,
    errors: PerCpuArray<MapData, u64>,
    /// The same two, read whole.
    events_batch: batch::Batched<u32, u64>,
    errors_batch: batch::Batched<u32, u64>,
    attached: Vec<Attachment>,
    degraded: Vec<Degraded>,
    standby: Vec<OnStandby>,
    /// The map iterators that read open connections and listeners at scrape time, with the
    /// map each walks.
    map_iters: Vec<(Program, &'static str, map_iter::MapIter)>,
    /// The last walk of the open sockets, and where walks run.
    walks: live::Walks,
    capacities: ProbesConfig,
    /// Where tracefs is, to see a tracepoint appear.
    tracefs: std::path::PathBuf,
    namespaces: netns::Namespaces,
    broker_pids: processes::BrokerPids,
    process_events: Option<tokio::sync::mpsc::Receiver<processes::ProcessSignal>>,
    conn_events: Option<aya::maps::RingBuf<MapData>>,
    state_events: Option<tokio::sync::mpsc::Receiver<state::StateSignal>>,
    /// The hooks' links (standby ones are in `standby`): dropped, they detach unless pinned.
    held: Vec<(Program, Held)>,
    /// Programs an earlier agent attached (adopted with their pinned links), for their run
    /// statistics.
    adopted_fds: Vec<(Program, std::os::fd::OwnedFd)>,
    pins: Option<pins::Pins>,
    /// Since when the kernel counters count (their maps' creation; earlier than this agent's
    /// start when they were adopted).
    counting_since: std::time::SystemTime,
    /// The agent's records kept with the maps (see `brokerscope_common::records`).
    broker_records: records::BrokerRecords,
    ebpf: Ebpf,
}

impl Probes {
    /// Resolves offsets from the running kernel, loads the object with the configured map
    /// capacities and attaches every program.
    pub fn load(kernel: &KernelFacts, config: &ProbesConfig) -> Result<Self, ProbesError> {
        let (all, lacks, patched) = loader::resolve_for(kernel)?;
        let (object, refusals) = object_and_refusals(&patched);
        let (mut ebpf, pins) = load_object(object, &all, config)?;
        drop(patched);
        let adopting = pins.as_ref().is_some_and(pins::Pins::adopted);
        let counting_since = records::counting_since(&mut ebpf, adopting)?;
        if let Some(pins) = &pins {
            log_pins(pins, adopting, counting_since);
        }
        spawn_kernel_log(&mut ebpf)?;

        let btf = aya::Btf::from_sys_fs().map_err(|e| ProbesError::KernelBtf(Box::new(e)))?;
        let attach::Hooks {
            attached,
            degraded,
            standby,
            map_iters,
            held,
            adopted_fds,
        } = attach::attach_all(&mut ebpf, &btf, config, pins.as_ref(), &lacks, &refusals);
        let events_attached =
            |p: Program| attached.iter().any(|a: &Attachment| a.program == p.name());
        let exec_events = events_attached(Program::ProcessExec)
            && (events_attached(Program::ProcessExitBtf) || events_attached(Program::ProcessExit));

        let release_after = Duration::from_secs(config.listener_release_seconds);
        let mut sockets = sockets::SocketsReader::take(&mut ebpf, release_after)?;
        let mut broker_pids = processes::BrokerPids::take(&mut ebpf)?;
        let mut resources = resources::ResourcesReader::take(&mut ebpf)?;
        if adopting {
            // What the earlier agent wrote is the truth to continue from.
            sockets.adopt()?;
            broker_pids.adopt();
            resources.adopt();
        }
        sockets.set_watch_all(config.watch_all_listeners)?;
        sockets.set_spill(connection_tiers(config.connections_capacity).1 > 0)?;
        let broker_records = records::BrokerRecords::take(&mut ebpf)?;
        // Without both exec and exit events, discovery polls instead.
        let process_events = if exec_events {
            Some(processes::spawn_reader(&mut ebpf)?)
        } else {
            None
        };
        let conn_events = Some(take_ring(&mut ebpf, CONN_EVENTS_MAP)?);
        let state_events = Some(state::spawn_reader(&mut ebpf)?);
        let events_batch = batch::Batched::per_cpu(&ebpf, PROBE_EVENTS_MAP)?;
        let errors_batch = batch::Batched::per_cpu(&ebpf, PROBE_ERRORS_MAP)?;
        let events = take_per_cpu_array(&mut ebpf, PROBE_EVENTS_MAP)?;
        let errors = take_per_cpu_array(&mut ebpf, PROBE_ERRORS_MAP)?;
        Ok(Self {
            sockets,
            resources,
            events,
            errors,
            events_batch,
            errors_batch,
            attached,
            degraded,
            standby,
            map_iters,
            walks: live::Walks::default(),
            capacities: config.clone(),
            tracefs: kernel.tracefs.clone(),
            namespaces: netns::Namespaces::default(),
            broker_pids,
            process_events,
            conn_events,
            state_events,
            held,
            adopted_fds,
            pins,
            counting_since,
            broker_records,
            ebpf,
        })
    }

    /// The broker records kept with the maps (discovery's, see `discovery::table`): what an
    /// earlier agent left, until replaced.
    pub fn broker_records(&self) -> Vec<u8> {
        self.broker_records.read()
    }

    /// Keeps `records` with the maps, if they changed.
    pub fn set_broker_records(&mut self, records: &[u8]) {
        if let Err(e) = self.broker_records.write(records) {
            tracing::warn!(error = %e, "broker records not kept: a restarted agent counts these brokers' restarts anew");
        }
    }

    /// The kernel's connection event ring, once (see [`sockets_events`]).
    pub fn take_conn_events(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.conn_events.take()
    }

    /// Turns the kernel's connection events on or off (on while someone subscribes).
    pub fn set_conn_events(&mut self, on: bool) -> Result<(), ProbesError> {
        self.sockets.set_events(on)
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
    /// `probes.watch_all_listeners`, live.
    pub fn set_watch_all(&mut self, on: bool) -> Result<(), ProbesError> {
        self.sockets.set_watch_all(on)
    }

    pub fn set_broker_pids(&mut self, pids: &[u32]) -> Result<(), ProbesError> {
        self.resources.retain(pids);
        self.broker_pids.set(pids)
    }

    /// Never count this listener (the agent's own endpoint).
    pub fn ignore_listener(&mut self, netns: u32, port: u16) -> Result<(), ProbesError> {
        self.sockets.ignore(netns, port)
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        let ids: Vec<u32> = self.attached.iter().map(|a| a.id).collect();
        match &self.pins {
            Some(pins) => tracing::info!(
                ?ids,
                dir = %pins.dir().display(),
                "kernel programs stay attached and counting (pinned): the next agent adopts \
                 them; `brokerscope cleanup` removes them"
            ),
            None => tracing::info!(?ids, "detaching and unloading kernel programs"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_says_what_covers_for_it() {
        for p in Program::ALL {
            let d = Degraded {
                program: p,
                error: "EPERM".into(),
                verifier_log: None,
            };
            let line = d.describe();
            assert!(!line.contains("no fallback"), "{line}");
            assert!(
                line.starts_with(&format!("{} ({}) not attached: ", p.name(), p.hook())),
                "{line}"
            );
            assert!(line.ends_with("; EPERM"), "{line}");
        }
    }
}
