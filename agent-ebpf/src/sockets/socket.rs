//! What counting a state change reads of a socket, by hook: helper reads at resolved offsets, the
//! classic tracepoint's record, or direct loads through a typed pointer.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TracePointContext};
use brokerscope_common::{
    fields::Field,
    processes::NO_FIELD,
    sockets::{ConnEvent, SocketOffsets, payload_bytes},
    telemetry::ProbeError,
};

use super::{
    events::{AF_INET, event_offsets, sock_tuple, state_tuple, v4_mapped},
    helpers::{done_bit, field, kread, kread_netns, socket_payload, v6},
};
use crate::fields::load;

/// The first bytes of a tracepoint record, copied with one helper call: this tracepoint fires
/// on every TCP state change on the node, and one copy is cheaper than a helper call per field.
/// Fields past the window (a kernel that moved them) are read one by one instead.
pub(super) struct RecordHead<'a> {
    ctx: &'a TracePointContext,
    bytes: [u8; RECORD_HEAD],
}

/// `inet_sock_set_state` keeps what we read in its first 32 bytes (since Linux 4.16).
pub(super) const RECORD_HEAD: usize = 40;

impl<'a> RecordHead<'a> {
    #[inline(always)]
    pub(super) fn read(ctx: &'a TracePointContext) -> Result<Self, ProbeError> {
        // SAFETY: the copy is checked by bpf_probe_read_kernel; the record is at least as
        // long as its fixed fields, which end past the window for this tracepoint.
        let bytes =
            unsafe { ctx.read_at::<[u8; RECORD_HEAD]>(0) }.map_err(|_| ProbeError::ReadContext)?;
        Ok(Self { ctx, bytes })
    }

    #[inline(always)]
    pub(super) fn get<T: Copy>(&self, offset: u32) -> Result<T, ProbeError> {
        let offset = offset as usize;
        if offset + size_of::<T>() <= RECORD_HEAD {
            // SAFETY: in bounds of the copied bytes; unaligned read of plain integers.
            Ok(unsafe { core::ptr::read_unaligned(self.bytes.as_ptr().add(offset).cast::<T>()) })
        } else {
            field(self.ctx, offset as u32)
        }
    }
}

/// What counting a state change reads of a socket, by hook: helper reads at offsets the loader
/// resolved ([`Probed`], and [`Traced`] with the classic tracepoint's record), or direct loads
/// through a typed pointer ([`Typed`]).
pub(super) trait Socket: Copy {
    /// The socket's address: the key of the connection maps.
    fn addr(self) -> u64;
    /// The local port (host order).
    fn local_port(self) -> Result<u16, ProbeError>;
    /// The inode number of the socket's network namespace.
    fn netns(self) -> Result<u32, ProbeError>;
    /// Payload bytes received and had acknowledged, the socket being in `state`.
    fn payload(self, state: i32) -> Result<(u64, u64), ProbeError>;
    fn total_retrans(self) -> Result<u32, ProbeError>;
    /// The smoothed RTT in microseconds, shifted left by 3.
    fn srtt_us(self) -> Result<u32, ProbeError>;
    /// Remote port, family and addresses, for a connection event.
    fn tuple(self, e: &mut ConnEvent) -> Result<(), ProbeError>;
    /// When the socket became established, at its passive open: now, in `bpf_ktime_get_ns`'s
    /// clock (CLOCK_MONOTONIC).
    #[inline(always)]
    fn established_ns(self) -> u64 {
        // SAFETY: no preconditions.
        unsafe { bpf_ktime_get_ns() }
    }
}

/// A socket read with `bpf_probe_read_kernel` at offsets from BTF.
#[derive(Clone, Copy)]
pub(super) struct Probed<'a> {
    pub(super) sk: u64,
    pub(super) off: &'a SocketOffsets,
}

impl Socket for Probed<'_> {
    #[inline(always)]
    fn addr(self) -> u64 {
        self.sk
    }
    #[inline(always)]
    fn local_port(self) -> Result<u16, ProbeError> {
        kread(self.sk, self.off.sock_num, ProbeError::ReadSocket)
    }
    #[inline(always)]
    fn netns(self) -> Result<u32, ProbeError> {
        kread_netns(self.sk, self.off)
    }
    #[inline(always)]
    fn payload(self, state: i32) -> Result<(u64, u64), ProbeError> {
        socket_payload(self.sk, state, self.off)
    }
    #[inline(always)]
    fn total_retrans(self) -> Result<u32, ProbeError> {
        kread(self.sk, self.off.tcp_total_retrans, ProbeError::ReadSocket)
    }
    #[inline(always)]
    fn srtt_us(self) -> Result<u32, ProbeError> {
        kread(self.sk, self.off.tcp_srtt_us, ProbeError::ReadSocket)
    }
    #[inline(always)]
    fn tuple(self, e: &mut ConnEvent) -> Result<(), ProbeError> {
        sock_tuple(self.sk, e)
    }
}

/// As [`Probed`], with the port and the tuple from the classic tracepoint's record.
#[derive(Clone, Copy)]
pub(super) struct Traced<'a> {
    pub(super) probed: Probed<'a>,
    pub(super) record: &'a RecordHead<'a>,
}

impl Socket for Traced<'_> {
    #[inline(always)]
    fn addr(self) -> u64 {
        self.probed.sk
    }
    #[inline(always)]
    fn local_port(self) -> Result<u16, ProbeError> {
        self.record.get(self.probed.off.tp_sport)
    }
    #[inline(always)]
    fn netns(self) -> Result<u32, ProbeError> {
        self.probed.netns()
    }
    #[inline(always)]
    fn payload(self, state: i32) -> Result<(u64, u64), ProbeError> {
        self.probed.payload(state)
    }
    #[inline(always)]
    fn total_retrans(self) -> Result<u32, ProbeError> {
        self.probed.total_retrans()
    }
    #[inline(always)]
    fn srtt_us(self) -> Result<u32, ProbeError> {
        self.probed.srtt_us()
    }
    #[inline(always)]
    fn tuple(self, e: &mut ConnEvent) -> Result<(), ProbeError> {
        if event_offsets().state_family == NO_FIELD {
            // A record without the tuple: the socket has it.
            return sock_tuple(self.probed.sk, e);
        }
        state_tuple(self.record.ctx, e)
    }
}

/// A `struct tcp_sock *` the verifier knows the type of: each field is one load.
#[derive(Clone, Copy)]
pub(super) struct Typed {
    pub(super) tp: u64,
}

impl Socket for Typed {
    #[inline(always)]
    fn addr(self) -> u64 {
        self.tp
    }
    /// The clock TCP read when it began processing the handshake's last ACK, a moment before
    /// this transition (0.2-24 µs measured here): the same clock as `bpf_ktime_get_ns`, read
    /// with one load instead of a helper call. Never 0 on a socket that has received a packet;
    /// the helper is the fallback all the same.
    #[inline(always)]
    fn established_ns(self) -> u64 {
        match load!(u64, self.tp, Field::TcpClockCache) {
            // SAFETY: no preconditions.
            0 => unsafe { bpf_ktime_get_ns() },
            ns => ns,
        }
    }
    #[inline(always)]
    fn local_port(self) -> Result<u16, ProbeError> {
        Ok(load!(u16, self.tp, Field::SockNum))
    }
    #[inline(always)]
    fn netns(self) -> Result<u32, ProbeError> {
        let net = load!(u64, self.tp, Field::SockNet);
        if net == 0 {
            return Err(ProbeError::ReadNetns);
        }
        Ok(load!(u32, net, Field::NetInum))
    }
    #[inline(always)]
    fn payload(self, state: i32) -> Result<(u64, u64), ProbeError> {
        let flags = load!(u64, self.tp, Field::SockFlags);
        Ok(payload_bytes(
            state,
            load!(u64, self.tp, Field::TcpBytesAcked),
            load!(u64, self.tp, Field::TcpBytesReceived),
            load!(u32, self.tp, Field::TcpSndUna),
            load!(u32, self.tp, Field::TcpWriteSeq),
            (flags >> done_bit()) & 1 == 1,
        ))
    }
    #[inline(always)]
    fn total_retrans(self) -> Result<u32, ProbeError> {
        Ok(load!(u32, self.tp, Field::TcpTotalRetrans))
    }
    #[inline(always)]
    fn srtt_us(self) -> Result<u32, ProbeError> {
        Ok(load!(u32, self.tp, Field::TcpSrttUs))
    }
    #[inline(always)]
    fn tuple(self, e: &mut ConnEvent) -> Result<(), ProbeError> {
        e.remote_port = u16::from_be(load!(u16, self.tp, Field::SockDport));
        e.family = load!(u16, self.tp, Field::SockFamily);
        if e.family == AF_INET {
            // Network-order addresses: their bytes in memory order.
            e.local_addr = v4_mapped(load!(u32, self.tp, Field::SockRcvSaddr).to_ne_bytes());
            e.remote_addr = v4_mapped(load!(u32, self.tp, Field::SockDaddr).to_ne_bytes());
        } else {
            e.local_addr = v6(
                load!(u64, self.tp, Field::SockV6RcvSaddr),
                load!(u64, self.tp, Field::SockV6RcvSaddrHigh),
            );
            e.remote_addr = v6(
                load!(u64, self.tp, Field::SockV6Daddr),
                load!(u64, self.tp, Field::SockV6DaddrHigh),
            );
        }
        Ok(())
    }
}
