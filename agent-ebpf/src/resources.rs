//! Resources: on-CPU time, context switches, run-queue latency, block I/O and fsync of broker
//! processes (see `brokerscope_common::resources`).
//!
//! Everything is filtered by `BROKER_PIDS` before any counter is touched. `sched_switch` runs
//! on every context switch of the node: when the switched-out thread is not a broker's, its
//! path is two loads of its ids and one bitmap lookup (an array lookup the verifier inlines),
//! with no helper call, no clock read and no hash lookup.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use brokerscope_common::{
    fields::Field,
    processes::NO_FIELD,
    resources::{
        BLOCK_CAPACITY, BlockKey, BlockStart, FSYNC_CAPACITY, IoCounters, LATENCY_BUCKETS, NO_SLOT,
        PF_EXITING, RESOURCES_CAPACITY, ResourceOffsets, SCHED_CAPACITY, SchedCounters, TASK_DEAD,
        THREAD_WAYS, THREADS_CAPACITY, ThreadState, involuntary, rwbs_direction, thread_set,
    },
    sockets::log2_bucket,
    telemetry::{ProbeError, Program},
};

use crate::{
    broker_pids::is_broker,
    fields::{load, opaque_zero},
    telemetry::{count_error, count_run, increment},
};

/// Written by the loader from tracefs formats and BTF.
#[unsafe(no_mangle)]
static RESOURCE_OFFSETS: ResourceOffsets = ResourceOffsets::UNSET;

/// Block I/O and fsync counters per broker tgid; bounded by the number of brokers (as
/// BROKER_PIDS).
#[map(name = "RESOURCES")]
static RESOURCES: HashMap<u32, IoCounters> = HashMap::with_max_entries(RESOURCES_CAPACITY, 0);

/// Initial value of a new RESOURCES entry (too large for the BPF stack).
static ZERO: IoCounters = IoCounters::ZERO;

/// Scheduler counters per broker slot (see `SCHED_MAP`), per CPU: `sched_switch` adds to the
/// switching CPU's copy only, so no counter line moves between CPUs at every switch of a broker
/// thread.
#[map(name = "SCHED")]
static SCHED: PerCpuArray<SchedCounters> = PerCpuArray::with_max_entries(SCHED_CAPACITY, 0);

/// Each broker tgid's SCHED slot, written by the loader.
#[map(name = "BROKER_SLOTS")]
static BROKER_SLOTS: HashMap<u32, u32> = HashMap::with_max_entries(SCHED_CAPACITY, 0);

/// Per broker thread: its CPU time and run-queue wait totals at its last switch-out, in a slot
/// of its set (see `THREADS_MAP`); values are updated in place through the lookup.
#[map(name = "THREADS")]
static THREADS: Array<ThreadState> = Array::with_max_entries(THREADS_CAPACITY, 0);

/// Slots of THREADS taken from a live thread (see `EVICTIONS_MAP`).
#[map(name = "EVICTIONS")]
static EVICTIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The state of broker thread `tid`: its slot, or a slot of its set taken for it (a free one,
/// else the last way's, evicting its thread); None only if the set were outside the array.
/// A slot is written by its own thread's switch-outs (on one CPU at a time) and exit, and by a
/// thread taking it.
#[inline(always)]
fn thread(tid: u32) -> Option<*mut ThreadState> {
    let first = thread_set(tid);
    let mut free = None;
    for way in 0..THREAD_WAYS {
        let slot = THREADS.get_ptr_mut(first + way)?;
        // SAFETY: `slot` points into THREADS, looked up during this run.
        let owner = unsafe { (*slot).tid };
        if owner == tid {
            return Some(slot);
        }
        if owner == 0 && free.is_none() {
            free = Some(slot);
        }
    }
    let slot = match free {
        Some(slot) => slot,
        None => {
            if let Some(n) = EVICTIONS.get_ptr_mut(0) {
                // SAFETY: this CPU's slot; see `count_run` for why a plain add.
                unsafe { *n += 1 };
            }
            THREADS.get_ptr_mut(first + THREAD_WAYS - 1)?
        }
    };
    // SAFETY: as above.
    unsafe {
        // Zeros the compiler cannot merge into a byte-wise memset call (see `opaque_zero`).
        *slot = ThreadState {
            tid,
            slot: NO_SLOT,
            last_sum_exec: opaque_zero(),
            last_run_delay: opaque_zero(),
        }
    };
    Some(slot)
}

/// The THREADS slot broker thread `tid` holds, if any (takes none).
#[inline(always)]
fn held_thread(tid: u32) -> Option<*mut ThreadState> {
    let first = thread_set(tid);
    for way in 0..THREAD_WAYS {
        let slot = THREADS.get_ptr_mut(first + way)?;
        // SAFETY: `slot` points into THREADS, looked up during this run.
        if unsafe { (*slot).tid } == tid {
            return Some(slot);
        }
    }
    None
}

/// Frees the THREADS slot of broker thread `tid`, which is exiting.
#[inline(always)]
pub fn release_thread(tid: u32) {
    if let Some(slot) = held_thread(tid) {
        // SAFETY: `slot` points into THREADS, looked up during this run.
        unsafe { (*slot).tid = 0 };
    }
}

/// How many entries `block_issue` put in BLOCK_INFLIGHT that `block_complete` has not taken
/// out: counted before each insert, so never less than the entries there (more after an LRU
/// eviction, which only costs the shortcut). While zero, a completion (most are not a
/// broker's: page-cache writeback, other processes' I/O) returns without reading its record or
/// looking it up.
#[map(name = "BLOCK_PENDING")]
static BLOCK_PENDING: Array<u64> = Array::with_max_entries(1, 0);

/// Block requests brokers issued, in flight; bounded, least recently used evicted.
#[map(name = "BLOCK_INFLIGHT")]
static BLOCK_INFLIGHT: LruHashMap<BlockKey, BlockStart> =
    LruHashMap::with_max_entries(BLOCK_CAPACITY, 0);

/// fsync/fdatasync calls in progress per broker thread; bounded, LRU.
#[map(name = "FSYNC_INFLIGHT")]
static FSYNC_INFLIGHT: LruHashMap<u32, u64> = LruHashMap::with_max_entries(FSYNC_CAPACITY, 0);

#[inline(always)]
fn offsets() -> ResourceOffsets {
    // SAFETY: a plain read of a global the loader initialised; volatile so the compiler cannot
    // fold the compiled-in placeholder.
    unsafe { core::ptr::read_volatile(&RESOURCE_OFFSETS) }
}

/// `add!(counters, field, n)` or `add!(counters, array[i], n)`: atomic add to a RESOURCES value.
macro_rules! add {
    ($counters:ident, $field:ident $([$i:expr])?, $n:expr) => {
        // SAFETY: `$counters` points to a RESOURCES value looked up during this run, and any
        // index was bounded by log2_bucket.
        unsafe { increment(&raw mut (*$counters).$field $([$i])?, $n) }
    };
}

/// The I/O counters of broker `tgid`, created on first use.
#[inline(always)]
fn counters(tgid: u32) -> Result<*mut IoCounters, ProbeError> {
    if let Some(c) = RESOURCES.get_ptr_mut(&tgid) {
        return Ok(c);
    }
    // Another CPU may have created it meanwhile: NOEXIST keeps theirs.
    let _ = RESOURCES.insert(&tgid, &ZERO, BPF_NOEXIST as u64);
    RESOURCES
        .get_ptr_mut(&tgid)
        .ok_or(ProbeError::ResourcesFull)
}

/// This CPU's scheduler counters of broker `tgid`, through the slot kept in its thread's
/// `state` (looked up in BROKER_SLOTS once per thread, and again if the slot has changed hands).
#[inline(always)]
fn sched_counters(
    tgid: u32,
    state: Option<*mut ThreadState>,
) -> Result<*mut SchedCounters, ProbeError> {
    if let Some(t) = state {
        // SAFETY: `t` points to this thread's THREADS value, looked up during this run.
        let slot = unsafe { (*t).slot };
        if let Some(c) = SCHED.get_ptr_mut(slot)
            // SAFETY: `c` points to this CPU's SCHED value, looked up during this run.
            && unsafe { (*c).owner } == tgid
        {
            return Ok(c);
        }
    }
    // SAFETY: a plain read of the value; the loader writes a slot before marking the broker.
    let slot = unsafe { BROKER_SLOTS.get(&tgid) }
        .copied()
        .ok_or(ProbeError::ResourcesFull)?;
    let c = SCHED.get_ptr_mut(slot).ok_or(ProbeError::ResourcesFull)?;
    if let Some(t) = state {
        // SAFETY: as above.
        unsafe { (*t).slot = slot };
    }
    Ok(c)
}

/// `bump!(counters, field, n)` or `bump!(counters, array[i], n)`: a plain add to this CPU's
/// SCHED value. Only `sched_switch` writes SCHED, and the kernel never runs a program nested in
/// itself on one CPU.
macro_rules! bump {
    ($counters:ident, $field:ident $([$i:expr])?, $n:expr) => {
        // SAFETY: `$counters` points to this CPU's SCHED value, looked up during this run, and
        // any index was bounded by log2_bucket.
        unsafe { (*$counters).$field $([$i])? += $n }
    };
}

#[inline(always)]
fn bucket(us: u64) -> usize {
    log2_bucket(us, LATENCY_BUCKETS)
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> u32 {
    count_run(Program::SchedSwitch);
    // Raw `sched_switch(bool preempt, struct task_struct *prev, ...)`: the first two arguments
    // are the same on every kernel since 4.x.
    let off = offsets();
    let prev = Probed {
        task: ctx.arg(1),
        off: &off,
    };
    if let Err(e) = on_switch(ctx.arg::<u64>(0) & 0xff != 0, prev) {
        count_error(e);
    }
    0
}

/// The same as a BTF tracepoint, preferred when the kernel allows it: the task is a typed
/// pointer, so each field is one load (see [`crate::fields`]) instead of a helper call.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_btf(ctx: BtfTracePointContext) -> u32 {
    count_run(Program::SchedSwitchBtf);
    let preempt: u64 = ctx.arg(0);
    if let Err(e) = on_switch(preempt & 0xff != 0, Typed { task: ctx.arg(1) }) {
        count_error(e);
    }
    0
}

/// What the scheduler hook reads of the switched-out task: helper reads at offsets from BTF
/// ([`Probed`]), or direct loads through a typed pointer ([`Typed`]).
trait Task: Copy {
    /// (`tgid`, `pid`): the process and thread ids.
    fn ids(self) -> (u32, u32);
    /// `__state` (`state` before 5.14).
    fn state(self) -> Result<u32, ProbeError>;
    /// `flags` (`PF_*`).
    fn flags(self) -> Result<u32, ProbeError>;
    /// `se.sum_exec_runtime`.
    fn sum_exec(self) -> Result<u64, ProbeError>;
    /// `se.prev_sum_exec_runtime`.
    fn prev_sum_exec(self) -> Result<u64, ProbeError>;
    /// `sched_info.run_delay`; None where the kernel does not keep it.
    fn run_delay(self) -> Result<Option<u64>, ProbeError>;
}

#[derive(Clone, Copy)]
struct Probed<'a> {
    task: u64,
    off: &'a ResourceOffsets,
}

impl Probed<'_> {
    #[inline(always)]
    fn read<T>(self, offset: u32) -> Result<T, ProbeError> {
        // SAFETY: a checked kernel read at a BTF offset inside the task.
        unsafe { bpf_probe_read_kernel((self.task + u64::from(offset)) as *const T) }
            .map_err(|_| ProbeError::ReadTask)
    }
}

impl Task for Probed<'_> {
    #[inline(always)]
    fn ids(self) -> (u32, u32) {
        // The switched-out task is still the current one.
        let pid_tgid = bpf_get_current_pid_tgid();
        ((pid_tgid >> 32) as u32, pid_tgid as u32)
    }
    #[inline(always)]
    fn state(self) -> Result<u32, ProbeError> {
        self.read(self.off.task_state)
    }
    #[inline(always)]
    fn flags(self) -> Result<u32, ProbeError> {
        self.read(self.off.task_flags)
    }
    #[inline(always)]
    fn sum_exec(self) -> Result<u64, ProbeError> {
        self.read(self.off.task_sum_exec)
    }
    #[inline(always)]
    fn prev_sum_exec(self) -> Result<u64, ProbeError> {
        self.read(self.off.task_prev_sum_exec)
    }
    #[inline(always)]
    fn run_delay(self) -> Result<Option<u64>, ProbeError> {
        if self.off.task_run_delay == NO_FIELD {
            return Ok(None);
        }
        self.read(self.off.task_run_delay).map(Some)
    }
}

/// A `struct task_struct *` the verifier knows the type of.
#[derive(Clone, Copy)]
struct Typed {
    task: u64,
}

impl Task for Typed {
    /// Two loads, where the helper is a call (and a return through the kernel's return thunk,
    /// where speculative-return mitigations are on), at every context switch of the node.
    #[inline(always)]
    fn ids(self) -> (u32, u32) {
        (
            load!(u32, self.task, Field::TaskTgid),
            load!(u32, self.task, Field::TaskPid),
        )
    }
    #[inline(always)]
    fn state(self) -> Result<u32, ProbeError> {
        Ok(load!(u32, self.task, Field::TaskState))
    }
    #[inline(always)]
    fn flags(self) -> Result<u32, ProbeError> {
        Ok(load!(u32, self.task, Field::TaskFlags))
    }
    #[inline(always)]
    fn sum_exec(self) -> Result<u64, ProbeError> {
        Ok(load!(u64, self.task, Field::TaskSumExec))
    }
    #[inline(always)]
    fn prev_sum_exec(self) -> Result<u64, ProbeError> {
        Ok(load!(u64, self.task, Field::TaskPrevSumExec))
    }
    #[inline(always)]
    fn run_delay(self) -> Result<Option<u64>, ProbeError> {
        // Without the field, the loader patched a stand-in offset (see `fields`): not loaded.
        // SAFETY: as in `offsets`; one field read, where `offsets` copies the whole struct.
        let run_delay =
            unsafe { core::ptr::read_volatile(&raw const RESOURCE_OFFSETS.task_run_delay) };
        if run_delay == NO_FIELD {
            return Ok(None);
        }
        Ok(Some(load!(u64, self.task, Field::TaskRunDelay)))
    }
}

/// A context switch away from `prev`, still the current task. Only the switched-out thread is
/// read: its CPU time and its wait for the CPU before the slice that just ended are the
/// scheduler's own running totals, so nothing needs to be noted when a thread is woken or
/// switched in.
#[inline(always)]
fn on_switch(preempt: bool, prev: impl Task) -> Result<(), ProbeError> {
    let (tgid, tid) = prev.ids();
    if !is_broker(tgid) {
        // The common case on a busy node: one bitmap lookup.
        return Ok(());
    }
    let sum = prev.sum_exec()?;
    let run_delay = prev.run_delay()?;
    let task_state = prev.state()?;
    // A thread that began to exit takes no slot (see PF_EXITING); its last switch frees the
    // one it may still hold.
    let dead = task_state == TASK_DEAD;
    let state = if dead || prev.flags()? & PF_EXITING != 0 {
        held_thread(tid)
    } else {
        thread(tid)
    };
    let c = sched_counters(tgid, state)?;
    // SAFETY: `t` points to this thread's THREADS value, looked up during this run.
    let last = state.map(|t| unsafe { *t });
    match last {
        Some(last) if last.last_sum_exec != 0 && last.last_sum_exec <= sum => {
            bump!(c, on_cpu_ns, sum - last.last_sum_exec);
            // The wait before this slice: the growth of the total since the last switch-out.
            if let Some(delay) = run_delay {
                let us = delay.saturating_sub(last.last_run_delay) / 1000;
                bump!(c, runq[bucket(us)], 1);
                bump!(c, runq_sum_us, us);
            }
        }
        // First seen (or a reused thread id): CPU time from when it got this CPU; its wait
        // before is not known apart from earlier ones.
        _ => bump!(c, on_cpu_ns, sum.saturating_sub(prev.prev_sum_exec()?)),
    }
    if let Some(t) = state {
        // SAFETY: as above.
        unsafe {
            if dead {
                (*t).tid = 0;
            } else {
                (*t).last_sum_exec = sum;
                (*t).last_run_delay = run_delay.unwrap_or(0);
            }
        }
    }
    if involuntary(preempt, task_state) {
        bump!(c, involuntary, 1);
    } else {
        bump!(c, voluntary, 1);
    }
    Ok(())
}

#[tracepoint(category = "block", name = "block_rq_issue")]
pub fn block_issue(ctx: TracePointContext) -> u32 {
    count_run(Program::BlockIssue);
    if let Err(e) = try_issue(&ctx, false) {
        count_error(e);
    }
    0
}

/// A request queued on an I/O scheduler, in the submitting task's context: where a kernel
/// worker issues it later (Linux 6.1 queues a loop device's O_DIRECT writes on mq-deadline and
/// runs the queue from kblockd), its issue is no longer the broker's to see. Counted here, and
/// not again when issued.
#[tracepoint(category = "block", name = "block_rq_insert")]
pub fn block_insert(ctx: TracePointContext) -> u32 {
    count_run(Program::BlockInsert);
    if let Err(e) = try_issue(&ctx, true) {
        count_error(e);
    }
    0
}

fn try_issue(ctx: &TracePointContext, inserted: bool) -> Result<(), ProbeError> {
    // Issued (or queued) in the submitting task's context: direct I/O, synchronous reads, plug
    // flushes. Writeback is kernel threads' and not the broker's; a request the broker queued
    // on a scheduler may be issued by a kernel worker, and is found by its entry.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let broker = is_broker(tgid);
    if !broker && (inserted || BLOCK_PENDING.get(0).is_none_or(|n| *n == 0)) {
        return Ok(());
    }
    let off = offsets();
    // SAFETY: offsets from the tracepoint's format file; the reads are checked.
    let dev: u32 =
        unsafe { ctx.read_at(off.issue_dev as usize) }.map_err(|_| ProbeError::ReadContext)?;
    // SAFETY: as above.
    let sector: u64 =
        unsafe { ctx.read_at(off.issue_sector as usize) }.map_err(|_| ProbeError::ReadContext)?;
    let key = BlockKey {
        dev,
        _pad: 0,
        sector,
    };
    let queued = BLOCK_INFLIGHT.get_ptr_mut(&key);
    if inserted {
        // Noted with its submitter; counted when issued, its size then final.
        if queued.is_none() {
            note_inflight(&key, tgid, 0);
        }
        return Ok(());
    }
    // SAFETY: as above.
    let bytes: u32 =
        unsafe { ctx.read_at(off.issue_bytes as usize) }.map_err(|_| ProbeError::ReadContext)?;
    // SAFETY: as above.
    let rwbs: [u8; 4] =
        unsafe { ctx.read_at(off.issue_rwbs as usize) }.map_err(|_| ProbeError::ReadContext)?;
    let owner = match queued {
        // SAFETY: the pointer comes from the lookup just made; only this request's issue
        // writes its flag.
        Some(start) => unsafe {
            if (*start).counted != 0 {
                return Ok(());
            }
            (*start).counted = 1;
            (*start).tgid
        },
        None if broker => {
            note_inflight(&key, tgid, 1);
            tgid
        }
        None => return Ok(()),
    };
    let c = counters(owner)?;
    match rwbs_direction(&rwbs) {
        1 => add!(c, read_bytes, u64::from(bytes)),
        2 => add!(c, written_bytes, u64::from(bytes)),
        _ => {}
    }
    Ok(())
}

/// Notes a broker's request in flight from now, for its completion's latency.
#[inline(always)]
fn note_inflight(key: &BlockKey, tgid: u32, counted: u32) {
    // SAFETY: a plain helper call.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    let start = BlockStart {
        ts_ns,
        tgid,
        counted,
    };
    // Counted first, so a completion on another CPU never sees the entry without its count.
    count_pending(1);
    if BLOCK_INFLIGHT
        .insert(key, &start, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Already there (a request reissued before it completed), or not inserted at all.
        count_pending(u64::MAX);
        let _ = BLOCK_INFLIGHT.insert(key, &start, 0);
    }
}

/// Adds `n` (wrapping: `u64::MAX` takes one away) to BLOCK_PENDING.
#[inline(always)]
fn count_pending(n: u64) {
    if let Some(pending) = BLOCK_PENDING.get_ptr_mut(0) {
        // SAFETY: the pointer comes from the lookup just made.
        unsafe { increment(pending, n) };
    }
}

#[tracepoint(category = "block", name = "block_rq_complete")]
pub fn block_complete(ctx: TracePointContext) -> u32 {
    count_run(Program::BlockComplete);
    if let Err(e) = try_complete(&ctx) {
        count_error(e);
    }
    0
}

fn try_complete(ctx: &TracePointContext) -> Result<(), ProbeError> {
    if BLOCK_PENDING.get(0).is_none_or(|n| *n == 0) {
        return Ok(());
    }
    let off = offsets();
    // SAFETY: offsets from the tracepoint's format file; the reads are checked.
    let dev: u32 =
        unsafe { ctx.read_at(off.complete_dev as usize) }.map_err(|_| ProbeError::ReadContext)?;
    // SAFETY: as above.
    let sector: u64 = unsafe { ctx.read_at(off.complete_sector as usize) }
        .map_err(|_| ProbeError::ReadContext)?;
    let key = BlockKey {
        dev,
        _pad: 0,
        sector,
    };
    // SAFETY: a plain read of a map value returned by the lookup.
    let Some(start) = (unsafe { BLOCK_INFLIGHT.get(&key) }).copied() else {
        return Ok(());
    };
    if BLOCK_INFLIGHT.remove(&key).is_ok() {
        count_pending(u64::MAX);
    }
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let us = now.saturating_sub(start.ts_ns) / 1000;
    let c = counters(start.tgid)?;
    add!(c, io[bucket(us)], 1);
    add!(c, io_sum_us, us);
    Ok(())
}

#[tracepoint(category = "syscalls", name = "sys_enter_fsync")]
pub fn fsync_enter(_ctx: TracePointContext) -> u32 {
    count_run(Program::FsyncEnter);
    sync_enter();
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_fsync")]
pub fn fsync_exit(_ctx: TracePointContext) -> u32 {
    count_run(Program::FsyncExit);
    if let Err(e) = sync_exit() {
        count_error(e);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_fdatasync")]
pub fn fdatasync_enter(_ctx: TracePointContext) -> u32 {
    count_run(Program::FdatasyncEnter);
    sync_enter();
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_fdatasync")]
pub fn fdatasync_exit(_ctx: TracePointContext) -> u32 {
    count_run(Program::FdatasyncExit);
    if let Err(e) = sync_exit() {
        count_error(e);
    }
    0
}

/// ext4's fsync file operation, entered by fsync, fdatasync, msync(MS_SYNC) and O_SYNC/O_DSYNC
/// writes on ext4 files. Fires only on those, where the syscall tracepoints above would put every
/// syscall of every task on the node through the slow path: those are attached only when
/// `probes.node_wide_hooks` allows, for brokers with log dirs on other filesystems.
#[tracepoint(category = "ext4", name = "ext4_sync_file_enter")]
pub fn fsync_ext4_enter(_ctx: TracePointContext) -> u32 {
    count_run(Program::FsyncExt4Enter);
    sync_enter();
    0
}

/// Its return. With the syscall tracepoints attached too, the inner pair counts an fsync of an
/// ext4 file and takes its entry away, so the syscall's exit finds none: counted once.
#[tracepoint(category = "ext4", name = "ext4_sync_file_exit")]
pub fn fsync_ext4_exit(_ctx: TracePointContext) -> u32 {
    count_run(Program::FsyncExt4Exit);
    if let Err(e) = sync_exit() {
        count_error(e);
    }
    0
}

/// XFS's fsync file operation, entered as ext4's is (see [`fsync_ext4_enter`]). The
/// tracepoint has no exit: the count is exact, the duration is not measured here.
#[tracepoint(category = "xfs", name = "xfs_file_fsync")]
pub fn fsync_xfs(_ctx: TracePointContext) -> u32 {
    count_run(Program::FsyncXfs);
    if let Err(e) = sync_count() {
        count_error(e);
    }
    0
}

/// Btrfs's fsync file operation, as [`fsync_xfs`]: counted, no duration.
#[tracepoint(category = "btrfs", name = "btrfs_sync_file")]
pub fn fsync_btrfs(_ctx: TracePointContext) -> u32 {
    count_run(Program::FsyncBtrfs);
    if let Err(e) = sync_count() {
        count_error(e);
    }
    0
}

/// Counts a broker's fsync without its duration (entry-only hooks). Where the opt-in syscall
/// pair is attached too, the syscall's entry is taken away, so its exit does not count the
/// same call again (as the ext4 pair does for ext4 files).
#[inline(always)]
fn sync_count() -> Result<(), ProbeError> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_broker(tgid) {
        return Ok(());
    }
    let _ = FSYNC_INFLIGHT.remove(&(pid_tgid as u32));
    let c = counters(tgid)?;
    add!(c, fsyncs, 1);
    Ok(())
}

#[inline(always)]
fn sync_enter() {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_broker((pid_tgid >> 32) as u32) {
        return;
    }
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = FSYNC_INFLIGHT.insert(&(pid_tgid as u32), &now, 0);
}

#[inline(always)]
fn sync_exit() -> Result<(), ProbeError> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    // SAFETY: a plain read of a map value returned by the lookup.
    let Some(since) = (unsafe { FSYNC_INFLIGHT.get(&tid) }).copied() else {
        return Ok(());
    };
    let _ = FSYNC_INFLIGHT.remove(&tid);
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let us = now.saturating_sub(since) / 1000;
    let c = counters((pid_tgid >> 32) as u32)?;
    add!(c, fsyncs, 1);
    add!(c, fsync[bucket(us)], 1);
    add!(c, fsync_sum_us, us);
    Ok(())
}
