//! Which listeners are counted (WATCHED, its index and watch-all mode) and where their counters
//! are (LISTENERS by slot, or LISTENERS_AUTO).

use aya_ebpf::bindings::BPF_NOEXIST;
use brokerscope_common::{
    sockets::{ListenerCounters, ListenerKey, NO_SLOT, WATCH, Watch, is_watched, watch_index},
    telemetry::ProbeError,
};

use super::maps::{LISTENERS, LISTENERS_AUTO, SOCKETS_CONFIG, WATCH_INDEX, WATCHED, ZERO_COUNTERS};

/// `key`'s WATCHED entry: from its index entry when that holds it, else (another key holds the
/// entry) from WATCHED itself.
#[inline(always)]
pub(super) fn watch_of(key: &ListenerKey) -> Option<Watch> {
    if let Some(entry) = WATCH_INDEX.get_ptr(watch_index(key)) {
        // SAFETY (the block): reads of the entry just looked up, each of one aligned word.
        // `mode` first: the loader writes a key before setting its mode, and x86 keeps loads
        // in order, so a mode seen set comes with its own key and slot.
        let (mode, held, slot, others) = unsafe {
            let mode = core::ptr::read_volatile(&raw const (*entry).watch.mode);
            (
                mode,
                core::ptr::read_volatile(&raw const (*entry).key),
                core::ptr::read_volatile(&raw const (*entry).watch.slot),
                core::ptr::read_volatile(&raw const (*entry).others),
            )
        };
        if mode != 0 && held.netns == key.netns && held.port == key.port {
            return Some(Watch { mode, slot });
        }
        if others == 0 {
            return None;
        }
    }
    // SAFETY: a plain read of a map value returned by the lookup.
    unsafe { WATCHED.get(key).copied() }
}

/// Whether an accept on a listener whose WATCHED entry is `watch` ([`watch_of`]) is counted,
/// and where: its slot, or [`NO_SLOT`].
#[inline(always)]
pub(super) fn watched_slot(watch: Option<Watch>) -> Option<u32> {
    if !is_watched(watch.map(|w| w.mode), watch_all()) {
        return None;
    }
    Some(watch.map_or(NO_SLOT, |w| w.slot))
}

/// A listener whose counters are kept: watched, or in watch-all mode one that already has
/// counters (an outgoing connection's ephemeral port must not become a "listener"). `watch`
/// is `key`'s WATCHED entry ([`watch_of`]).
#[inline(always)]
pub(super) fn counted(key: &ListenerKey, watch: Option<Watch>) -> bool {
    match watch {
        Some(w) => w.mode == WATCH,
        None => watch_all() && LISTENERS_AUTO.get_ptr(key).is_some(),
    }
}

/// The counters of `key` if it has any, without creating them.
#[inline(always)]
pub(super) fn existing_counters(key: &ListenerKey) -> Option<*mut ListenerCounters> {
    match watch_of(key) {
        Some(w) if w.mode == WATCH && w.slot != NO_SLOT => LISTENERS.get_ptr_mut(w.slot),
        _ => LISTENERS_AUTO.get_ptr_mut(key),
    }
}

#[inline(always)]
pub(super) fn watch_all() -> bool {
    SOCKETS_CONFIG.get(0).is_some_and(|c| c.watch_all != 0)
}

/// The counters of listener `key` at `slot`, or for [`NO_SLOT`] its entry in LISTENERS_AUTO,
/// created if need be.
#[inline(always)]
pub(super) fn listener_counters(
    slot: u32,
    key: &ListenerKey,
) -> Result<*mut ListenerCounters, ProbeError> {
    if slot != NO_SLOT {
        return LISTENERS.get_ptr_mut(slot).ok_or(ProbeError::ListenersFull);
    }
    if let Some(ptr) = LISTENERS_AUTO.get_ptr_mut(key) {
        return Ok(ptr);
    }
    // Another CPU may insert the same key between our lookup and insert: NOEXIST makes that a
    // harmless failure and the second lookup finds its entry.
    // The zero value comes from a global: at ~600 bytes it does not fit the 512-byte stack.
    let _ = LISTENERS_AUTO.insert(key, &ZERO_COUNTERS, BPF_NOEXIST.into());
    LISTENERS_AUTO
        .get_ptr_mut(key)
        .ok_or(ProbeError::ListenersFull)
}
