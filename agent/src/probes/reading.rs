//! Reading the probes at one instant: the snapshot of every map and program the model asks
//! for, and the walks of the open sockets behind it.

use std::{os::fd::AsFd as _, time::Duration};

use aya::programs::Iter;
use brokerscope_common::{
    sockets::{CONNECTIONS_SPILL_MAP, connection_tiers},
    telemetry::{ProbeError, Program},
};

use super::{
    Probes, live,
    maps::per_cpu_sums,
    snapshot::{ProbeSnapshot, ProgramStats, WalkStats},
    status::MapStats,
    sys::sys_bpf,
};

impl Probes {
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
