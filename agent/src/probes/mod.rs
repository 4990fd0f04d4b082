//! Loads the embedded kernel programs, attaches them, and reads their maps.
//!
//! Owns every kernel object the agent creates: dropping [`Probes`] detaches and unloads them all.
//! Nothing outside this module touches a map; the model asks for a [`ProbeSnapshot`].

mod attach;
mod batch;
mod btf;
#[cfg(test)]
mod captured;
mod error;
mod fields;
pub mod lacks;
pub mod live;
mod map_iter;
mod maps;
pub mod netns;
pub mod pins;
pub mod processes;
mod records;
pub mod resources;
pub mod runs;
pub mod sockets;
pub mod sockets_events;
pub mod state;
mod status;
mod sys;
mod tracefs;

use std::{
    os::fd::{AsFd as _, AsRawFd},
    path::Path,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray},
    programs::{Iter, TracePoint},
};
use brokerscope_common::{
    processes::PROCESS_OFFSETS_GLOBAL,
    records::SLOT_KEYS_MAP,
    resources::RESOURCE_OFFSETS_GLOBAL,
    sockets::{
        CONN_BUCKETS_GLOBAL, CONN_EVENTS_MAP, CONN_STATES_MAP, CONN_WAYS, CONNECTIONS_MAP,
        CONNECTIONS_SPILL_MAP, EVENT_OFFSETS_GLOBAL, LISTEN_SOCKS_MAP, LISTENERS_AUTO_MAP,
        LISTENERS_MAP, SOCKET_OFFSETS_GLOBAL, WATCHED_MAP, connection_tiers,
    },
    state::STATE_OFFSETS_GLOBAL,
    telemetry::{Capability, PROBE_ERRORS_MAP, PROBE_EVENTS_MAP, ProbeError, Program, Standby},
};
use tokio::io::unix::AsyncFd;

use crate::{config::ProbesConfig, kernel::KernelFacts};
use attach::pin_held;
pub use error::{ProbesError, is_permission_error};
use maps::{per_cpu_sums, read_file, take_per_cpu_array, take_ring};
use pins::Held;
use status::OnStandby;
pub use status::{Attachment, Degraded, MapStats};
use sys::sys_bpf;

/// The kernel programs, built by build.rs (aya-build) and embedded in the binary.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/brokerscope-ebpf"));

/// Every offset the programs are loaded with, resolved from one kernel's tracefs and BTF.
#[derive(Clone, Copy, Debug)]
pub struct Offsets {
    pub sockets: brokerscope_common::sockets::SocketOffsets,
    pub processes: brokerscope_common::processes::ProcessOffsets,
    pub events: brokerscope_common::sockets::EventOffsets,
    pub state: brokerscope_common::state::StateOffsets,
    pub resources: brokerscope_common::resources::ResourceOffsets,
}

impl Offsets {
    /// Resolves every offset, with the tracepoint formats from `read` (this kernel's tracefs,
    /// or a captured kernel's in the tests), and what the kernel lacks, by program.
    pub fn resolve(
        read: impl Fn(&str, &str) -> tracefs::Format + Copy,
        btf: &btf::Btf,
    ) -> (Self, lacks::Lacks) {
        let mut lacks = lacks::Lacks::default();
        let offsets = Self {
            sockets: sockets::resolve_offsets(read, btf, &mut lacks),
            processes: processes::resolve_offsets(read, &mut lacks),
            events: sockets_events::resolve_offsets(read, btf, &mut lacks),
            state: state::resolve_offsets(read, &mut lacks),
            resources: resources::resolve_offsets(read, btf, &mut lacks),
        };
        (offsets, lacks)
    }
}

/// Which filesystems' fsyncs the attached hooks see (see [`Probes::fsync_cover`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsyncCover {
    /// The ext4 tracepoints: count and duration.
    pub ext4: bool,
    /// The XFS and Btrfs entry tracepoints: count only.
    pub xfs: bool,
    pub btrfs: bool,
}

impl FsyncCover {
    /// Whether an fsync of a file on `filesystem` (as discovery names it) is counted.
    pub fn covers(self, filesystem: &str) -> bool {
        match filesystem {
            "ext4" => self.ext4,
            "xfs" => self.xfs,
            "btrfs" => self.btrfs,
            _ => false,
        }
    }

    /// How the fsyncs of a file on `filesystem` are measured: `count+duration`, `count`, or
    /// `not measured`.
    pub fn measures(self, filesystem: &str) -> &'static str {
        if filesystem == "ext4" && self.ext4 {
            "count+duration"
        } else if self.covers(filesystem) {
            "count"
        } else {
            "not measured"
        }
    }
}

/// What the standby programs are needed for, now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// Some running broker is STARTING or in RECOVERY (see [`Standby::BrokerStarting`]).
    pub broker_starting: bool,
    /// Some running broker has a log dir the filesystem fsync hooks do not cover.
    pub fsync_uncovered: bool,
}

impl Demand {
    fn wants(self, standby: Standby) -> bool {
        match standby {
            Standby::BrokerStarting => self.broker_starting,
            Standby::FsyncUncovered => self.fsync_uncovered,
        }
    }
}

/// Per-program counters at one instant.
#[derive(Clone, Debug, Default)]
pub struct ProgramStats {
    pub program: &'static str,
    pub events: u64,
    /// From the kernel's BPF stats; zero unless `kernel.bpf_stats_enabled` is on.
    pub run_time: Duration,
    /// Runs the kernel skipped because a BPF program was already running on that CPU; None when
    /// the kernel would not say (before 5.12).
    pub misses: Option<u64>,
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
    /// Since when the kernel counters count, and whether they are pinned (survive the agent).
    pub counting_since: Option<(std::time::SystemTime, bool)>,
    /// The walk of the open sockets this snapshot's bytes and drops come from.
    pub walk: Option<WalkStats>,
}

/// The walk of the open sockets behind a snapshot (see [`live`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct WalkStats {
    /// How long it took.
    pub took: std::time::Duration,
    /// How long before the snapshot it ended.
    pub age: std::time::Duration,
    /// Whether walks run on the background thread (they cost more than a scrape should).
    pub background: bool,
}

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
        let (all, lacks, patched) = Self::resolve_for(kernel)?;
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

    /// This kernel's offsets, what it lacks by program, and the object with the BTF programs'
    /// direct loads patched to its field offsets (an error: those programs are not loaded, and
    /// their fallbacks serve).
    fn resolve_for(
        kernel: &KernelFacts,
    ) -> Result<
        (
            Offsets,
            lacks::Lacks,
            Result<fields::Object, fields::PatchError>,
        ),
        ProbesError,
    > {
        // Parsed once: a few MiB of kernel type information.
        let kernel_types = btf::Btf::parse(&read_file(&kernel.btf)?)?;
        let (all, lacks) = Offsets::resolve(
            |category: &str, name: &str| tracefs::Format::read(&kernel.tracefs, category, name),
            &kernel_types,
        );
        tracing::debug!(offsets = ?all, "resolved offsets");
        for (program, reason) in lacks.iter() {
            tracing::info!(
                program = program.name(),
                reason,
                "this kernel lacks what the program reads"
            );
        }
        let patched =
            fields::FieldOffsets::resolve(&kernel_types, &all.sockets, &all.events, &all.resources)
                .and_then(|field_offsets| {
                    tracing::debug!(cast = ?field_offsets.cast(), "socket cast to struct tcp_sock");
                    fields::patch(EBPF_OBJECT, &field_offsets)
                });
        Ok((all, lacks, patched))
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

    pub fn attached(&self) -> &[Attachment] {
        &self.attached
    }

    /// The programs on standby, loaded and attached only on demand.
    pub fn standby(&self) -> impl Iterator<Item = Program> + '_ {
        self.standby.iter().map(|s| s.program)
    }

    /// Attaches the filesystem fsync programs refused at start because their tracepoint did not
    /// exist yet (the filesystem's module was not loaded: it loads with the first mount of one),
    /// once it does. Whether any attached. Cheap while nothing waits: a `stat` per waiting
    /// program.
    pub fn attach_appeared_tracepoints(&mut self) -> bool {
        let mut attached_any = false;
        let waiting: Vec<Program> = self
            .degraded
            .iter()
            .map(|d| d.program)
            .filter(|p| p.capability() == Capability::Fsync && !p.node_wide())
            .collect();
        for program in waiting {
            let Some((category, name)) = program.tracepoint() else {
                continue;
            };
            let events = self.tracefs.join("events").join(category).join(name);
            if !events.exists() {
                continue;
            }
            let Some(Ok(prog)) = self
                .ebpf
                .program_mut(program.name())
                .map(<&mut TracePoint>::try_from)
            else {
                continue;
            };
            if prog.fd().is_err() {
                // Not loaded: refused for another reason than a missing tracepoint.
                continue;
            }
            let attached = prog
                .attach(category, name)
                .and_then(|link| prog.take_link(link))
                .and_then(|link| Ok((link, prog.info()?)))
                .map_err(|e| ProbesError::Program {
                    program: program.name(),
                    hook: program.hook(),
                    source: Box::new(e),
                })
                .and_then(|(link, info)| Ok((Held::tracepoint(link)?, info)));
            match attached {
                Ok((link, info)) => {
                    self.held
                        .push((program, pin_held(self.pins.as_ref(), program, link)));
                    tracing::info!(
                        program = program.name(),
                        hook = program.hook(),
                        id = info.id(),
                        "attached: its tracepoint appeared (filesystem module loaded)"
                    );
                    self.attached.push(Attachment {
                        program: program.name(),
                        hook: program.hook(),
                        id: info.id(),
                        scope: program.scope(),
                    });
                    self.degraded.retain(|d| d.program != program);
                    attached_any = true;
                }
                Err(e) => {
                    tracing::debug!(program = program.name(), error = %e, "still cannot attach")
                }
            }
        }
        attached_any
    }

    /// Which filesystems' fsyncs the attached hooks see.
    pub fn fsync_cover(&self) -> FsyncCover {
        let up = |programs: &[Program]| {
            programs
                .iter()
                .all(|p| self.attached.iter().any(|a| a.program == p.name()))
        };
        FsyncCover {
            ext4: up(&[Program::FsyncExt4Enter, Program::FsyncExt4Exit]),
            xfs: up(&[Program::FsyncXfs]),
            btrfs: up(&[Program::FsyncBtrfs]),
        }
    }

    /// Attaches the standby programs `demand` wants and takes the links of the others, which
    /// detach when dropped: each waits for an RCU grace period (about 75 ms here), so the caller
    /// drops them without holding anything a scrape needs. Whether anything changed, and those
    /// links. A failure is logged and leaves that program as it was (tried again next time).
    pub fn set_demand(&mut self, demand: Demand) -> (bool, Vec<Held>) {
        let mut changed = false;
        let mut detached = Vec::new();
        for s in &mut self.standby {
            let Some(kind) = s.program.standby() else {
                continue;
            };
            let want = demand.wants(kind);
            if want == s.link.is_some() {
                continue;
            }
            let (name, hook) = (s.program.name(), s.program.hook());
            let Some((category, tracepoint)) = s.program.tracepoint() else {
                continue;
            };
            let Some(Ok(prog)) = self.ebpf.program_mut(name).map(<&mut TracePoint>::try_from)
            else {
                continue;
            };
            if want {
                let attached = prog
                    .attach(category, tracepoint)
                    .and_then(|link| prog.take_link(link))
                    .map_err(|e| ProbesError::Program {
                        program: name,
                        hook,
                        source: Box::new(e),
                    })
                    .and_then(Held::tracepoint);
                match attached {
                    Ok(link) => {
                        tracing::info!(program = name, hook, reason = ?kind, "attached on demand");
                        s.link = Some(pin_held(self.pins.as_ref(), s.program, link));
                        self.attached.push(Attachment {
                            program: name,
                            hook,
                            id: s.id,
                            scope: s.program.scope(),
                        });
                        changed = true;
                    }
                    Err(e) => {
                        tracing::warn!(program = name, hook, error = %e, "cannot attach on demand")
                    }
                }
            } else if let Some(link) = s.link.take() {
                if let Some(pins) = &self.pins {
                    pins.unpin_link(s.program);
                }
                detached.push(link);
                tracing::info!(program = name, hook, "detached: no longer needed");
                self.attached.retain(|a| a.program != name);
                changed = true;
            }
        }
        (changed, detached)
    }

    /// Programs this kernel refused (or the config disabled), and what covers for them.
    pub fn degraded(&self) -> &[Degraded] {
        &self.degraded
    }

    /// Capabilities none of whose programs serves (attached or on standby): one line each,
    /// naming why each program is not there.
    pub fn missing(&self) -> Vec<String> {
        missing_capabilities(&self.degraded, |p| {
            self.attached.iter().any(|a| a.program == p.name())
                || self.standby.iter().any(|s| s.program == p)
        })
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

    /// Reads every map, with the open sockets as of the last walk when walks run in the
    /// background (see [`live`]), else walked now. `pid_hints` are processes known to live in
    /// namespaces of interest (brokers).
    pub fn snapshot(&mut self, pid_hints: &[u32]) -> ProbeSnapshot {
        // Connections in the spill tier: none means the walk need not read it.
        let spilled = self.sockets.spilled();
        if self.walks.for_scrape(std::time::Instant::now()).is_none() {
            let walk = self.begin_walk(pid_hints);
            let (walked, failed) = walk.read();
            self.finish_walk(walked, &failed);
        }
        let walked = self.walks.last();
        let listeners = self.sockets.read(&walked.bytes, &walked.drops);
        let tracked: u64 = listeners.iter().map(|l| l.counters.active()).sum();
        let events = per_cpu_sums(&self.events_batch, &self.events, Program::COUNT as usize);
        let programs = Program::ALL
            .iter()
            .map(|&program| {
                let info = self.program_info(program);
                ProgramStats {
                    program: program.name(),
                    events: events[program as usize],
                    run_time: Duration::from_nanos(info.map_or(0, |i| i.run_time_ns)),
                    misses: info.map(|i| i.recursion_misses),
                }
            })
            .collect();
        let error_counts =
            per_cpu_sums(&self.errors_batch, &self.errors, ProbeError::COUNT as usize);
        let errors = ProbeError::ALL
            .iter()
            .map(|&e| (e.label(), error_counts[e as usize]))
            .collect();
        let resources = self.resources.read();
        let (slots, auto) = self.sockets.entries();
        let mut maps = vec![
            // Listeners with a slot of their own, and those counted in the second map (see
            // `brokerscope_common::sockets::LISTENERS_AUTO_MAP`).
            MapStats {
                map: "listeners",
                entries: slots,
                capacity: self.capacities.listeners_capacity,
                evictions: None,
            },
            MapStats {
                map: "listeners_auto",
                entries: auto,
                capacity: self.capacities.listeners_capacity,
                evictions: None,
            },
            // Every tracked connection is one entry, and is exactly accepted - closed -
            // untracked summed over listeners: no need to walk a map of 64k entries per scrape.
            MapStats {
                map: "connections",
                entries: tracked,
                capacity: self.capacities.connections_capacity,
                evictions: None,
            },
            // The part of them in the second tier (see `connection_tiers`).
            MapStats {
                map: "connections_spill",
                entries: spilled.unwrap_or_default(),
                capacity: connection_tiers(self.capacities.connections_capacity).1,
                evictions: None,
            },
        ];
        maps.extend(self.resources.map_stats(&resources));
        ProbeSnapshot {
            listeners,
            programs,
            errors,
            maps,
            resources: resources.counters,
            counting_since: Some((self.counting_since, self.pins.is_some())),
            walk: self.walks.last().at.map(|at| WalkStats {
                took: self.walks.last().took,
                age: at.elapsed(),
                background: self.walks.background(),
            }),
        }
    }

    /// Whether the background thread should walk the open sockets now (see [`live`]).
    pub fn walk_due(&self) -> bool {
        self.walks.due(std::time::Instant::now())
    }

    /// The first step of a walk of the open connections and listening sockets (see [`live`]):
    /// the closed totals, then the iterator instances to read.
    ///
    /// With both map iterators: one pass over the tracked connections and one over the
    /// registered listening sockets, every namespace at once, costing what is tracked. The
    /// socket iterator then only sweeps namespaces whose listeners are new since their last
    /// sweep, adopting connections opened before and registering listening sockets: it walks
    /// the namespace's whole socket table (the node's, for namespaces without their own).
    /// Without the map iterators, the socket iterator reads every watched namespace at every
    /// walk. An empty spill tier is not read.
    pub fn begin_walk(&mut self, pid_hints: &[u32]) -> live::Walk {
        let spilled = self.sockets.spilled();
        let by_maps = [
            Program::ConnLive,
            Program::ConnSpillLive,
            Program::ListenLive,
        ]
        .iter()
        .all(|p| self.map_iters.iter().any(|(q, _, _)| q == p));
        let mut walk = live::Walk {
            closed: self.sockets.closed_bytes(),
            maps: Vec::new(),
            sweeps: Vec::new(),
            failed: Vec::new(),
            max_records: self.capacities.max_live_records(),
        };
        let namespaces = if by_maps {
            self.sockets.unswept_namespaces()
        } else {
            self.sockets.watched_namespaces()
        };
        self.open_sweeps(&namespaces, pid_hints, &mut walk);
        if by_maps {
            for (program, map, iter) in &self.map_iters {
                if *map == CONNECTIONS_SPILL_MAP && spilled == Some(0) {
                    continue;
                }
                match iter.open() {
                    Ok(file) => walk.maps.push((program.name(), file)),
                    Err(e) => tracing::warn!(program = program.name(), error = %e, "cannot read"),
                }
            }
        }
        walk
    }

    /// The last step of a walk: sweeps that failed are redone by the next, the result kept.
    pub fn finish_walk(&mut self, walked: live::Walked, failed: &[u32]) {
        self.sockets.sweep_failed(failed);
        self.walks.record(walked);
    }

    /// Opens the socket iterator inside each of `namespaces`.
    fn open_sweeps(&mut self, namespaces: &[u32], pid_hints: &[u32], walk: &mut live::Walk) {
        if namespaces.is_empty()
            || !self
                .attached
                .iter()
                .any(|a| a.program == Program::TcpLive.name())
        {
            return;
        }
        let handles = self.namespaces.resolve(namespaces, pid_hints);
        tracing::debug!(
            ?namespaces,
            handles = handles.len(),
            "iterating live sockets"
        );
        let Some(prog) = self.ebpf.program_mut(Program::TcpLive.name()) else {
            return;
        };
        let Ok(prog) = <&mut Iter>::try_from(prog) else {
            return;
        };
        live::open_sweeps(prog, handles, walk);
    }

    /// The kernel's record of a loaded program, in one call.
    fn program_info(&self, program: Program) -> Option<aya_obj::generated::bpf_prog_info> {
        if let Some((_, fd)) = self.adopted_fds.iter().find(|(p, _)| *p == program) {
            return program_info(fd.as_fd());
        }
        self.ebpf
            .program(program.name())
            .and_then(|p| p.fd().ok())
            .and_then(|fd| program_info(std::os::fd::AsFd::as_fd(fd)))
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

/// Says whether the maps and links in `pins` were adopted from an earlier agent (counting since
/// `counting_since`) or pinned afresh.
fn log_pins(pins: &pins::Pins, adopting: bool, counting_since: std::time::SystemTime) {
    if adopting {
        tracing::info!(
            dir = %pins.dir().display(),
            since = %records::rfc3339(counting_since),
            "adopting the pinned maps and links of an earlier agent: counters continue"
        );
    } else {
        tracing::info!(dir = %pins.dir().display(), "maps and links pinned: counting survives a restart");
    }
}

/// The object to load (patched, or as built if it could not be), and the BTF programs that
/// cannot run from it, each with why.
fn object_and_refusals(
    patched: &Result<fields::Object, fields::PatchError>,
) -> (&[u8], Vec<(Program, fields::PatchError)>) {
    let (object, unpatched) = match patched {
        Ok(object) => {
            tracing::debug!(
                instructions = object.patched,
                refused = ?object.refused,
                "patched direct loads"
            );
            (object.bytes(), None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "direct loads not patched: BTF programs not loaded");
            (EBPF_OBJECT, Some(e.clone()))
        }
    };
    let refusals = Program::ALL
        .into_iter()
        .filter(|p| p.btf_tracepoint().is_some())
        .filter_map(|p| match (patched, &unpatched) {
            (_, Some(e)) => Some((p, e.clone())),
            (Ok(object), None) => object.refusal(p.hook()).map(|e| (p, e.clone())),
            (Err(_), None) => None,
        })
        .collect();
    (object, refusals)
}

/// Loads `object` with this kernel's offsets and the configured capacities, its maps pinned
/// (or adopted) under the layout's pin directory when pinning is on.
fn load_object(
    object: &[u8],
    all: &Offsets,
    config: &ProbesConfig,
) -> Result<(Ebpf, Option<pins::Pins>), ProbesError> {
    let (first_tier, spill_tier) = connection_tiers(config.connections_capacity);
    let buckets = first_tier / CONN_WAYS as u32;
    // Everything that decides the maps and the programs, so only exactly these are adopted.
    let layout = pins::Layout::of(&[
        object,
        format!(
            "{buckets} {all:?} {} {}",
            config.listeners_capacity, config.connections_capacity
        )
        .as_bytes(),
    ]);
    let pins = open_pins(&config.pin_dir, layout);
    let map_paths: Vec<(String, std::path::PathBuf)> = match &pins {
        Some(pins) => pinned_maps(object)?
            .into_iter()
            .map(|name| {
                let path = pins.map_path(&name);
                (name, path)
            })
            .collect(),
        None => Vec::new(),
    };
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        loader.map_pin_path(name.as_str(), path.as_path());
    }
    let ebpf = loader
        .override_global(CONN_BUCKETS_GLOBAL, &buckets, true)
        .override_global(SOCKET_OFFSETS_GLOBAL, &all.sockets, true)
        .override_global(EVENT_OFFSETS_GLOBAL, &all.events, true)
        .override_global(PROCESS_OFFSETS_GLOBAL, &all.processes, true)
        .override_global(STATE_OFFSETS_GLOBAL, &all.state, true)
        .override_global(RESOURCE_OFFSETS_GLOBAL, &all.resources, true)
        .map_max_entries(LISTENERS_MAP, config.listeners_capacity)
        .map_max_entries(LISTENERS_AUTO_MAP, config.listeners_capacity)
        .map_max_entries(WATCHED_MAP, config.listeners_capacity)
        .map_max_entries(LISTEN_SOCKS_MAP, config.listeners_capacity)
        .map_max_entries(CONNECTIONS_MAP, buckets)
        .map_max_entries(CONN_STATES_MAP, first_tier)
        // A map cannot be empty; an unused spill tier is switched off after the load.
        .map_max_entries(CONNECTIONS_SPILL_MAP, spill_tier.max(1))
        .map_max_entries(SLOT_KEYS_MAP, config.listeners_capacity)
        .load(object)
        .map_err(|e| ProbesError::Load(Box::new(e)))?;
    Ok((ebpf, pins))
}

/// Capabilities none of whose programs `serves`, each with why its programs were refused.
fn missing_capabilities(degraded: &[Degraded], serves: impl Fn(Program) -> bool) -> Vec<String> {
    let mut missing: Vec<(Capability, Vec<String>)> = Vec::new();
    for d in degraded {
        let capability = d.program.capability();
        let programs = Program::ALL
            .into_iter()
            .filter(|p| p.capability() == capability);
        if programs.clone().any(&serves) {
            continue;
        }
        let why = format!("{}: {}", d.program.name(), d.error);
        match missing.iter_mut().find(|(c, _)| *c == capability) {
            Some((_, reasons)) => reasons.push(why),
            None => missing.push((capability, vec![why])),
        }
    }
    missing
        .into_iter()
        .map(|(c, reasons)| format!("{} ({})", c.describe(), reasons.join("; ")))
        .collect()
}

/// Opens the pin directory of `layout` under `base` (`None`: pinning is off, or the directory
/// cannot be used, which is logged: counting then starts over with each agent).
fn open_pins(base: &Path, layout: pins::Layout) -> Option<pins::Pins> {
    if base.as_os_str().is_empty() {
        tracing::info!(
            "probes.pin_dir is empty: nothing pinned, counters start over with each agent"
        );
        return None;
    }
    match pins::Pins::open(base, layout) {
        Ok(pins) => Some(pins),
        Err(e) => {
            tracing::warn!(error = %e, "maps and links not pinned: counters start over with each agent");
            None
        }
    }
}

/// The object's maps that are pinned: all but the global sections (`.rodata`, `.bss`, ...),
/// which each load fills with its own values.
fn pinned_maps(object: &[u8]) -> Result<Vec<String>, ProbesError> {
    let parsed =
        aya_obj::Object::parse(object).map_err(|e| ProbesError::Load(Box::new(e.into())))?;
    let mut names: Vec<String> = parsed
        .maps
        .into_keys()
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort_unstable();
    Ok(names)
}

/// The kernel's `bpf_prog_info` of a program, read whole: its run time and count, and
/// `recursion_misses` (Linux 5.12+), which aya does not expose: the runs the kernel skipped
/// because a BPF program was already running on that CPU. Each is an event the counters did
/// not see.
fn program_info(fd: std::os::fd::BorrowedFd<'_>) -> Option<aya_obj::generated::bpf_prog_info> {
    use std::os::fd::AsRawFd as _;
    /// `union bpf_attr` as BPF_OBJ_GET_INFO_BY_FD reads it.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: bpf_prog_info is a plain C struct of integers; all zeroes is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<aya_obj::generated::bpf_prog_info>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: the info buffer is valid for the call and sized as declared; the kernel writes
    // at most info_len bytes into it.
    let rc = unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) };
    // A filled-in info names the program: a zero id means the call did not work as expected.
    (rc.is_ok() && info.id != 0).then_some(info)
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
    crate::tasks::spawn("kernel-log", async move {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capability_is_missing_only_when_none_of_its_programs_serves() {
        let refused = |program| Degraded {
            program,
            error: "EPERM".into(),
            verifier_log: None,
        };
        let degraded = [
            refused(Program::SockStateBtf),
            refused(Program::FsyncExt4Enter),
            refused(Program::FsyncExt4Exit),
        ];
        // The raw tracepoint counts connections; nothing counts fsyncs.
        let missing = missing_capabilities(&degraded, |p| p == Program::SockStateRaw);
        assert_eq!(
            missing,
            vec![
                "fsync/fdatasync counts and latency (fsync_ext4_enter: EPERM; fsync_ext4_exit: \
                 EPERM)"
                    .to_string()
            ]
        );
        assert!(missing_capabilities(&degraded, |_| true).is_empty());
    }

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
