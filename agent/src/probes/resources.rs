//! Resources (kernel side: agent-ebpf/src/resources.rs): reads the per-broker counters and the
//! fill of the maps behind them.

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use brokerscope_common::resources::{
    BLOCK_CAPACITY, BLOCK_MAP, BROKER_SLOTS_MAP, BlockKey, BlockStart, EVICTIONS_MAP,
    FSYNC_CAPACITY, FSYNC_MAP, IoCounters, RESOURCES_CAPACITY, RESOURCES_MAP, ResourceCounters,
    ResourceOffsets, SCHED_CAPACITY, SCHED_MAP, SchedCounters, THREADS_CAPACITY, THREADS_MAP,
    ThreadState,
};

use brokerscope_common::telemetry::Program;

use super::{
    batch::Batched,
    btf::Btf,
    error::ProbesError,
    lacks::Lacks,
    maps::{sum_per_cpu, take_map as take},
    status::MapStats,
    tracefs::Format,
};

/// The scheduler programs' `task_struct` members and the block request records' fields.
pub fn resolve_offsets(
    read: impl Fn(&str, &str) -> Format,
    btf: &Btf,
    lacks: &mut Lacks,
) -> ResourceOffsets {
    use Program::{BlockComplete, BlockIssue, SchedSwitch, SchedSwitchBtf};
    let sched = &[SchedSwitch, SchedSwitchBtf];
    let issue = read("block", "block_rq_issue");
    let insert = read("block", "block_rq_insert");
    let complete = read("block", "block_rq_complete");
    let task = |path: &[&str]| btf.offset_of("task_struct", path);
    // The insert program reads its record with the issue record's offsets (one event class,
    // `block_rq`): it runs only where the two agree.
    let same = |name: &str, size: u32| match (insert.field(name, size), issue.field(name, size)) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Err(e), _) => Err(e.to_string()),
        _ => Err(format!(
            "block:block_rq_insert's `{name}` is not where block:block_rq_issue has it"
        )),
    };
    let rwbs_size = if issue.field("rwbs", 10).is_ok() {
        10
    } else {
        8
    };
    if let Err(why) = same("dev", 4)
        .and(same("sector", 8))
        .and(same("bytes", 4))
        .and(same("rwbs", rwbs_size))
    {
        lacks.charge(&[Program::BlockInsert], why);
    }
    ResourceOffsets {
        task_state: lacks.offset(sched, task(&["__state"]).or_else(|_| task(&["state"]))),
        task_sum_exec: lacks.offset(sched, task(&["se", "sum_exec_runtime"])),
        task_prev_sum_exec: lacks.offset(sched, task(&["se", "prev_sum_exec_runtime"])),
        issue_dev: lacks.offset(&[BlockIssue], issue.field("dev", 4)),
        issue_sector: lacks.offset(&[BlockIssue], issue.field("sector", 8)),
        issue_bytes: lacks.offset(&[BlockIssue], issue.field("bytes", 4)),
        // RWBS_LEN grew from 8 to 10 in Linux 6.8.
        issue_rwbs: lacks.offset(
            &[BlockIssue],
            issue.field("rwbs", 10).or_else(|_| issue.field("rwbs", 8)),
        ),
        complete_dev: lacks.offset(&[BlockComplete], complete.field("dev", 4)),
        complete_sector: lacks.offset(&[BlockComplete], complete.field("sector", 8)),
        // Without CONFIG_SCHED_INFO, run-queue latency is not measured; the rest is.
        task_run_delay: Lacks::optional(task(&["sched_info", "run_delay"])),
        task_flags: lacks.offset(sched, task(&["flags"])),
    }
}

/// The kernel's per-broker resource counters.
pub struct ResourcesReader {
    counters: HashMap<MapData, u32, IoCounters>,
    sched: PerCpuArray<MapData, SchedCounters>,
    broker_slots: HashMap<MapData, u32, u32>,
    /// The broker tgid owning each SCHED slot (0: free), as written to the kernel.
    owners: Vec<u32>,
    /// Possible CPUs: values per SCHED slot.
    cpus: usize,
    threads: Array<MapData, ThreadState>,
    evictions: PerCpuArray<MapData, u64>,
    // The LRU maps read through aya's HashMap (same lookup API).
    block: HashMap<MapData, BlockKey, BlockStart>,
    fsync: HashMap<MapData, u32, u64>,
    /// The same maps, read whole.
    batched: BatchedMaps,
    /// Entries of the thread, block and fsync maps, and when they were counted.
    counted: Option<(std::time::Instant, [u64; 3])>,
}

/// What [`ResourcesReader::read`] found.
pub struct Resources {
    /// By tgid, sorted.
    pub counters: Vec<(u32, ResourceCounters)>,
    /// Entries of the I/O map and of the per-CPU scheduler map.
    io_entries: u64,
    sched_entries: u64,
}

/// How long entry counts of the per-thread and in-flight maps are reused: counting walks every
/// bucket of maps of up to 16384 entries, a gauge of how full they are does not need it at
/// every scrape.
const COUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

struct BatchedMaps {
    counters: Batched<u32, IoCounters>,
    threads: Batched<u32, ThreadState>,
    block: Batched<BlockKey, BlockStart>,
    fsync: Batched<u32, u64>,
}

impl ResourcesReader {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, ProbesError> {
        let batched = BatchedMaps {
            counters: Batched::open(ebpf, RESOURCES_MAP)?,
            threads: Batched::open(ebpf, THREADS_MAP)?,
            block: Batched::open(ebpf, BLOCK_MAP)?,
            fsync: Batched::open(ebpf, FSYNC_MAP)?,
        };
        Ok(Self {
            batched,
            counted: None,
            counters: take(ebpf, RESOURCES_MAP)?,
            sched: take(ebpf, SCHED_MAP)?,
            broker_slots: take(ebpf, BROKER_SLOTS_MAP)?,
            owners: vec![0; SCHED_CAPACITY as usize],
            cpus: aya::util::nr_cpus().map_err(|(what, source)| ProbesError::Read {
                path: what.to_string(),
                source,
            })?,
            threads: take(ebpf, THREADS_MAP)?,
            evictions: take(ebpf, EVICTIONS_MAP)?,
            block: take(ebpf, BLOCK_MAP)?,
            fsync: take(ebpf, FSYNC_MAP)?,
        })
    }

    /// Takes over the scheduler slots an earlier agent gave (its counters continue in them).
    pub fn adopt(&mut self) {
        for (pid, slot) in self.broker_slots.iter().filter_map(Result::ok) {
            if let Some(owner) = self.owners.get_mut(slot as usize) {
                *owner = pid;
            }
        }
    }

    /// Counters of every broker process the kernel saw, by tgid: the I/O counters and the
    /// scheduler counters summed over CPUs.
    pub fn read(&self) -> Resources {
        let io: Vec<(u32, IoCounters)> = self
            .batched
            .counters
            .read_single()
            .unwrap_or_else(|_| self.counters.iter().filter_map(Result::ok).collect());
        // A lookup per broker's slot: a node has a few, and the array holds SCHED_CAPACITY.
        let sched: Vec<(u32, SchedCounters)> = (0..SCHED_CAPACITY)
            .zip(&self.owners)
            .filter(|&(_, &owner)| owner != 0)
            .filter_map(|(slot, &owner)| {
                let per_cpu = self.sched.get(&slot, 0).ok()?;
                Some((owner, sum(per_cpu.iter())))
            })
            .collect();
        let (io_entries, sched_entries) = (io.len() as u64, sched.len() as u64);
        let mut by_tgid = std::collections::BTreeMap::new();
        for (tgid, s) in sched {
            by_tgid.entry(tgid).or_insert(ResourceCounters::ZERO).sched = s;
        }
        for (tgid, i) in io {
            by_tgid.entry(tgid).or_insert(ResourceCounters::ZERO).io = i;
        }
        Resources {
            counters: by_tgid.into_iter().collect(),
            io_entries,
            sched_entries,
        }
    }

    /// Forgets processes that are no longer brokers (exited): their counters end with them. Gives
    /// each new broker a scheduler slot, to be called before the kernel is told it is a broker.
    pub fn retain(&mut self, pids: &[u32]) {
        self.assign_slots(pids);
        let gone: Vec<u32> = self
            .counters
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !pids.contains(p))
            .collect();
        for pid in gone {
            let _ = self.counters.remove(&pid);
        }
    }

    /// Frees the scheduler slots of processes not in `pids` (zeroed, so the slot's next broker
    /// starts from nothing) and gives a free one to each broker in `pids` without one. A broker
    /// left without (more than SCHED_CAPACITY) is counted by the kernel as `resources_map_full`.
    fn assign_slots(&mut self, pids: &[u32]) {
        for slot in 0..SCHED_CAPACITY {
            let owner = self.owners[slot as usize];
            if owner != 0 && !pids.contains(&owner) {
                let _ = self.broker_slots.remove(&owner);
                if let Err(e) = self.write_slot(slot, 0) {
                    tracing::warn!(slot, error = %e, "cannot clear a scheduler slot");
                }
                self.owners[slot as usize] = 0;
            }
        }
        for &pid in pids {
            if pid == 0 || self.owners.contains(&pid) {
                continue;
            }
            let Some(slot) = self.owners.iter().position(|&o| o == 0) else {
                tracing::warn!(
                    pid,
                    "every scheduler slot is taken: not counting this broker"
                );
                return;
            };
            let slot = slot as u32;
            let taken = self
                .write_slot(slot, pid)
                .and_then(|()| self.broker_slots.insert(pid, slot, 0));
            match taken {
                Ok(()) => self.owners[slot as usize] = pid,
                Err(e) => tracing::warn!(pid, slot, error = %e, "cannot give a scheduler slot"),
            }
        }
    }

    /// Zero counters owned by `owner` on every CPU of SCHED slot `slot`.
    fn write_slot(&mut self, slot: u32, owner: u32) -> Result<(), aya::maps::MapError> {
        let value = SchedCounters {
            owner,
            ..SchedCounters::ZERO
        };
        let values = aya::maps::PerCpuValues::try_from(vec![value; self.cpus])?;
        self.sched.set(slot, values, 0)
    }

    /// Fill levels; those of the per-broker maps from `read`, just made.
    pub fn map_stats(&mut self, read: &Resources) -> Vec<MapStats> {
        let (resources, sched) = (read.io_entries, read.sched_entries);
        let [threads, block, fsync] = match self.counted {
            Some((at, counts)) if at.elapsed() < COUNT_EVERY => counts,
            _ => {
                let counts = [
                    self.threads_taken(),
                    count(&self.batched.block, &self.block),
                    count(&self.batched.fsync, &self.fsync),
                ];
                self.counted = Some((std::time::Instant::now(), counts));
                counts
            }
        };
        vec![
            MapStats {
                map: "resources",
                entries: resources,
                capacity: RESOURCES_CAPACITY,
                evictions: None,
            },
            MapStats {
                map: "sched",
                entries: sched,
                capacity: SCHED_CAPACITY,
                evictions: None,
            },
            MapStats {
                map: "threads",
                entries: threads,
                capacity: THREADS_CAPACITY,
                evictions: Some(sum_per_cpu(&self.evictions, 0)),
            },
            MapStats {
                map: "block_inflight",
                entries: block,
                capacity: BLOCK_CAPACITY,
                evictions: None,
            },
            MapStats {
                map: "fsync_inflight",
                entries: fsync,
                capacity: FSYNC_CAPACITY,
                evictions: None,
            },
        ]
    }

    /// Slots of the per-thread array that belong to a thread: one batch read, or a lookup per
    /// slot where the kernel cannot batch.
    fn threads_taken(&self) -> u64 {
        let taken = |state: &ThreadState| state.tid != 0;
        match self.batched.threads.read_single() {
            Ok(slots) => slots.iter().filter(|(_, s)| taken(s)).count() as u64,
            Err(_) => self
                .threads
                .iter()
                .filter_map(Result::ok)
                .filter(taken)
                .count() as u64,
        }
    }
}

/// Per-CPU values summed.
fn sum<'a>(per_cpu: impl Iterator<Item = &'a SchedCounters>) -> SchedCounters {
    let mut total = SchedCounters::ZERO;
    for c in per_cpu {
        total.add(c);
    }
    total
}

/// Entries of a map: one batch read, or a walk of its keys where the kernel cannot batch.
fn count<K: aya::Pod, V: aya::Pod>(batched: &Batched<K, V>, map: &HashMap<MapData, K, V>) -> u64 {
    batched
        .count()
        .unwrap_or_else(|_| map.keys().count() as u64)
}
