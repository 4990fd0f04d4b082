//! Broker state: file opens (log recovery) and SIGTERM deliveries of registered brokers, sent to
//! user space (see `brokerscope_common::state`).
//!
//! Only broker tgids (the `BROKER_PIDS` map the processes family owns) produce events: the
//! filter is one hash lookup, made before anything is read from the record.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user_str_bytes},
    macros::{map, tracepoint},
    maps::RingBuf,
    programs::TracePointContext,
};
use brokerscope_common::{
    state::{
        SIGTERM, STATE_EVENT_OPEN, STATE_EVENT_SIGTERM, STATE_EVENTS_BYTES, StateEvent,
        StateOffsets,
    },
    telemetry::{ProbeError, Program},
};

use crate::{
    broker_pids::is_broker,
    telemetry::{count_error, count_run},
};

/// Written by the loader from the tracepoints' format files.
#[unsafe(no_mangle)]
static STATE_OFFSETS: StateOffsets = StateOffsets::UNSET;

/// Events to user space; bounded by its size in bytes.
#[map(name = "STATE_EVENTS")]
static STATE_EVENTS: RingBuf = RingBuf::with_byte_size(STATE_EVENTS_BYTES, 0);

#[inline(always)]
fn offsets() -> StateOffsets {
    // SAFETY: a plain read of a global the loader initialised; volatile so the compiler cannot
    // fold the compiled-in placeholder.
    unsafe { core::ptr::read_volatile(&STATE_OFFSETS) }
}

#[tracepoint(category = "syscalls", name = "sys_enter_openat")]
pub fn state_openat(ctx: TracePointContext) -> u32 {
    count_run(Program::StateOpenat);
    let off = offsets();
    if let Err(e) = try_open(&ctx, off.openat_dfd, off.openat_filename) {
        count_error(e);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_openat2")]
pub fn state_openat2(ctx: TracePointContext) -> u32 {
    count_run(Program::StateOpenat2);
    let off = offsets();
    if let Err(e) = try_open(&ctx, off.openat2_dfd, off.openat2_filename) {
        count_error(e);
    }
    0
}

#[tracepoint(category = "signal", name = "signal_deliver")]
pub fn state_signal(ctx: TracePointContext) -> u32 {
    count_run(Program::StateSignal);
    if let Err(e) = try_signal(&ctx) {
        count_error(e);
    }
    0
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

fn try_open(ctx: &TracePointContext, dfd_off: u32, name_off: u32) -> Result<(), ProbeError> {
    let tgid = current_tgid();
    if !is_broker(tgid) {
        return Ok(());
    }
    // SAFETY: offsets come from the tracepoint's format file; the reads are checked.
    let dfd: u64 = unsafe { ctx.read_at(dfd_off as usize) }.map_err(|_| ProbeError::ReadContext)?;
    // SAFETY: as above.
    let filename: u64 =
        unsafe { ctx.read_at(name_off as usize) }.map_err(|_| ProbeError::ReadContext)?;
    let Some(mut entry) = STATE_EVENTS.reserve::<StateEvent>(0) else {
        return Err(ProbeError::StateEventsFull);
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to the reserved, writable ring buffer slot of a StateEvent; the
    // path is read into its bounded array by the checked helper.
    let read = unsafe {
        (*event).kind = STATE_EVENT_OPEN;
        (*event).tgid = tgid;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).dfd = dfd as i32;
        bpf_probe_read_user_str_bytes(filename as *const u8, &mut (*event).path)
            .map(|s| s.len() as u32)
    };
    match read {
        Ok(len) => {
            // SAFETY: as above.
            unsafe { (*event).len = len };
            entry.submit(0);
            Ok(())
        }
        Err(_) => {
            entry.discard(0);
            Err(ProbeError::ReadUser)
        }
    }
}

fn try_signal(ctx: &TracePointContext) -> Result<(), ProbeError> {
    // SAFETY: the offset comes from the tracepoint's format file; the read is checked.
    let sig: i32 = unsafe { ctx.read_at(offsets().signal_sig as usize) }
        .map_err(|_| ProbeError::ReadContext)?;
    if sig != SIGTERM {
        return Ok(());
    }
    // signal_deliver fires in the receiving task: the current tgid is the broker's.
    let tgid = current_tgid();
    if !is_broker(tgid) {
        return Ok(());
    }
    let Some(mut entry) = STATE_EVENTS.reserve::<StateEvent>(0) else {
        return Err(ProbeError::StateEventsFull);
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to the reserved, writable ring buffer slot of a StateEvent.
    unsafe {
        (*event).kind = STATE_EVENT_SIGTERM;
        (*event).tgid = tgid;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).dfd = 0;
        (*event).len = 0;
    }
    entry.submit(0);
    Ok(())
}
