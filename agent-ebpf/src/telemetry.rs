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

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: the slot comes from the lookup just made.
        unsafe { increment(slot, 1) };
    }
}

#[inline(always)]
pub fn count_run(program: Program) {
    bump(&PROBE_EVENTS, program as u32);
}

#[inline(always)]
pub fn count_error(error: ProbeError) {
    bump(&PROBE_ERRORS, error as u32);
}
