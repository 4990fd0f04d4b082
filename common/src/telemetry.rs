//! The kernel programs' account of themselves: how often each ran, and what failed.
//!
//! Kernel programs fail open: a failed read or a full map never stops a socket, it bumps one of
//! the error counters instead, and the loader exports them as `brokerscope_probe_errors_total`.

/// Name of the per-CPU array counting each program's runs (`brokerscope_probe_events_total`).
pub const PROBE_EVENTS_MAP: &str = "PROBE_EVENTS";

/// The kernel programs. The discriminant is the index in [`PROBE_EVENTS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// `sock:inet_sock_set_state`: TCP state changes (accepts and closes, with the closed
    /// connection's bytes, retransmits, RTT and lifetime).
    SockState = 0,
    /// `tcp:tcp_retransmit_skb`: retransmits of tracked connections, as they happen.
    Retransmit = 1,
    /// `tcp:tcp_send_reset`: RSTs sent on watched listeners' connections.
    SendReset = 2,
    /// `tcp:tcp_receive_reset`: RSTs received on watched listeners' connections.
    ReceiveReset = 3,
    /// `iter/tcp`: a sweep of a namespace's sockets when it gets watched listeners: adopts the
    /// connections that were open before (tracked from then on) and registers the listening
    /// sockets. Without [`Program::ConnLive`] and [`Program::ListenLive`], it also reads open
    /// connections' bytes and listen drops at every scrape.
    TcpLive = 4,
    /// `sched:sched_process_exec`: any exec, for broker discovery.
    ProcessExec = 5,
    /// `sched:sched_process_exit`: a registered broker's exit.
    ProcessExit = 6,
    /// `syscalls:sys_enter_openat`: a broker's file opens (log recovery). On standby: attached
    /// only while a broker is starting (see [`Program::standby`]).
    StateOpenat = 7,
    /// `syscalls:sys_enter_openat2`: as [`Program::StateOpenat`].
    StateOpenat2 = 8,
    /// `signal:signal_deliver`: SIGTERM delivered to a broker.
    StateSignal = 9,
    /// raw `sched_switch`: brokers' on-CPU time, context switches, run-queue latency (the
    /// switched-out thread's own scheduler totals: no wake-up hook is needed).
    SchedSwitch = 10,
    /// `block:block_rq_issue`: block requests brokers issue (bytes).
    BlockIssue = 11,
    /// `block:block_rq_complete`: their latency.
    BlockComplete = 12,
    /// `syscalls:sys_enter_fsync`. On standby: attached only for brokers whose log dirs the
    /// filesystem hooks ([`Program::FsyncExt4Enter`]) do not cover.
    FsyncEnter = 13,
    /// `syscalls:sys_exit_fsync`: fsync count and latency.
    FsyncExit = 14,
    /// `syscalls:sys_enter_fdatasync`.
    FdatasyncEnter = 15,
    /// `syscalls:sys_exit_fdatasync`: counted with fsync.
    FdatasyncExit = 16,
    /// `raw_tracepoint/inet_sock_set_state`: the same counting as [`Program::SockState`] at a
    /// fraction of the cost; preferred, with the classic tracepoint as its fallback.
    SockStateRaw = 17,
    /// `iter/bpf_map_elem` over the connection map: open tracked connections' bytes at scrape
    /// time, at a cost in tracked connections only.
    ConnLive = 18,
    /// `iter/bpf_map_elem` over the listening-socket map: listen drops at scrape time.
    ListenLive = 19,
    /// `tp_btf/inet_sock_set_state`: the same counting as [`Program::SockStateRaw`], reading
    /// the socket with direct loads (see [`crate::fields`]) instead of helper calls; preferred,
    /// with the raw tracepoint as its fallback.
    SockStateBtf = 20,
    /// `tp_btf/sched_switch`: [`Program::SchedSwitch`] with direct loads; preferred, with the
    /// raw tracepoint as its fallback.
    SchedSwitchBtf = 21,
    /// `iter/bpf_map_elem` over the spill tier of tracked connections: as [`Program::ConnLive`].
    ConnSpillLive = 22,
    /// `ext4:ext4_sync_file_enter`: fsync and fdatasync (and msync(MS_SYNC), O_SYNC writes) of
    /// ext4 files, without touching any other syscall.
    FsyncExt4Enter = 23,
    /// `ext4:ext4_sync_file_exit`: their count and latency.
    FsyncExt4Exit = 24,
    /// `tp_btf/sched_process_exit`: [`Program::ProcessExit`] with `group_dead` read from the
    /// tracepoint's arguments (Linux 6.13+) instead of its record through a helper; preferred,
    /// with the classic tracepoint as its fallback.
    ProcessExitBtf = 25,
    /// `xfs:xfs_file_fsync`: fsync and fdatasync of XFS files, counted (no exit tracepoint:
    /// no duration).
    FsyncXfs = 26,
    /// `btrfs:btrfs_sync_file`: the same for Btrfs.
    FsyncBtrfs = 27,
    /// `block:block_rq_insert`: block requests a broker's task queues on an I/O scheduler,
    /// which a kernel worker may issue later (counted here, in the submitter's context, and
    /// not again at issue).
    BlockInsert = 28,
}

/// What a program is for, as a user asks about it: when every program of a capability is
/// refused, `/ready` names the capability as missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    Connections,
    Retransmits,
    Resets,
    OpenSockets,
    Discovery,
    BrokerState,
    Scheduler,
    BlockIo,
    Fsync,
}

impl Capability {
    pub const fn describe(self) -> &'static str {
        match self {
            Capability::Connections => "connections, bytes, RTT and lifetimes per listener",
            Capability::Retransmits => "retransmits as they happen",
            Capability::Resets => "TCP resets sent and received",
            Capability::OpenSockets => "bytes of open connections and listen drops",
            Capability::Discovery => "broker discovery from exec/exit events",
            Capability::BrokerState => "broker shutdown and log recovery events",
            Capability::Scheduler => "CPU time, context switches and run-queue latency",
            Capability::BlockIo => "block I/O bytes and latency",
            Capability::Fsync => "fsync/fdatasync counts and latency",
        }
    }
}

/// When a program on standby is attached (see [`Program::standby`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standby {
    /// While some running broker has not been seen RUNNING yet (STARTING or RECOVERY): only
    /// then do its file opens tell anything.
    BrokerStarting,
    /// While some running broker has a log dir on a filesystem the filesystem fsync hooks do
    /// not cover (or unknown log dirs).
    FsyncUncovered,
}

impl Standby {
    /// For /ready: when the programs are attached (why not always is the same for all: they
    /// are `syscalls:*` tracepoints, see [`Program::standby`]).
    pub const fn describe(self) -> &'static str {
        match self {
            Standby::BrokerStarting => "attached only while a broker is STARTING or in RECOVERY",
            Standby::FsyncUncovered => {
                "attached only while a broker has a log dir the fsync hooks do not cover"
            }
        }
    }
}

impl Program {
    /// Every program, in index order. Bounds [`PROBE_EVENTS_MAP`].
    pub const ALL: [Program; 29] = [
        Program::SockState,
        Program::Retransmit,
        Program::SendReset,
        Program::ReceiveReset,
        Program::TcpLive,
        Program::ProcessExec,
        Program::ProcessExit,
        Program::StateOpenat,
        Program::StateOpenat2,
        Program::StateSignal,
        Program::SchedSwitch,
        Program::BlockIssue,
        Program::BlockComplete,
        Program::FsyncEnter,
        Program::FsyncExit,
        Program::FdatasyncEnter,
        Program::FdatasyncExit,
        Program::SockStateRaw,
        Program::ConnLive,
        Program::ListenLive,
        Program::SockStateBtf,
        Program::SchedSwitchBtf,
        Program::ConnSpillLive,
        Program::FsyncExt4Enter,
        Program::FsyncExt4Exit,
        Program::ProcessExitBtf,
        Program::FsyncXfs,
        Program::FsyncBtrfs,
        Program::BlockInsert,
    ];

    /// Capacity of [`PROBE_EVENTS_MAP`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The ELF symbol of the program, which is also the `program` label of its metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Program::SockState => "sock_state",
            Program::Retransmit => "tcp_retransmit",
            Program::SendReset => "tcp_send_reset",
            Program::ReceiveReset => "tcp_receive_reset",
            Program::TcpLive => "tcp_live",
            Program::ProcessExec => "process_exec",
            Program::ProcessExit => "process_exit",
            Program::StateOpenat => "state_openat",
            Program::StateOpenat2 => "state_openat2",
            Program::StateSignal => "state_signal",
            Program::SchedSwitch => "sched_switch",
            Program::BlockIssue => "block_issue",
            Program::BlockComplete => "block_complete",
            Program::FsyncEnter => "fsync_enter",
            Program::FsyncExit => "fsync_exit",
            Program::FdatasyncEnter => "fdatasync_enter",
            Program::FdatasyncExit => "fdatasync_exit",
            Program::SockStateRaw => "sock_state_raw",
            Program::ConnLive => "conn_live",
            Program::ListenLive => "listen_live",
            Program::SockStateBtf => "sock_state_btf",
            Program::SchedSwitchBtf => "sched_switch_btf",
            Program::ConnSpillLive => "conn_spill_live",
            Program::FsyncExt4Enter => "fsync_ext4_enter",
            Program::FsyncExt4Exit => "fsync_ext4_exit",
            Program::ProcessExitBtf => "process_exit_btf",
            Program::FsyncXfs => "fsync_xfs",
            Program::FsyncBtrfs => "fsync_btrfs",
            Program::BlockInsert => "block_insert",
        }
    }

    /// The hook it attaches to, the `hook` label of `brokerscope_probe_attached`.
    pub const fn hook(self) -> &'static str {
        match self {
            Program::SockState => "tracepoint/sock/inet_sock_set_state",
            Program::Retransmit => "tracepoint/tcp/tcp_retransmit_skb",
            Program::SendReset => "tracepoint/tcp/tcp_send_reset",
            Program::ReceiveReset => "tracepoint/tcp/tcp_receive_reset",
            Program::TcpLive => "iter/tcp",
            Program::ProcessExec => "tracepoint/sched/sched_process_exec",
            Program::ProcessExit => "tracepoint/sched/sched_process_exit",
            Program::StateOpenat => "tracepoint/syscalls/sys_enter_openat",
            Program::StateOpenat2 => "tracepoint/syscalls/sys_enter_openat2",
            Program::StateSignal => "tracepoint/signal/signal_deliver",
            Program::SchedSwitch => "raw_tracepoint/sched_switch",
            Program::BlockIssue => "tracepoint/block/block_rq_issue",
            Program::BlockComplete => "tracepoint/block/block_rq_complete",
            Program::FsyncEnter => "tracepoint/syscalls/sys_enter_fsync",
            Program::FsyncExit => "tracepoint/syscalls/sys_exit_fsync",
            Program::FdatasyncEnter => "tracepoint/syscalls/sys_enter_fdatasync",
            Program::FdatasyncExit => "tracepoint/syscalls/sys_exit_fdatasync",
            Program::SockStateRaw => "raw_tracepoint/inet_sock_set_state",
            Program::ConnLive => "iter/bpf_map_elem/CONNECTIONS",
            Program::ListenLive => "iter/bpf_map_elem/LISTEN_SOCKS",
            Program::SockStateBtf => "tp_btf/inet_sock_set_state",
            Program::SchedSwitchBtf => "tp_btf/sched_switch",
            Program::ConnSpillLive => "iter/bpf_map_elem/CONNECTIONS_SPILL",
            Program::FsyncExt4Enter => "tracepoint/ext4/ext4_sync_file_enter",
            Program::FsyncExt4Exit => "tracepoint/ext4/ext4_sync_file_exit",
            Program::ProcessExitBtf => "tp_btf/sched_process_exit",
            Program::FsyncXfs => "tracepoint/xfs/xfs_file_fsync",
            Program::FsyncBtrfs => "tracepoint/btrfs/btrfs_sync_file",
            Program::BlockInsert => "tracepoint/block/block_rq_insert",
        }
    }

    /// What is lost when this program cannot be loaded, and what takes over. No program is
    /// one the agent cannot work without: it serves what the others count.
    pub const fn fallback(self) -> Option<&'static str> {
        match self {
            Program::SockState => Some(
                "connections, their bytes, RTT and lifetimes are not counted (no other hook \
                 for TCP state changes)",
            ),
            Program::ProcessExitBtf => {
                Some("the classic tracepoint program process_exit reports exits instead")
            }
            Program::SockStateBtf => {
                Some("the raw tracepoint program sock_state_raw counts instead")
            }
            Program::SchedSwitchBtf => {
                Some("the raw tracepoint program sched_switch counts instead")
            }
            Program::SockStateRaw => {
                Some("the classic tracepoint program sock_state counts instead")
            }
            Program::Retransmit => Some("retransmits are counted when connections close"),
            Program::SendReset | Program::ReceiveReset => Some("resets are not counted"),
            Program::ConnLive | Program::ConnSpillLive | Program::ListenLive => Some(
                "tcp_live reads open connections and listeners at every scrape instead, walking \
                 each watched namespace's whole socket table",
            ),
            Program::TcpLive => Some(
                "bytes of open connections, listen drops and connections older than the agent \
                 are not seen; bytes are counted when connections close",
            ),
            Program::ProcessExec | Program::ProcessExit => {
                Some("discovery rescans /proc every 2 s instead of reacting to exec/exit")
            }
            Program::StateOpenat | Program::StateOpenat2 => {
                Some("log recovery is not seen: a broker goes from STARTING to RUNNING")
            }
            Program::StateSignal => {
                Some("SIGTERM is not seen: a listening broker shows UNKNOWN (127), never RUNNING")
            }
            Program::SchedSwitch => {
                Some("CPU time, context switches and run-queue latency are not counted")
            }
            Program::BlockIssue | Program::BlockComplete => {
                Some("block I/O bytes and latency are not counted")
            }
            Program::BlockInsert => Some(
                "block requests an I/O scheduler queues and a kernel worker issues (Linux 6.1 \
                 issues O_DIRECT writes so) are not attributed to the broker",
            ),
            Program::FsyncEnter
            | Program::FsyncExit
            | Program::FdatasyncEnter
            | Program::FdatasyncExit => {
                Some("fsync calls are not counted on filesystems other than ext4, xfs and btrfs")
            }
            Program::FsyncExt4Enter | Program::FsyncExt4Exit => {
                Some("fsyncs of ext4 files are not counted")
            }
            Program::FsyncXfs => Some("fsyncs of XFS files are not counted"),
            Program::FsyncBtrfs => Some("fsyncs of Btrfs files are not counted"),
        }
    }

    /// The capability the program serves (alone or with its alternatives).
    pub const fn capability(self) -> Capability {
        match self {
            Program::SockState | Program::SockStateRaw | Program::SockStateBtf => {
                Capability::Connections
            }
            Program::Retransmit => Capability::Retransmits,
            Program::SendReset | Program::ReceiveReset => Capability::Resets,
            Program::TcpLive | Program::ConnLive | Program::ConnSpillLive | Program::ListenLive => {
                Capability::OpenSockets
            }
            Program::ProcessExec | Program::ProcessExit | Program::ProcessExitBtf => {
                Capability::Discovery
            }
            Program::StateOpenat | Program::StateOpenat2 | Program::StateSignal => {
                Capability::BrokerState
            }
            Program::SchedSwitch | Program::SchedSwitchBtf => Capability::Scheduler,
            Program::BlockIssue | Program::BlockComplete | Program::BlockInsert => {
                Capability::BlockIo
            }
            Program::FsyncEnter
            | Program::FsyncExit
            | Program::FdatasyncEnter
            | Program::FdatasyncExit
            | Program::FsyncExt4Enter
            | Program::FsyncExt4Exit
            | Program::FsyncXfs
            | Program::FsyncBtrfs => Capability::Fsync,
        }
    }

    /// (category, name) of the tracepoint, for the programs attached to one.
    pub const fn tracepoint(self) -> Option<(&'static str, &'static str)> {
        match self {
            Program::SockState => Some(("sock", "inet_sock_set_state")),
            Program::Retransmit => Some(("tcp", "tcp_retransmit_skb")),
            Program::SendReset => Some(("tcp", "tcp_send_reset")),
            Program::ReceiveReset => Some(("tcp", "tcp_receive_reset")),
            Program::TcpLive => None,
            Program::ProcessExec => Some(("sched", "sched_process_exec")),
            Program::ProcessExit => Some(("sched", "sched_process_exit")),
            Program::StateOpenat => Some(("syscalls", "sys_enter_openat")),
            Program::StateOpenat2 => Some(("syscalls", "sys_enter_openat2")),
            Program::StateSignal => Some(("signal", "signal_deliver")),
            Program::SchedSwitch => None,
            Program::BlockIssue => Some(("block", "block_rq_issue")),
            Program::BlockComplete => Some(("block", "block_rq_complete")),
            Program::BlockInsert => Some(("block", "block_rq_insert")),
            Program::FsyncEnter => Some(("syscalls", "sys_enter_fsync")),
            Program::FsyncExit => Some(("syscalls", "sys_exit_fsync")),
            Program::FdatasyncEnter => Some(("syscalls", "sys_enter_fdatasync")),
            Program::FdatasyncExit => Some(("syscalls", "sys_exit_fdatasync")),
            Program::FsyncExt4Enter => Some(("ext4", "ext4_sync_file_enter")),
            Program::FsyncExt4Exit => Some(("ext4", "ext4_sync_file_exit")),
            Program::FsyncXfs => Some(("xfs", "xfs_file_fsync")),
            Program::FsyncBtrfs => Some(("btrfs", "btrfs_sync_file")),
            Program::ProcessExitBtf => None,
            Program::SockStateRaw
            | Program::ConnLive
            | Program::ListenLive
            | Program::SockStateBtf
            | Program::SchedSwitchBtf
            | Program::ConnSpillLive => None,
        }
    }

    /// The raw tracepoint, for the programs attached to one.
    pub const fn raw_tracepoint(self) -> Option<&'static str> {
        match self {
            Program::SchedSwitch => Some("sched_switch"),
            Program::SockStateRaw => Some("inet_sock_set_state"),
            _ => None,
        }
    }

    /// The BTF tracepoint, for the programs attached to one.
    pub const fn btf_tracepoint(self) -> Option<&'static str> {
        match self {
            Program::SockStateBtf => Some("inet_sock_set_state"),
            Program::SchedSwitchBtf => Some("sched_switch"),
            Program::ProcessExitBtf => Some("sched_process_exit"),
            _ => None,
        }
    }

    /// Whether attaching the program taxes every process on the node, not only the work it
    /// watches: a `syscalls:*` tracepoint sets the syscall-tracing work flag on every task, so
    /// every syscall takes the kernel's slow path whatever the program filters. Such programs
    /// are attached only when `probes.node_wide_hooks` allows.
    pub const fn node_wide(self) -> bool {
        matches!(
            self,
            Program::StateOpenat
                | Program::StateOpenat2
                | Program::FsyncEnter
                | Program::FsyncExit
                | Program::FdatasyncEnter
                | Program::FdatasyncExit
        )
    }

    /// `node-wide` or `broker-only` (see [`Program::node_wide`]): a broker-only hook fires on
    /// its kind of event node-wide, and its program returns at its first lookup for anything
    /// that is not a broker's.
    pub const fn scope(self) -> &'static str {
        if self.node_wide() {
            "node-wide"
        } else {
            "broker-only"
        }
    }

    /// Programs loaded at start but attached only while what they see matters: each is a
    /// `syscalls:*` tracepoint, and attaching any puts every syscall on the node on the kernel's
    /// slow path (about 20-60 ns each on the machines this was measured on).
    pub const fn standby(self) -> Option<Standby> {
        match self {
            Program::StateOpenat | Program::StateOpenat2 => Some(Standby::BrokerStarting),
            Program::FsyncEnter
            | Program::FsyncExit
            | Program::FdatasyncEnter
            | Program::FdatasyncExit => Some(Standby::FsyncUncovered),
            _ => None,
        }
    }

    /// Programs that count the same thing, most preferred first: the first this kernel takes
    /// serves, and the rest are not attached.
    pub const ALTERNATIVES: [&'static [Program]; 3] = [
        &[
            Program::SockStateBtf,
            Program::SockStateRaw,
            Program::SockState,
        ],
        &[Program::SchedSwitchBtf, Program::SchedSwitch],
        &[Program::ProcessExitBtf, Program::ProcessExit],
    ];
}

/// Name of the per-CPU array the kernel programs count their failures in.
pub const PROBE_ERRORS_MAP: &str = "PROBE_ERRORS";

/// What went wrong in a kernel program. The discriminant is the index in [`PROBE_ERRORS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// A tracepoint field could not be read from the context.
    ReadContext = 0,
    /// The socket's network namespace could not be read through its `struct sock`.
    ReadNetns = 1,
    /// The per-listener counter map was full: a new (netns, port) was not counted.
    ListenersFull = 2,
    /// The per-connection map was full: an accepted connection was counted but not tracked,
    /// so its close will not be seen.
    ConnectionsFull = 3,
    /// A `struct sock`/`tcp_sock` field (bytes, state, port) could not be read.
    ReadSocket = 4,
    /// The process event ring buffer was full: an exec or exit event was lost (discovery's
    /// periodic safety rescan of /proc catches up).
    EventsFull = 5,
    /// The connection event ring buffer was full: a `/v1/events` connection event was lost.
    ConnEventsFull = 6,
    /// The broker-state ring buffer was full: an open or a SIGTERM was lost.
    StateEventsFull = 7,
    /// A user-space string (an opened path) could not be read.
    ReadUser = 8,
    /// The per-broker resources map was full: a broker's resources were not counted.
    ResourcesFull = 9,
    /// A `task_struct` field could not be read (raw scheduler tracepoints).
    ReadTask = 10,
}

impl ProbeError {
    /// Every kind, in index order. Bounds [`PROBE_ERRORS_MAP`].
    pub const ALL: [ProbeError; 11] = [
        ProbeError::ReadContext,
        ProbeError::ReadNetns,
        ProbeError::ListenersFull,
        ProbeError::ConnectionsFull,
        ProbeError::ReadSocket,
        ProbeError::EventsFull,
        ProbeError::ConnEventsFull,
        ProbeError::StateEventsFull,
        ProbeError::ReadUser,
        ProbeError::ResourcesFull,
        ProbeError::ReadTask,
    ];

    /// Capacity of [`PROBE_ERRORS_MAP`]: one slot per kind.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The label value used in `brokerscope_probe_errors_total{kind}`.
    pub const fn label(self) -> &'static str {
        match self {
            ProbeError::ReadContext => "read_context",
            ProbeError::ReadNetns => "read_netns",
            ProbeError::ListenersFull => "listeners_map_full",
            ProbeError::ConnectionsFull => "connections_map_full",
            ProbeError::ReadSocket => "read_socket",
            ProbeError::EventsFull => "process_events_full",
            ProbeError::ConnEventsFull => "connection_events_full",
            ProbeError::StateEventsFull => "state_events_full",
            ProbeError::ReadUser => "read_user",
            ProbeError::ResourcesFull => "resources_map_full",
            ProbeError::ReadTask => "read_task",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_indices_are_dense() {
        for (i, program) in Program::ALL.iter().enumerate() {
            assert_eq!(*program as u32, i as u32);
        }
    }

    #[test]
    fn error_indices_are_dense_and_in_order() {
        for (i, kind) in ProbeError::ALL.iter().enumerate() {
            assert_eq!(*kind as u32, i as u32);
        }
        assert_eq!(ProbeError::COUNT, 11);
    }
}
