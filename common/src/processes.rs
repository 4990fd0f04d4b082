//! Processes: exec and exit events that drive broker discovery without polling /proc.
//!
//! The kernel side (`agent-ebpf/src/processes.rs`) watches `sched:sched_process_exec` (every
//! exec, since any new process may be a broker) and `sched:sched_process_exit` (only for pids
//! the loader registered as brokers), and sends [`ProcessEvent`]s through a ring buffer.

/// Name of the ring buffer carrying [`ProcessEvent`]s.
pub const PROCESS_EVENTS_MAP: &str = "PROCESS_EVENTS";
/// Size of [`PROCESS_EVENTS_MAP`] in bytes (a power of two and a multiple of the page size):
/// 4096 events of 16 bytes plus headers, drained continuously. A full ring drops events,
/// counted in `probe_errors_total{kind="process_events_full"}`; discovery's periodic safety
/// rescan of /proc catches up.
pub const PROCESS_EVENTS_BYTES: u32 = 128 * 1024;

/// An exec event wakes the reader only when no exec event has in this long; the others are
/// committed without a wake-up and read within [`EXEC_WAKE_LAG_MS`]. A wake-up is an irq_work
/// self-interrupt, ≈19 µs of the exec's ≈20 µs on a virtual machine (an exit to the
/// hypervisor), paid by every exec of the node. Broker exits always wake it. The time of the
/// last exec wake-up is kept in the kernel side's `EXEC_WOKEN`.
pub const EXEC_WAKE_EVERY_NS: u64 = 10_000_000;
/// How long after a drain that found events the reader drains again without waiting for a
/// wake-up: longer than [`EXEC_WAKE_EVERY_NS`], so an event committed without one is read at
/// most this long after the one that woke the reader, whose drain started the wait.
pub const EXEC_WAKE_LAG_MS: u64 = 12;

/// Name of the bitmap of broker pids (tgids): bit `tgid % 64` of word `tgid / 64`. Their
/// exits are reported, and the state and resources families count only them. A bitmap in an
/// array, not a hash, because the scheduler hooks ask "is this a broker?" on every context
/// switch of the node: an array lookup is inlined by the verifier, a hash lookup hashes and
/// walks a bucket.
pub const BROKER_PIDS_MAP: &str = "BROKER_PIDS";
/// Words of [`BROKER_PIDS_MAP`]: every pid up to the kernel's limit (`PID_MAX_LIMIT`, 2^22 on
/// 64-bit), 512 KiB.
pub const BROKER_PID_WORDS: u32 = (1 << 22) / 64;
/// Brokers on one node, for the per-broker maps.
pub const BROKER_PIDS_CAPACITY: u32 = 256;

/// Word index and bit of `tgid` in [`BROKER_PIDS_MAP`].
pub const fn broker_bit(tgid: u32) -> (u32, u64) {
    (tgid / 64, 1u64 << (tgid % 64))
}

/// [`ProcessEvent::kind`].
pub const EVENT_EXEC: u32 = 1;
pub const EVENT_EXIT: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessEvent {
    pub kind: u32,
    /// Thread-group id (the process id user space knows).
    pub pid: u32,
    /// `bpf_ktime_get_ns()`.
    pub ts_ns: u64,
}

/// Tracepoint record offsets, read from tracefs at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessOffsets {
    /// `pid` of `sched_process_exec` (the new thread-group leader's pid).
    pub exec_pid: u32,
    /// `group_dead` of `sched_process_exit`, or [`NO_FIELD`] on kernels without it (then a
    /// leader's exit stands for the process's).
    pub exit_group_dead: u32,
}

/// Marks an offset the running kernel's tracepoint does not have.
pub const NO_FIELD: u32 = u32::MAX;

impl ProcessOffsets {
    pub const UNSET: ProcessOffsets = ProcessOffsets {
        exec_pid: 0,
        exit_group_dead: NO_FIELD,
    };
}

/// Name of the global the loader writes [`ProcessOffsets`] into.
pub const PROCESS_OFFSETS_GLOBAL: &str = "PROCESS_OFFSETS";

/// Whether an exiting task ends its process: the last thread when the kernel says so, else the
/// thread-group leader.
pub const fn process_ended(group_dead: Option<bool>, pid: u32, tgid: u32) -> bool {
    match group_dead {
        Some(dead) => dead,
        None => pid == tgid,
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integer fields only, no padding.
    unsafe impl aya::Pod for super::ProcessEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProcessOffsets {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_of_a_process() {
        assert!(process_ended(Some(true), 12, 10));
        assert!(!process_ended(Some(false), 10, 10));
        assert!(process_ended(None, 10, 10));
        assert!(!process_ended(None, 12, 10));
    }

    #[test]
    fn layouts() {
        assert_eq!(core::mem::size_of::<ProcessEvent>(), 16);
        assert_eq!(core::mem::size_of::<ProcessOffsets>(), 8);
        assert!(PROCESS_EVENTS_BYTES.is_power_of_two());
    }
}
