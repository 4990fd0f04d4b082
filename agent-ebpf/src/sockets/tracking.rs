//! The connection table: tracking an accepted socket in the lock-free first tier or the spill
//! tier, finding it again, and letting it go.

use aya_ebpf::bindings::BPF_NOEXIST;
use brokerscope_common::sockets::{CONN_WAYS, ConnectionState};

use super::maps::{
    CLAIMED, CONN_BUCKETS, CONN_SPILLED, CONN_STATES, CONNECTIONS, CONNECTIONS_SPILL,
    SOCKETS_CONFIG,
};
use crate::telemetry::increment;

/// Where a tracked connection is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Tier {
    /// The first tier's slot: bucket, way.
    First(u32, usize),
    Spill,
}

/// Starts tracking `sk`: in its first-tier bucket, or while that is full in the spill tier.
/// With `BPF_ANY` the new state replaces any entry of `sk` in either tier (the socket iterator
/// may have adopted it an instant before its accept was seen), so no socket is in both; with
/// `BPF_NOEXIST` a tracked socket is left alone.
#[inline(always)]
pub(super) fn track(sk: u64, state: &ConnectionState, flags: u64) -> Result<(), i32> {
    if flags == u64::from(BPF_NOEXIST) {
        if tracked(sk).is_some() {
            return Err(EEXIST);
        }
    } else if spill_in_use() && CONNECTIONS_SPILL.remove(sk).is_ok() {
        count_spilled(u64::MAX);
    }
    if let Some(bucket) = bucket_of(sk)
        && let Some(keys) = CONNECTIONS.get_ptr_mut(bucket)
    {
        // SAFETY (the whole block): `keys` points to this bucket's value, looked up in this
        // run; every access is one aligned 8-byte load, store or compare-and-swap.
        for way in 0..CONN_WAYS {
            if unsafe { core::ptr::read_volatile(&raw const (*keys)[way]) } == sk {
                return write_state(bucket, way, state);
            }
        }
        for way in 0..CONN_WAYS {
            let slot = unsafe { &raw mut (*keys)[way] };
            if unsafe { core::ptr::read_volatile(slot) } != 0 || !claim(slot) {
                continue;
            }
            let written = write_state(bucket, way, state);
            unsafe { core::ptr::write_volatile(slot, sk) };
            // Two CPUs tracking the same socket at once (an accept and an adoption) may each
            // have claimed a slot: the one in the higher way gives way, its state going to the
            // lower one if it is an accept's.
            for lower in 0..way {
                if unsafe { core::ptr::read_volatile(&raw const (*keys)[lower]) } == sk {
                    if flags != u64::from(BPF_NOEXIST) {
                        let _ = write_state(bucket, lower, state);
                    }
                    unsafe { core::ptr::write_volatile(slot, 0) };
                    return Ok(());
                }
            }
            return written;
        }
    }
    if !spill_enabled() {
        return Err(E2BIG);
    }
    CONNECTIONS_SPILL.insert(sk, state, flags)?;
    count_spilled(1);
    Ok(())
}

/// Writes the state of slot (`bucket`, `way`).
#[inline(always)]
pub(super) fn write_state(bucket: u32, way: usize, state: &ConnectionState) -> Result<(), i32> {
    let slot = CONN_STATES
        .get_ptr_mut(slot_index(bucket, way))
        .ok_or(E2BIG)?;
    // SAFETY: the pointer comes from the lookup just made.
    unsafe { *slot = *state };
    Ok(())
}

/// The index in CONN_STATES of slot (`bucket`, `way`).
#[inline(always)]
pub(super) fn slot_index(bucket: u32, way: usize) -> u32 {
    bucket * CONN_WAYS as u32 + way as u32
}

/// The tracking state of `sk`, if it is tracked.
#[inline(always)]
pub(super) fn tracked(sk: u64) -> Option<(*mut ConnectionState, Tier)> {
    if let Some(bucket) = bucket_of(sk)
        && let Some(keys) = CONNECTIONS.get_ptr(bucket)
    {
        for way in 0..CONN_WAYS {
            // SAFETY: an aligned 8-byte load from the bucket looked up in this run.
            if unsafe { core::ptr::read_volatile(&raw const (*keys)[way]) } == sk {
                let state = CONN_STATES.get_ptr_mut(slot_index(bucket, way))?;
                return Some((state, Tier::First(bucket, way)));
            }
        }
    }
    if !spill_in_use() {
        return None;
    }
    CONNECTIONS_SPILL
        .get_ptr_mut(sk)
        .map(|state| (state, Tier::Spill))
}

/// Stops tracking `sk`, found in `tier` by [`tracked`].
#[inline(always)]
pub(super) fn untrack(sk: u64, tier: Tier) {
    match tier {
        Tier::First(bucket, way) => {
            if let Some(keys) = CONNECTIONS.get_ptr_mut(bucket) {
                // SAFETY: an aligned 8-byte store into the bucket looked up in this run.
                unsafe { core::ptr::write_volatile(&raw mut (*keys)[way], 0) };
            }
        }
        Tier::Spill => {
            if CONNECTIONS_SPILL.remove(sk).is_ok() {
                // Wrapping add of -1.
                count_spilled(u64::MAX);
            }
        }
    }
}

/// The first-tier bucket of `sk`: a multiplicative hash of its address's low 32 bits (the
/// socket slab's object addresses differ there), `None` while the loader has not sized it.
#[inline(always)]
pub(super) fn bucket_of(sk: u64) -> Option<u32> {
    // SAFETY: a plain read of a global the loader initialised; volatile as in `offsets`.
    let buckets = unsafe { core::ptr::read_volatile(&raw const CONN_BUCKETS) };
    if buckets == 0 {
        return None;
    }
    Some(((low32(sk) >> 4).wrapping_mul(0x9e37_79b1) >> 8) % buckets)
}

/// The low 32 bits of `value` as a plain number. `value` may be a typed kernel pointer (the
/// BTF program's socket), on which the verifier allows no shift or multiply; a 32-bit move
/// yields a number from it (allowed to programs that may read kernel addresses, as ours).
#[inline(always)]
pub(super) fn low32(value: u64) -> u32 {
    let low: u64;
    // SAFETY: a register move; no memory is touched.
    unsafe {
        core::arch::asm!(
            "w0 = w1",
            in("r1") value,
            lateout("r0") low,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    low as u32
}

/// Claims a free slot: compare-and-swap of its key from 0 to [`CLAIMED`]; whether it was won.
#[inline(always)]
pub(super) fn claim(slot: *mut u64) -> bool {
    let old: u64;
    // SAFETY: `slot` is an aligned 8-byte word of a map value looked up in this run.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64(r1 + 0, r0, r2)",
            in("r1") slot,
            in("r2") CLAIMED,
            inout("r0") 0u64 => old,
            options(nostack, preserves_flags),
        )
    };
    old == 0
}

#[inline(always)]
pub(super) fn spill_in_use() -> bool {
    CONN_SPILLED.get(0).is_some_and(|n| *n != 0)
}

#[inline(always)]
pub(super) fn count_spilled(n: u64) {
    if let Some(count) = CONN_SPILLED.get_ptr_mut(0) {
        // SAFETY: the pointer comes from the lookup just made.
        unsafe { increment(count, n) };
    }
}

/// `-E2BIG`: what a full preallocated hash map answers an insert of a new key.
pub(super) const E2BIG: i32 = -7;

/// `-EEXIST`: an insert of a key already there, with `BPF_NOEXIST`.
pub(super) const EEXIST: i32 = -17;

#[inline(always)]
pub(super) fn spill_enabled() -> bool {
    SOCKETS_CONFIG.get(0).is_some_and(|c| c.spill != 0)
}
