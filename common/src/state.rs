//! Broker state: the kernel events the agent derives Kafka's broker state from.
//!
//! The kernel side (`agent-ebpf/src/state.rs`) reports, for registered broker tgids only, every
//! SIGTERM delivered to the broker (`signal:signal_deliver`, the start of a shutdown) and, only
//! where `probes.node_wide_hooks` allows the syscall tracepoints, every `openat`/`openat2` (with
//! the path as the broker passed it). User space sees log recovery from the starting broker's
//! open descriptors without them, and turns those, `/proc` and the broker's listening sockets
//! into Strimzi's numbering (`agent/src/state.rs`).

/// Name of the ring buffer carrying [`StateEvent`]s.
pub const STATE_EVENTS_MAP: &str = "STATE_EVENTS";
/// Size of [`STATE_EVENTS_MAP`] in bytes (a power of two, a multiple of the page size): about
/// 3600 events of 280 bytes. A recovering broker opens its segments in bursts; a full ring drops
/// opens (counted as `state_events_full`), and the recovery estimate then ends by its quiet-time
/// rule instead of reaching zero.
pub const STATE_EVENTS_BYTES: u32 = 1024 * 1024;

/// Longest path carried, NUL included. Longer paths are cut, and then match no segment.
pub const MAX_PATH: usize = 256;

/// [`StateEvent::kind`]: an `openat`/`openat2` by a broker thread.
pub const STATE_EVENT_OPEN: u32 = 1;
/// [`StateEvent::kind`]: SIGTERM delivered to a broker thread.
pub const STATE_EVENT_SIGTERM: u32 = 2;

/// The signal that starts a broker's shutdown.
pub const SIGTERM: i32 = 15;

/// `AT_FDCWD`: a relative path is relative to the working directory.
pub const AT_FDCWD: i32 = -100;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StateEvent {
    pub kind: u32,
    /// Thread-group id of the broker.
    pub tgid: u32,
    /// `bpf_ktime_get_ns()`.
    pub ts_ns: u64,
    /// The `dfd` argument of the open (`AT_FDCWD` for the working directory).
    pub dfd: i32,
    /// Bytes of `path` used, NUL excluded.
    pub len: u32,
    pub path: [u8; MAX_PATH],
}

/// Tracepoint record offsets, read from tracefs at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateOffsets {
    pub openat_dfd: u32,
    pub openat_filename: u32,
    pub openat2_dfd: u32,
    pub openat2_filename: u32,
    pub signal_sig: u32,
    pub _pad: u32,
}

impl StateOffsets {
    pub const UNSET: StateOffsets = StateOffsets {
        openat_dfd: 16,
        openat_filename: 24,
        openat2_dfd: 16,
        openat2_filename: 24,
        signal_sig: 8,
        _pad: 0,
    };
}

/// Name of the global the loader writes [`StateOffsets`] into.
pub const STATE_OFFSETS_GLOBAL: &str = "STATE_OFFSETS";

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integer fields only, no padding (4+4+8+4+4+256 = 280, 8-aligned).
    unsafe impl aya::Pod for super::StateEvent {}
    // SAFETY: as above (six u32).
    unsafe impl aya::Pod for super::StateOffsets {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        assert_eq!(core::mem::size_of::<StateEvent>(), 280);
        assert_eq!(core::mem::size_of::<StateOffsets>(), 24);
        assert!(STATE_EVENTS_BYTES.is_power_of_two());
    }
}
