//! Per-program run and error counters (see `brokerscope_common::telemetry`).

use aya_ebpf::{macros::map, maps::PerCpuArray};
use brokerscope_common::telemetry::{ProbeError, Program};

/// One slot per program: bounded by `Program::COUNT`.
#[map(name = "PROBE_EVENTS")]
static PROBE_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Program::COUNT, 0);

/// One slot per error kind: bounded by `ProbeError::COUNT`.
#[map(name = "PROBE_ERRORS")]
static PROBE_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ProbeError::COUNT, 0);

/// Adds `n` to a counter in a map value, atomically: other CPUs (shared maps) or a softirq on
/// this CPU (per-CPU maps) may update it at the same time. The BPF target's `core` has no
/// `AtomicU64::fetch_add`, but the instruction exists (BPF_ATOMIC | BPF_ADD), so use the
/// intrinsic.
///
/// # Safety
/// `counter` must point into a map value returned by a lookup in this program run.
#[inline(always)]
pub unsafe fn increment(counter: *mut u64, n: u64) {
    // SAFETY: guaranteed by the caller; the add itself is a single atomic instruction.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, n,
        );
    }
}

/// Counts a run in this CPU's slot of the program. A plain add, no lock prefix: each slot
/// belongs to one program, and the kernel never runs a program nested in itself on one CPU (a
/// tracepoint that fires while a BPF program runs on that CPU is skipped and counted as a
/// miss), so nothing else writes this CPU's slot meanwhile.
#[inline(always)]
pub fn count_run(program: Program) {
    if let Some(slot) = PROBE_EVENTS.get_ptr_mut(program as u32) {
        // SAFETY: the slot comes from the lookup just made; see above for why no other writer.
        unsafe { *slot += 1 };
    }
}

/// Counts a failure. Atomic: several programs share an error kind's slot, and the iterator
/// (process context) can be interrupted by a tracepoint program on the same CPU.
#[inline(always)]
pub fn count_error(error: ProbeError) {
    if let Some(slot) = PROBE_ERRORS.get_ptr_mut(error as u32) {
        // SAFETY: the slot comes from the lookup just made.
        unsafe { increment(slot, 1) };
    }
}
