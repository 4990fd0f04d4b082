//! Resources: per-broker CPU, scheduling, block I/O and fsync counters from the kernel.
//!
//! The kernel side (`agent-ebpf/src/resources.rs`) counts only registered broker tgids (the
//! processes family's `BROKER_PIDS`), into [`SchedCounters`] (per CPU) and [`IoCounters`] per
//! broker process, which the loader reads as one [`ResourceCounters`]:
//! - CPU time, context switches and run-queue latency at `sched_switch` (a BTF tracepoint, or a
//!   raw one: no record is built for it, which matters on a hook that runs at every context
//!   switch of the node), from the switched-out thread alone: its ids are two loads from the
//!   task (the BTF form; the raw one asks the helper, the task being current), and a switch
//!   between two other processes' threads costs one bitmap lookup. A broker thread's state and
//!   its broker's counters are array slots the verifier inlines the lookups of: no helper call
//!   on the path (a call returns through the kernel's return thunk where speculative-return
//!   mitigations are on). CPU time is the growth of the thread's
//!   `se.sum_exec_runtime` since its last switch-out, run-queue latency that of its
//!   `sched_info.run_delay` (the time it waited runnable, woken or preempted, before the slice
//!   that just ended): the scheduler's own accounts, the ones /proc reports
//!   (`/proc/<pid>/task/<tid>/schedstat`), with no wake-up hook, and a missed switch loses
//!   nothing;
//! - block I/O bytes and latency: `block:block_rq_issue` in the issuing task's context (direct
//!   I/O and synchronous reads; page-cache writeback is issued by kernel threads and is not
//!   attributed), completed at `block:block_rq_complete`, keyed by (device, sector);
//! - fsync/fdatasync calls and latency at their syscall tracepoints.

/// Name of the hash map of block I/O and fsync counters per broker tgid ([`IoCounters`]).
pub const RESOURCES_MAP: &str = "RESOURCES";
/// Capacity of [`RESOURCES_MAP`]: one entry per broker process, as `BROKER_PIDS`.
pub const RESOURCES_CAPACITY: u32 = crate::processes::BROKER_PIDS_CAPACITY;

/// Name of the per-CPU array of scheduler counters ([`SchedCounters`]), one slot per broker
/// process: the loader gives each broker a slot ([`BROKER_SLOTS_MAP`]) before it marks the
/// broker in `BROKER_PIDS`, writing the broker's tgid as the slot's `owner` on every CPU, and
/// zeroes the slot when the process stops being a broker. An array, so `sched_switch` finds its
/// counters with a lookup the verifier inlines, where a per-CPU hash map's is a call that hashes
/// the key and walks a bucket.
pub const SCHED_MAP: &str = "SCHED";
/// Capacity of [`SCHED_MAP`]: broker processes whose CPU and scheduling are counted. Per CPU,
/// so memory is this × 248 bytes × possible CPUs (1 MB on 64 CPUs); a node runs a few
/// brokers, and a broker beyond this is counted in `resources_map_full` instead.
pub const SCHED_CAPACITY: u32 = 64;
/// Name of the hash map of each broker tgid's [`SCHED_MAP`] slot, read by `sched_switch` once
/// per thread (the slot is kept in the thread's [`ThreadState`]); capacity [`SCHED_CAPACITY`].
pub const BROKER_SLOTS_MAP: &str = "BROKER_SLOTS";
/// A [`ThreadState`] whose broker slot is not looked up yet.
pub const NO_SLOT: u32 = u32::MAX;

/// Name of the array of what the scheduler hook keeps per broker thread ([`ThreadState`]): a
/// cache of [`THREAD_WAYS`]-way sets, a thread's set chosen by its id ([`thread_set`]). Its
/// lookup is array lookups the verifier inlines, where a hash map's hashes the key and walks a
/// bucket, and taking a slot is a store, where an LRU insert takes a lock: this runs at every
/// switch-out of a broker thread.
pub const THREADS_MAP: &str = "THREADS";
/// Slots of [`THREADS_MAP`] (24 bytes each, 384 KiB): broker threads (a JVM has hundreds). A
/// thread's slot is freed when it exits. A thread whose set is full takes the last way's slot,
/// counted in [`EVICTIONS_MAP`]: the thread it took it from has its next slice counted from when
/// it got the CPU, as a new thread's, and the wait before that slice is not measured.
pub const THREADS_CAPACITY: u32 = 16384;
/// Ways of a [`THREADS_MAP`] set: a slot is taken from a live thread only when five share a set
/// (consecutive thread ids never do; ids spread at random, 1000 threads make an expected 0.02
/// such sets).
pub const THREAD_WAYS: u32 = 4;

/// The first slot of thread `tid`'s set in [`THREADS_MAP`].
#[inline(always)]
pub const fn thread_set(tid: u32) -> u32 {
    (tid & (THREADS_CAPACITY / THREAD_WAYS - 1)) * THREAD_WAYS
}

/// Name of the per-CPU array of slots taken from a live entry, by evicting map: one slot,
/// [`THREADS_MAP`]'s (the LRU maps evict silently).
pub const EVICTIONS_MAP: &str = "EVICTIONS";

/// Name of the LRU map of block requests in flight issued by brokers.
pub const BLOCK_MAP: &str = "BLOCK_INFLIGHT";
/// Capacity of [`BLOCK_MAP`]: requests in flight at once (device queue depths are ≤ 1024).
pub const BLOCK_CAPACITY: u32 = 4096;

/// Name of the LRU map of fsync/fdatasync calls in progress per broker thread id.
pub const FSYNC_MAP: &str = "FSYNC_INFLIGHT";
/// Capacity of [`FSYNC_MAP`]: broker threads inside fsync at once.
pub const FSYNC_CAPACITY: u32 = 1024;

/// Log2 buckets of latency histograms in microseconds: bucket i < 2^(i+1) µs; 2^26 µs is 67 s.
pub const LATENCY_BUCKETS: usize = 26;

/// `task_struct.__state` of a thread at its very last switch-out (`do_task_dead`): 0x80 since
/// Linux 4.14.
pub const TASK_DEAD: u32 = 0x80;

/// `task_struct.flags` bit set when a thread begins to exit (`exit_signals`, before
/// `sched_process_exit` frees its THREADS slot): its switches from then on take no slot, or a
/// switch after the exit (a preemption, a close that sleeps, the last one) would hold one for
/// good. 0x4 in every kernel.
pub const PF_EXITING: u32 = 0x4;

/// A switch the task did not ask for: it was preempted, or it was still runnable (`__state` 0,
/// e.g. a yield). A task going to sleep or blocking has a non-zero `__state` and was not preempted.
pub const fn involuntary(preempt: bool, state: u32) -> bool {
    preempt || state == 0
}

/// What `sched_switch` counts per broker process, per CPU: written by plain adds on the CPU the
/// broker's thread was switched out on, with no cache line shared between CPUs (the hook runs
/// at every switch of a broker thread), summed over CPUs by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedCounters {
    /// The broker process the slot belongs to, written by the loader (0: none); not a counter.
    pub owner: u32,
    pub _pad: u32,
    pub on_cpu_ns: u64,
    pub voluntary: u64,
    pub involuntary: u64,
    pub runq_sum_us: u64,
    pub runq: [u64; LATENCY_BUCKETS],
}

impl SchedCounters {
    pub const ZERO: SchedCounters = SchedCounters {
        owner: 0,
        _pad: 0,
        on_cpu_ns: 0,
        voluntary: 0,
        involuntary: 0,
        runq_sum_us: 0,
        runq: [0; LATENCY_BUCKETS],
    };

    /// Adds another CPU's counters (not the owner).
    pub fn add(&mut self, other: &SchedCounters) {
        self.on_cpu_ns += other.on_cpu_ns;
        self.voluntary += other.voluntary;
        self.involuntary += other.involuntary;
        self.runq_sum_us += other.runq_sum_us;
        for (a, b) in self.runq.iter_mut().zip(other.runq) {
            *a += b;
        }
    }
}

/// Block I/O and fsync counters of one broker process. Updated with atomic adds from any CPU
/// (these events are far rarer than context switches).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounters {
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub io_sum_us: u64,
    pub io: [u64; LATENCY_BUCKETS],
    pub fsyncs: u64,
    pub fsync_sum_us: u64,
    pub fsync: [u64; LATENCY_BUCKETS],
}

impl IoCounters {
    pub const ZERO: IoCounters = IoCounters {
        read_bytes: 0,
        written_bytes: 0,
        io_sum_us: 0,
        io: [0; LATENCY_BUCKETS],
        fsyncs: 0,
        fsync_sum_us: 0,
        fsync: [0; LATENCY_BUCKETS],
    };
}

/// Counters of one broker process, as the loader reads them: [`SchedCounters`] summed over
/// CPUs, and [`IoCounters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceCounters {
    pub sched: SchedCounters,
    pub io: IoCounters,
}

impl ResourceCounters {
    pub const ZERO: ResourceCounters = ResourceCounters {
        sched: SchedCounters::ZERO,
        io: IoCounters::ZERO,
    };
}

/// What the scheduler hook keeps per broker thread: one slot, taken when the thread is first
/// switched out, updated in place after, and freed when it exits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadState {
    /// The thread owning the slot (0: free; the idle task is never a broker's).
    pub tid: u32,
    /// Its broker's [`SCHED_MAP`] slot, or [`NO_SLOT`].
    pub slot: u32,
    /// Its `se.sum_exec_runtime` at its last switch-out (0: not switched out yet).
    pub last_sum_exec: u64,
    /// Its `sched_info.run_delay` at its last switch-out.
    pub last_run_delay: u64,
}

impl ThreadState {
    pub const ZERO: ThreadState = ThreadState {
        tid: 0,
        slot: NO_SLOT,
        last_sum_exec: 0,
        last_run_delay: 0,
    };
}

/// Key of a block request in flight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockKey {
    pub dev: u32,
    pub _pad: u32,
    pub sector: u64,
}

/// A block request in flight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStart {
    /// When the broker queued (`block_rq_insert`) or issued it.
    pub ts_ns: u64,
    pub tgid: u32,
    /// Its bytes were counted (at issue, when the request's size is final: bios merge into a
    /// queued request).
    pub counted: u32,
}

/// Tracepoint record offsets (tracefs) and `task_struct` fields (BTF), resolved at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceOffsets {
    /// `task_struct.__state` (`state` before 5.14).
    pub task_state: u32,
    /// `task_struct.se.sum_exec_runtime`: the scheduler's own account of the thread's CPU time.
    pub task_sum_exec: u32,
    /// `task_struct.se.prev_sum_exec_runtime`: its value when the thread last got the CPU.
    pub task_prev_sum_exec: u32,
    pub issue_dev: u32,
    pub issue_sector: u32,
    pub issue_bytes: u32,
    pub issue_rwbs: u32,
    pub complete_dev: u32,
    pub complete_sector: u32,
    /// `task_struct.sched_info.run_delay` (CONFIG_SCHED_INFO), or `NO_FIELD`: run-queue
    /// latency is then not measured.
    pub task_run_delay: u32,
    /// `task_struct.flags`.
    pub task_flags: u32,
}

impl ResourceOffsets {
    pub const UNSET: ResourceOffsets = ResourceOffsets {
        task_state: 0,
        task_sum_exec: 0,
        task_prev_sum_exec: 0,
        issue_dev: 0,
        issue_sector: 0,
        issue_bytes: 0,
        issue_rwbs: 0,
        complete_dev: 0,
        complete_sector: 0,
        task_run_delay: 0,
        task_flags: 0,
    };
}

/// Name of the global the loader writes [`ResourceOffsets`] into.
pub const RESOURCE_OFFSETS_GLOBAL: &str = "RESOURCE_OFFSETS";

/// Direction of a block request from its `rwbs` flags (`"W"`, `"WS"`, `"FWS"`, `"R"`, `"RA"`,
/// `"D"`...): 1 read, 2 write, 0 neither (flush, discard).
pub const fn rwbs_direction(rwbs: &[u8; 4]) -> u32 {
    let mut i = 0;
    while i < 4 {
        match rwbs[i] {
            b'R' => return 1,
            b'W' => return 2,
            b'D' | 0 => return 0,
            _ => {}
        }
        i += 1;
    }
    0
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], u64 fields and arrays only, no padding.
    unsafe impl aya::Pod for super::SchedCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IoCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ThreadState {}
    // SAFETY: #[repr(C)], integer fields, explicit padding.
    unsafe impl aya::Pod for super::ResourceOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlockStart {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions() {
        assert_eq!(rwbs_direction(b"W\0\0\0"), 2);
        assert_eq!(rwbs_direction(b"WS\0\0"), 2);
        assert_eq!(rwbs_direction(b"FWS\0"), 2);
        assert_eq!(rwbs_direction(b"RA\0\0"), 1);
        assert_eq!(rwbs_direction(b"F\0\0\0"), 0);
        assert_eq!(rwbs_direction(b"DS\0\0"), 0);
        assert_eq!(rwbs_direction(b"N\0\0\0"), 0);
    }

    #[test]
    fn switch_kinds() {
        assert!(involuntary(false, 0)); // runnable: yielded
        assert!(involuntary(true, 1)); // preempted while about to sleep
        assert!(!involuntary(false, 1)); // TASK_INTERRUPTIBLE: slept
        assert!(!involuntary(false, 2)); // TASK_UNINTERRUPTIBLE: blocked on I/O
    }

    #[test]
    fn per_cpu_scheduler_counters_sum() {
        let mut a = SchedCounters {
            on_cpu_ns: 5,
            voluntary: 1,
            involuntary: 2,
            runq_sum_us: 7,
            ..SchedCounters::ZERO
        };
        a.runq[3] = 1;
        let mut b = SchedCounters {
            on_cpu_ns: 10,
            voluntary: 3,
            runq_sum_us: 1,
            ..SchedCounters::ZERO
        };
        b.runq[3] = 2;
        b.runq[0] = 1;
        a.add(&b);
        assert_eq!(
            (a.on_cpu_ns, a.voluntary, a.involuntary, a.runq_sum_us),
            (15, 4, 2, 8)
        );
        assert_eq!((a.runq[0], a.runq[3]), (1, 3));
    }

    #[test]
    fn layouts() {
        assert_eq!(
            core::mem::size_of::<IoCounters>(),
            8 * (5 + 2 * LATENCY_BUCKETS)
        );
        assert_eq!(core::mem::size_of::<BlockKey>(), 16);
        assert_eq!(
            core::mem::size_of::<SchedCounters>(),
            8 * (5 + LATENCY_BUCKETS)
        );
        assert_eq!(core::mem::size_of::<ResourceOffsets>(), 44);
        assert_eq!(core::mem::size_of::<ThreadState>(), 24);
    }

    #[test]
    fn thread_sets_stay_in_the_array_and_consecutive_threads_never_share_one() {
        assert!(THREADS_CAPACITY.is_power_of_two() && THREAD_WAYS.is_power_of_two());
        for tid in [1, 4095, 4096, 4097, 0x3f_ffff, u32::MAX] {
            let first = thread_set(tid);
            assert_eq!(first % THREAD_WAYS, 0, "{tid}");
            assert!(first + THREAD_WAYS <= THREADS_CAPACITY, "{tid}");
        }
        const SETS: u32 = THREADS_CAPACITY / THREAD_WAYS;
        let mut taken = [false; SETS as usize];
        for tid in 7000..7000 + SETS {
            let set = (thread_set(tid) / THREAD_WAYS) as usize;
            assert!(!taken[set], "{tid} shares a set");
            taken[set] = true;
        }
        assert_eq!(thread_set(7000), thread_set(7000 + SETS));
    }
}
