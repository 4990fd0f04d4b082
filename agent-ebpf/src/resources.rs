//! Resources: on-CPU time, context switches, run-queue latency, block I/O and fsync of broker
//! processes (see `brokerscope_common::resources`).
//!
//! Everything is filtered by `BROKER_PIDS` before any counter is touched. `sched_switch` runs
//! on every context switch of the node: its path between two non-broker tasks is one task
//! read, two bitmap lookups (array lookups the verifier inlines) and a per-CPU slot write, with
//! no clock read and no hash lookup.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use brokerscope_common::{
    fields::Field,
    resources::{
        BLOCK_CAPACITY, BlockKey, BlockStart, FSYNC_CAPACITY, LATENCY_BUCKETS, OnCpu,
        RESOURCES_CAPACITY, RUNQ_CAPACITY, RUNTIME_CAPACITY, ResourceCounters, ResourceOffsets,
        involuntary, rwbs_direction,
    },
    sockets::log2_bucket,
    telemetry::{ProbeError, Program},
};

use crate::{
    fields::load,
    processes::is_broker,
    telemetry::{count_error, count_run, increment},
};

/// Written by the loader from tracefs formats and BTF.
#[unsafe(no_mangle)]
static RESOURCE_OFFSETS: ResourceOffsets = ResourceOffsets::UNSET;

/// Counters per broker tgid; bounded by the number of brokers (as BROKER_PIDS).
#[map(name = "RESOURCES")]
static RESOURCES: HashMap<u32, ResourceCounters> = HashMap::with_max_entries(RESOURCES_CAPACITY, 0);

/// Initial value of a new RESOURCES entry (too large for the BPF stack).
static ZERO: ResourceCounters = ResourceCounters::ZERO;

/// What runs on each CPU: one slot per CPU.
#[map(name = "ON_CPU")]
static ON_CPU: PerCpuArray<OnCpu> = PerCpuArray::with_max_entries(1, 0);

/// When a broker thread became runnable; bounded, least recently used evicted.
#[map(name = "RUNQ_SINCE")]
static RUNQ_SINCE: LruHashMap<u32, u64> = LruHashMap::with_max_entries(RUNQ_CAPACITY, 0);

/// Each broker thread's `sum_exec_runtime` at its last switch-out; bounded, LRU.
#[map(name = "THREAD_RUNTIME")]
static THREAD_RUNTIME: LruHashMap<u32, u64> = LruHashMap::with_max_entries(RUNTIME_CAPACITY, 0);

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

/// The counters of broker `tgid`, created on first use.
#[inline(always)]
fn counters(tgid: u32) -> Result<*mut ResourceCounters, ProbeError> {
    if let Some(c) = RESOURCES.get_ptr_mut(&tgid) {
        return Ok(c);
    }
    // Another CPU may have created it meanwhile: NOEXIST keeps theirs.
    let _ = RESOURCES.insert(&tgid, &ZERO, BPF_NOEXIST as u64);
    RESOURCES
        .get_ptr_mut(&tgid)
        .ok_or(ProbeError::ResourcesFull)
}

#[inline(always)]
fn bucket(us: u64) -> usize {
    log2_bucket(us, LATENCY_BUCKETS)
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> u32 {
    count_run(Program::SchedSwitch);
    // Raw `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, ...)`:
    // the first three arguments are the same on every kernel since 4.x.
    let off = offsets();
    let prev = Probed {
        task: ctx.arg(1),
        off: &off,
    };
    let next = Probed {
        task: ctx.arg(2),
        off: &off,
    };
    if let Err(e) = on_switch(ctx.arg::<u64>(0) & 0xff != 0, prev, next) {
        count_error(e);
    }
    0
}

/// The same as a BTF tracepoint, preferred when the kernel allows it: the tasks are typed
/// pointers, so each field is one load (see [`crate::fields`]) instead of a helper call.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_btf(ctx: BtfTracePointContext) -> u32 {
    count_run(Program::SchedSwitchBtf);
    let preempt: u64 = ctx.arg(0);
    let (prev, next) = (Typed { task: ctx.arg(1) }, Typed { task: ctx.arg(2) });
    if let Err(e) = on_switch(preempt & 0xff != 0, prev, next) {
        count_error(e);
    }
    0
}

/// What the scheduler hooks read of a task: helper reads at offsets from BTF ([`Probed`]), or
/// direct loads through a typed pointer ([`Typed`]).
trait Task: Copy {
    fn tgid(self) -> Result<u32, ProbeError>;
    /// The thread id.
    fn pid(self) -> Result<u32, ProbeError>;
    /// `__state` (`state` before 5.14).
    fn state(self) -> Result<u32, ProbeError>;
    /// `se.sum_exec_runtime`.
    fn sum_exec(self) -> Result<u64, ProbeError>;
    /// `se.prev_sum_exec_runtime`.
    fn prev_sum_exec(self) -> Result<u64, ProbeError>;
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
    fn tgid(self) -> Result<u32, ProbeError> {
        self.read::<i32>(self.off.task_tgid).map(|t| t as u32)
    }
    #[inline(always)]
    fn pid(self) -> Result<u32, ProbeError> {
        self.read::<i32>(self.off.task_pid).map(|t| t as u32)
    }
    #[inline(always)]
    fn state(self) -> Result<u32, ProbeError> {
        self.read(self.off.task_state)
    }
    #[inline(always)]
    fn sum_exec(self) -> Result<u64, ProbeError> {
        self.read(self.off.task_sum_exec)
    }
    #[inline(always)]
    fn prev_sum_exec(self) -> Result<u64, ProbeError> {
        self.read(self.off.task_prev_sum_exec)
    }
}

/// A `struct task_struct *` the verifier knows the type of.
#[derive(Clone, Copy)]
struct Typed {
    task: u64,
}

impl Task for Typed {
    #[inline(always)]
    fn tgid(self) -> Result<u32, ProbeError> {
        Ok(load!(u32, self.task, Field::TaskTgid))
    }
    #[inline(always)]
    fn pid(self) -> Result<u32, ProbeError> {
        Ok(load!(u32, self.task, Field::TaskPid))
    }
    #[inline(always)]
    fn state(self) -> Result<u32, ProbeError> {
        Ok(load!(u32, self.task, Field::TaskState))
    }
    #[inline(always)]
    fn sum_exec(self) -> Result<u64, ProbeError> {
        Ok(load!(u64, self.task, Field::TaskSumExec))
    }
    #[inline(always)]
    fn prev_sum_exec(self) -> Result<u64, ProbeError> {
        Ok(load!(u64, self.task, Field::TaskPrevSumExec))
    }
}

/// A context switch from `prev` (still the current task) to `next`.
#[inline(always)]
fn on_switch(preempt: bool, prev: impl Task, next: impl Task) -> Result<(), ProbeError> {
    // The switched-out task is still current here.
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let (prev_broker, next_broker) = (is_broker(tgid), is_broker(next.tgid()?));
    let slot = ON_CPU.get_ptr_mut(0).ok_or(ProbeError::ReadContext)?;
    if !prev_broker && !next_broker {
        // The common case on a busy node: no clock read, no hash lookup. The slot only has
        // to say that no broker thread got this CPU.
        // SAFETY: `slot` is this CPU's ON_CPU value; nothing else writes it while we run.
        unsafe { (*slot).since_ns = 0 };
        return Ok(());
    }
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if prev_broker {
        // SAFETY: `slot` is this CPU's ON_CPU value; nothing else writes it while we run.
        let here = unsafe { *slot };
        let c = counters(tgid)?;
        let sum = prev.sum_exec()?;
        // SAFETY: a plain read of a map value returned by the lookup.
        let base = match unsafe { THREAD_RUNTIME.get(&tid) } {
            Some(last) if *last <= sum => *last,
            // First seen (or a reused thread id): count from when it got this CPU.
            _ => prev.prev_sum_exec()?,
        };
        add!(c, on_cpu_ns, sum.saturating_sub(base));
        let _ = THREAD_RUNTIME.insert(&tid, &sum, 0);
        if here.since_ns != 0 && here.tid == tid {
            if here.has_runq != 0 {
                let us = here.runq_ns / 1000;
                add!(c, runq[bucket(us)], 1);
                add!(c, runq_sum_us, us);
            }
        }
        if involuntary(preempt, prev.state()?) {
            add!(c, involuntary, 1);
            // Preempted: it waits on the run queue from now.
            let _ = RUNQ_SINCE.insert(&tid, &now, 0);
        } else {
            add!(c, voluntary, 1);
        }
    }
    if !next_broker {
        // SAFETY: as below.
        unsafe { (*slot).since_ns = 0 };
        return Ok(());
    }
    let next = next.pid()?;
    let mut runq_ns = 0;
    let mut has_runq = 0;
    // SAFETY: a plain read of a map value returned by the lookup.
    if let Some(since) = unsafe { RUNQ_SINCE.get(&next) } {
        runq_ns = now.saturating_sub(*since);
        has_runq = 1;
        let _ = RUNQ_SINCE.remove(&next);
    }
    // SAFETY: as above.
    unsafe {
        *slot = OnCpu {
            since_ns: now,
            runq_ns,
            tid: next,
            has_runq,
        };
    }
    Ok(())
}

#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn sched_wakeup(ctx: RawTracePointContext) -> u32 {
    count_run(Program::SchedWakeup);
    wakeup_raw(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: RawTracePointContext) -> u32 {
    count_run(Program::SchedWakeupNew);
    wakeup_raw(&ctx);
    0
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup_btf(ctx: BtfTracePointContext) -> u32 {
    count_run(Program::SchedWakeupBtf);
    wakeup_btf(&ctx);
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new_btf(ctx: BtfTracePointContext) -> u32 {
    count_run(Program::SchedWakeupNewBtf);
    wakeup_btf(&ctx);
    0
}

/// The first argument of both wake-up tracepoints is the woken `struct task_struct *`.
#[inline(always)]
fn wakeup_raw(ctx: &RawTracePointContext) {
    let off = offsets();
    let task = Probed {
        task: ctx.arg(0),
        off: &off,
    };
    if let Err(e) = on_wakeup(task) {
        count_error(e);
    }
}

#[inline(always)]
fn wakeup_btf(ctx: &BtfTracePointContext) {
    if let Err(e) = on_wakeup(Typed { task: ctx.arg(0) }) {
        count_error(e);
    }
}

/// A broker thread woken: it waits on the run queue from now.
#[inline(always)]
fn on_wakeup(task: impl Task) -> Result<(), ProbeError> {
    if !is_broker(task.tgid()?) {
        return Ok(());
    }
    let tid = task.pid()?;
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = RUNQ_SINCE.insert(&tid, &now, 0);
    Ok(())
}

#[tracepoint(category = "block", name = "block_rq_issue")]
pub fn block_issue(ctx: TracePointContext) -> u32 {
    count_run(Program::BlockIssue);
    if let Err(e) = try_issue(&ctx) {
        count_error(e);
    }
    0
}

fn try_issue(ctx: &TracePointContext) -> Result<(), ProbeError> {
    // Issued in the submitting task's context (direct I/O, synchronous reads, plug flushes).
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_broker(tgid) {
        return Ok(());
    }
    let off = offsets();
    let read = |o: u32| -> Result<u64, ProbeError> {
        // SAFETY: offsets from the tracepoint's format file; the read is checked.
        unsafe { ctx.read_at::<u64>(o as usize) }.map_err(|_| ProbeError::ReadContext)
    };
    // SAFETY: as above.
    let dev: u32 =
        unsafe { ctx.read_at(off.issue_dev as usize) }.map_err(|_| ProbeError::ReadContext)?;
    let sector = read(off.issue_sector)?;
    // SAFETY: as above.
    let bytes: u32 =
        unsafe { ctx.read_at(off.issue_bytes as usize) }.map_err(|_| ProbeError::ReadContext)?;
    // SAFETY: as above.
    let rwbs: [u8; 4] =
        unsafe { ctx.read_at(off.issue_rwbs as usize) }.map_err(|_| ProbeError::ReadContext)?;
    let c = counters(tgid)?;
    match rwbs_direction(&rwbs) {
        1 => add!(c, read_bytes, u64::from(bytes)),
        2 => add!(c, written_bytes, u64::from(bytes)),
        _ => return Ok(()),
    }
    let key = BlockKey {
        dev,
        _pad: 0,
        sector,
    };
    // SAFETY: a plain helper call.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    let start = BlockStart {
        ts_ns,
        tgid,
        _pad: 0,
    };
    // Counted first, so a completion on another CPU never sees the entry without its count.
    count_pending(1);
    if BLOCK_INFLIGHT
        .insert(&key, &start, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Already there (a request reissued before it completed), or not inserted at all.
        count_pending(u64::MAX);
        let _ = BLOCK_INFLIGHT.insert(&key, &start, 0);
    }
    Ok(())
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
