//! Kernel fields the hot programs load with one instruction, at offsets the loader patches into
//! the instructions before the object goes to the kernel.
//!
//! A BTF tracepoint hands its program typed kernel pointers, and the verifier lets it load a
//! field of the pointed-to struct directly (a plain load, guarded by the kernel's exception
//! table) instead of calling `bpf_probe_read_kernel` (about 100 ns per call measured here, most
//! of a program's cost). The instruction must hold the field's offset as a constant, and offsets
//! differ between kernels; Rust has no CO-RE relocations. So each direct load is compiled with a
//! placeholder offset, [`PLACEHOLDER_BASE`] plus the field's index, and the loader rewrites every
//! placeholder with the offset it resolved from the running kernel's BTF: CO-RE by hand, for
//! the few fields the hot paths read. No real load uses an offset this large (structs the
//! programs read are far smaller), so a placeholder cannot be mistaken for one.

/// A field loaded directly. Offsets are from the start of the struct the program's pointer has
/// as its BTF type: `struct tcp_sock` (whose first member is, nested, its `struct sock`),
/// `struct net`, `struct task_struct`.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// `sock.__sk_common.skc_num`: the local port, host order (u16).
    SockNum = 0,
    /// `sock.__sk_common.skc_flags` (unsigned long).
    SockFlags = 1,
    /// `sock.__sk_common.skc_net.net` (struct net *).
    SockNet = 2,
    /// `net.ns.inum` (u32).
    NetInum = 3,
    /// `tcp_sock.bytes_received` (u64).
    TcpBytesReceived = 4,
    /// `tcp_sock.bytes_acked` (u64).
    TcpBytesAcked = 5,
    /// `tcp_sock.snd_una` (u32).
    TcpSndUna = 6,
    /// `tcp_sock.write_seq` (u32).
    TcpWriteSeq = 7,
    /// `tcp_sock.total_retrans` (u32).
    TcpTotalRetrans = 8,
    /// `tcp_sock.srtt_us` (u32).
    TcpSrttUs = 9,
    /// `sock.__sk_common.skc_dport`: the remote port, network order (u16).
    SockDport = 10,
    /// `sock.__sk_common.skc_family` (u16).
    SockFamily = 11,
    /// `sock.__sk_common.skc_daddr` (u32, network order).
    SockDaddr = 12,
    /// `sock.__sk_common.skc_rcv_saddr` (u32, network order).
    SockRcvSaddr = 13,
    /// `sock.__sk_common.skc_v6_daddr`, first and second 8 bytes.
    SockV6Daddr = 14,
    SockV6DaddrHigh = 15,
    /// `sock.__sk_common.skc_v6_rcv_saddr`, first and second 8 bytes.
    SockV6RcvSaddr = 16,
    SockV6RcvSaddrHigh = 17,
    /// `task_struct.sched_info.run_delay`: time spent waiting on a run queue, in ns (u64).
    TaskRunDelay = 18,
    /// `task_struct.__state` (`state` before 5.14; its low 32 bits).
    TaskState = 19,
    /// `task_struct.se.sum_exec_runtime` (u64).
    TaskSumExec = 20,
    /// `task_struct.se.prev_sum_exec_runtime` (u64).
    TaskPrevSumExec = 21,
    /// `task_struct.pid`: the thread id (u32).
    TaskPid = 22,
    /// `task_struct.tgid`: the process id (u32).
    TaskTgid = 23,
    /// `sock.sk_protocol` (u16).
    SockProtocol = 24,
    /// `tcp_sock.tcp_clock_cache`: when TCP last read its clock for this socket, in ns of
    /// CLOCK_MONOTONIC (u64).
    TcpClockCache = 25,
    /// `task_struct.flags` (u32; `PF_EXITING` once the thread has begun to exit).
    TaskFlags = 26,
}

impl Field {
    /// Every field, in index order.
    pub const ALL: [Field; 27] = [
        Field::SockNum,
        Field::SockFlags,
        Field::SockNet,
        Field::NetInum,
        Field::TcpBytesReceived,
        Field::TcpBytesAcked,
        Field::TcpSndUna,
        Field::TcpWriteSeq,
        Field::TcpTotalRetrans,
        Field::TcpSrttUs,
        Field::SockDport,
        Field::SockFamily,
        Field::SockDaddr,
        Field::SockRcvSaddr,
        Field::SockV6Daddr,
        Field::SockV6DaddrHigh,
        Field::SockV6RcvSaddr,
        Field::SockV6RcvSaddrHigh,
        Field::TaskRunDelay,
        Field::TaskState,
        Field::TaskSumExec,
        Field::TaskPrevSumExec,
        Field::TaskPid,
        Field::TaskTgid,
        Field::SockProtocol,
        Field::TcpClockCache,
        Field::TaskFlags,
    ];

    /// The offset compiled into the program in place of this field's.
    pub const fn placeholder(self) -> i16 {
        PLACEHOLDER_BASE + self as i16
    }

    /// The field a placeholder stands for; `None` for any other offset.
    pub const fn from_placeholder(offset: i16) -> Option<Field> {
        if offset < PLACEHOLDER_BASE || offset >= PLACEHOLDER_BASE + Self::ALL.len() as i16 {
            return None;
        }
        Some(Self::ALL[(offset - PLACEHOLDER_BASE) as usize])
    }
}

/// The immediate of the call instruction that casts a socket pointer to `struct tcp_sock *`.
/// The loader makes it a call of the `bpf_rdonly_cast` kfunc, which the verifier replaces with
/// a register move, or where the kernel has none, of the `bpf_skc_to_tcp_sock` helper.
pub const CAST_CALL_PLACEHOLDER: i32 = 0x7fca_0c01;
/// The immediate moved into the cast's second argument: the BTF id of `struct tcp_sock`.
pub const CAST_TYPE_PLACEHOLDER: i32 = 0x7fca_0c02;
/// `BPF_FUNC_skc_to_tcp_sock`, the cast's fallback (Linux 5.9+).
pub const BPF_FUNC_SKC_TO_TCP_SOCK: i32 = 137;

/// The first placeholder offset. Far above any struct field the programs load (a `tcp_sock`
/// is about 2.5 KiB), and below `i16::MAX`, the largest offset an instruction holds.
pub const PLACEHOLDER_BASE: i16 = 0x7f00;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_round_trip_and_nothing_else_is_one() {
        for (i, field) in Field::ALL.into_iter().enumerate() {
            assert_eq!(field as usize, i, "ALL is in index order");
            assert_eq!(Field::from_placeholder(field.placeholder()), Some(field));
        }
        for offset in [0, 8, 2048, PLACEHOLDER_BASE - 1, i16::MAX, -8] {
            assert_eq!(Field::from_placeholder(offset), None, "{offset}");
        }
        assert_eq!(
            Field::from_placeholder(PLACEHOLDER_BASE + Field::ALL.len() as i16),
            None
        );
    }
}
