//! Processes: exec and exit events for broker discovery (see `brokerscope_common::processes`).

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
};
use brokerscope_common::{
    fields::Field,
    processes::{
        EVENT_EXEC, EVENT_EXIT, EXEC_WAKE_EVERY_NS, NO_FIELD, PROCESS_EVENTS_BYTES, ProcessEvent,
        ProcessOffsets, process_ended,
    },
    telemetry::{ProbeError, Program},
};

use crate::{
    broker_pids::is_broker,
    fields::load,
    resources::release_thread,
    telemetry::{count_error, count_run},
};

/// Written by the loader from the tracepoints' format files.
#[unsafe(no_mangle)]
static PROCESS_OFFSETS: ProcessOffsets = ProcessOffsets::UNSET;

/// Events to user space; bounded by its size in bytes.
#[map(name = "PROCESS_EVENTS")]
static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(PROCESS_EVENTS_BYTES, 0);

/// When an exec event last woke the reader (see `EXEC_WAKE_EVERY_NS`).
#[map(name = "EXEC_WOKEN")]
static EXEC_WOKEN: Array<u64> = Array::with_max_entries(1, 0);

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn process_exec(ctx: TracePointContext) -> u32 {
    count_run(Program::ProcessExec);
    if let Err(e) = try_exec(&ctx) {
        count_error(e);
    }
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    count_run(Program::ProcessExit);
    if let Err(e) = try_exit(&ctx) {
        count_error(e);
    }
    0
}

/// The same as a BTF tracepoint, preferred where `sched_process_exit` passes `group_dead` as an
/// argument (Linux 6.13+): a plain read of the argument, where the classic tracepoint reads its
/// record through a helper (about 100 ns). On older kernels the verifier refuses the read of an
/// argument the tracepoint does not have, and the classic program serves.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn process_exit_btf(ctx: BtfTracePointContext) -> u32 {
    count_run(Program::ProcessExitBtf);
    // `sched_process_exit(struct task_struct *p, bool group_dead)`: `p` is the exiting task,
    // whose ids are two loads (see `Field`) where the helper is a call, at every exit on the node.
    let task: u64 = ctx.arg(0);
    let (tgid, pid) = (
        load!(u32, task, Field::TaskTgid),
        load!(u32, task, Field::TaskPid),
    );
    if !is_broker(tgid) {
        return 0;
    }
    release_thread(pid);
    let group_dead: u64 = ctx.arg(1);
    if process_ended(Some(group_dead & 0xff != 0), pid, tgid)
        && let Err(e) = send(EVENT_EXIT, tgid)
    {
        count_error(e);
    }
    0
}

#[inline(always)]
fn offsets() -> ProcessOffsets {
    // SAFETY: a plain read of a global the loader initialised; volatile so the compiler cannot
    // fold the compiled-in placeholder.
    unsafe { core::ptr::read_volatile(&PROCESS_OFFSETS) }
}

fn try_exec(ctx: &TracePointContext) -> Result<(), ProbeError> {
    // SAFETY: the offset comes from the tracepoint's format file; the read is checked.
    let pid: i32 =
        unsafe { ctx.read_at(offsets().exec_pid as usize) }.map_err(|_| ProbeError::ReadContext)?;
    send(EVENT_EXEC, pid as u32)
}

fn try_exit(ctx: &TracePointContext) -> Result<(), ProbeError> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, pid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // Cheap filter first: most exits on a node are not brokers'.
    if !is_broker(tgid) {
        return Ok(());
    }
    release_thread(pid);
    let off = offsets().exit_group_dead;
    let group_dead = if off == NO_FIELD {
        None
    } else {
        // SAFETY: the offset comes from the tracepoint's format file; the read is checked.
        let dead: u8 = unsafe { ctx.read_at(off as usize) }.map_err(|_| ProbeError::ReadContext)?;
        Some(dead != 0)
    };
    if !process_ended(group_dead, pid, tgid) {
        return Ok(());
    }
    send(EVENT_EXIT, tgid)
}

#[inline(always)]
fn send(kind: u32, pid: u32) -> Result<(), ProbeError> {
    let Some(mut entry) = PROCESS_EVENTS.reserve::<ProcessEvent>(0) else {
        return Err(ProbeError::EventsFull);
    };
    // SAFETY: no preconditions.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    entry.write(ProcessEvent { kind, pid, ts_ns });
    let wake = if kind != EVENT_EXEC {
        BPF_RB_FORCE_WAKEUP
    } else {
        match EXEC_WOKEN.get_ptr_mut(0) {
            // SAFETY: the slot comes from the lookup just made. Two CPUs racing here both wake
            // the reader, which is harmless.
            Some(last) if ts_ns.wrapping_sub(unsafe { *last }) < EXEC_WAKE_EVERY_NS => {
                BPF_RB_NO_WAKEUP
            }
            Some(last) => {
                // SAFETY: as above.
                unsafe { *last = ts_ns };
                BPF_RB_FORCE_WAKEUP
            }
            None => BPF_RB_FORCE_WAKEUP,
        }
    };
    entry.submit(u64::from(wake));
    Ok(())
}
