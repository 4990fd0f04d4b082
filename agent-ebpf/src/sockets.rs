//! TCP sockets of watched listeners: accepts, closes, payload bytes, retransmits, resets, RTT
//! and lifetimes, per (network namespace, local port).
//!
//! Attribution uses the socket itself (its `struct sock`: namespace and local port), never the
//! current task: these tracepoints fire in softirq context on whatever task happens to run.
//! Nothing here runs per packet or per send: bytes come from the socket's own RFC 4898 counters
//! read once, when the connection closes (live connections are read by the loader's iterator).

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use brokerscope_common::{
    fields::Field,
    processes::NO_FIELD,
    sockets::{
        CONN_ADOPTED, CONN_CLOSE, CONN_EVENTS_BYTES, CONN_OPEN, CONN_RESET_RECEIVED,
        CONN_RESET_SENT, CONN_RETRANSMIT, CONN_WAYS, CONNECTIONS_CAPACITY, ConnEvent,
        ConnectionState, DURATION_BUCKETS, EventOffsets, FIRST_TIER_MAX, IPPROTO_TCP,
        LISTENERS_CAPACITY, LIVE_CONNECTION, LIVE_LISTENER, ListenerCounters, ListenerKey,
        LiveRecord, NO_SLOT, RTT_BUCKETS, SocketOffsets, SocketsConfig, Transition, WATCH,
        WATCH_INDEX_SIZE, Watch, WatchIndexEntry, classify, is_connection_state, is_watched,
        log2_bucket, payload_bytes, tcp_state, watch_index,
    },
    telemetry::{ProbeError, Program},
};

use crate::{
    fields::{load, opaque_zero, tcp_sock},
    telemetry::{count_error, count_run, increment},
};

/// `add!(counters, field, n)` or `add!(counters, array[i], n)`: atomic add to a field of a
/// LISTENERS or LISTENERS_AUTO value.
macro_rules! add {
    ($counters:ident, $field:ident $([$i:expr])?, $n:expr) => {
        // SAFETY: `$counters` points to a counters value looked up during this run, and any
        // index was bounds-checked by the caller.
        unsafe { increment(&raw mut (*$counters).$field $([$i])?, $n) }
    };
}

/// Written by the loader from the running kernel's tracepoint formats and BTF.
#[unsafe(no_mangle)]
static SOCKET_OFFSETS: SocketOffsets = SocketOffsets::UNSET;

/// Per-listener counters by slot, given by the loader to each watched listener: an array
/// lookup, which the verifier inlines, where a hash lookup was a call, a hash of the key and
/// two more cache lines. The loader resizes it from `probes.listeners_capacity`.
#[map(name = "LISTENERS")]
static LISTENERS: Array<ListenerCounters> = Array::with_max_entries(LISTENERS_CAPACITY, 0);

/// Per-listener counters of listeners without a slot (watch-all mode's, and watched ones once
/// every slot is taken), created at their first accept; bounded like LISTENERS, allocated as
/// used.
#[map(name = "LISTENERS_AUTO")]
static LISTENERS_AUTO: HashMap<ListenerKey, ListenerCounters> =
    HashMap::with_max_entries(LISTENERS_CAPACITY, BPF_F_NO_PREALLOC);

/// Listeners to count, with their slot (or to ignore: the agent's own); bounded like LISTENERS.
#[map(name = "WATCHED")]
static WATCHED: HashMap<ListenerKey, Watch> = HashMap::with_max_entries(LISTENERS_CAPACITY, 0);

/// WATCHED's direct-mapped index, looked up first (see `WATCH_INDEX_MAP`).
#[map(name = "WATCH_INDEX")]
static WATCH_INDEX: Array<WatchIndexEntry> = Array::with_max_entries(WATCH_INDEX_SIZE, 0);

/// Accepted connections not yet closed, in two tiers: this one first, the spill tier while the
/// socket's bucket here is full. Together bounded by `probes.connections_capacity` (the loader
/// sizes both); both full means "counted but not tracked" (see `untracked`).
///
/// The first tier is lock-free: buckets of [`CONN_WAYS`] socket addresses (0: free), the bucket
/// picked by a hash of the address, and [`CONN_STATES`] holding each slot's state at the same
/// index (bucket × [`CONN_WAYS`] + way). A slot is claimed with a compare-and-swap of its key
/// from 0 to [`CLAIMED`], its state written, then its key set; it is freed by writing 0. A hash
/// map's insert and delete (bucket spinlock, preallocated free list) were half of the state
/// change program's time. A bucket is one cache line, so a lookup is one line read, and a scrape
/// walks a small array.
#[map(name = "CONNECTIONS")]
static CONNECTIONS: Array<[u64; CONN_WAYS]> =
    Array::with_max_entries(FIRST_TIER_MAX / CONN_WAYS as u32, 0);

#[map(name = "CONN_STATES")]
static CONN_STATES: Array<ConnectionState> = Array::with_max_entries(FIRST_TIER_MAX, 0);

/// Buckets in use in CONNECTIONS, written by the loader (0 before: nothing goes there).
#[unsafe(no_mangle)]
static CONN_BUCKETS: u32 = 0;

/// The key of a slot being claimed: no socket lives at address 1.
const CLAIMED: u64 = 1;

#[map(name = "CONNECTIONS_SPILL")]
static CONNECTIONS_SPILL: HashMap<u64, ConnectionState> =
    HashMap::with_max_entries(CONNECTIONS_CAPACITY - FIRST_TIER_MAX, 0);

/// Entries in CONNECTIONS_SPILL; while zero, nothing looks there.
#[map(name = "CONN_SPILLED")]
static CONN_SPILLED: Array<u64> = Array::with_max_entries(1, 0);

/// Watched listening sockets by listener, so the scrape-time iterator reads their drops without
/// walking a socket table: set at `listen(2)` and by the namespace sweep, cleared at close.
/// Bounded like LISTENERS.
#[map(name = "LISTEN_SOCKS")]
static LISTEN_SOCKS: HashMap<ListenerKey, u64> = HashMap::with_max_entries(LISTENERS_CAPACITY, 0);

/// Initial value of a new LISTENERS_AUTO entry (too large for the BPF stack).
static ZERO_COUNTERS: ListenerCounters = ListenerCounters::ZERO;

/// One entry: live settings, updated in place by the loader.
#[map(name = "SOCKETS_CONFIG")]
static SOCKETS_CONFIG: Array<SocketsConfig> = Array::with_max_entries(1, 0);

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn sock_state(ctx: TracePointContext) -> u32 {
    run(&ctx, Program::SockState, try_sock_state)
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit(ctx: TracePointContext) -> u32 {
    run(&ctx, Program::Retransmit, try_retransmit)
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    run(&ctx, Program::SendReset, |ctx| {
        let off = offsets();
        let port = if off.tp_send_reset_saddr != NO_FIELD {
            // The sockaddr's port is in network order.
            u16::from_be(field(ctx, off.tp_send_reset_saddr + 2)?)
        } else {
            field(ctx, off.tp_send_reset_sport)?
        };
        try_reset(ctx, off.tp_send_reset_skaddr, port, true)
    })
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    run(&ctx, Program::ReceiveReset, |ctx| {
        let off = offsets();
        let port: u16 = field(ctx, off.tp_receive_reset_sport)?;
        try_reset(ctx, off.tp_receive_reset_skaddr, port, false)
    })
}

#[inline(always)]
fn run<C: EbpfContext>(
    ctx: &C,
    program: Program,
    f: impl FnOnce(&C) -> Result<(), ProbeError>,
) -> u32 {
    count_run(program);
    if let Err(error) = f(ctx) {
        count_error(error);
        // Only failures are logged: the success path must stay cheap. The log ring is bounded,
        // so a storm of failures drops log records, never counts.
        warn!(
            ctx,
            "{}: {} (error kind {})",
            program.name(),
            error.label(),
            error as u32
        );
    }
    0
}

#[inline(always)]
fn offsets() -> SocketOffsets {
    // SAFETY: a plain read of a global the loader initialised; volatile so the compiler cannot
    // fold the compiled-in placeholder.
    unsafe { core::ptr::read_volatile(&SOCKET_OFFSETS) }
}

#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u32) -> Result<T, ProbeError> {
    // SAFETY: the offset comes from the tracepoint's own format file; the read is checked by
    // bpf_probe_read_kernel.
    unsafe { ctx.read_at::<T>(offset as usize) }.map_err(|_| ProbeError::ReadContext)
}

/// Reads a `T` at `base + offset` of a kernel object.
#[inline(always)]
fn kread<T>(base: u64, offset: u32, error: ProbeError) -> Result<T, ProbeError> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.map_err(|_| error)
}

/// The first bytes of a tracepoint record, copied with one helper call: this tracepoint fires
/// on every TCP state change on the node, and one copy is cheaper than a helper call per field.
/// Fields past the window (a kernel that moved them) are read one by one instead.
struct RecordHead<'a> {
    ctx: &'a TracePointContext,
    bytes: [u8; RECORD_HEAD],
}

/// `inet_sock_set_state` keeps what we read in its first 32 bytes (since Linux 4.16).
const RECORD_HEAD: usize = 40;

impl<'a> RecordHead<'a> {
    #[inline(always)]
    fn read(ctx: &'a TracePointContext) -> Result<Self, ProbeError> {
        // SAFETY: the copy is checked by bpf_probe_read_kernel; the record is at least as
        // long as its fixed fields, which end past the window for this tracepoint.
        let bytes =
            unsafe { ctx.read_at::<[u8; RECORD_HEAD]>(0) }.map_err(|_| ProbeError::ReadContext)?;
        Ok(Self { ctx, bytes })
    }

    #[inline(always)]
    fn get<T: Copy>(&self, offset: u32) -> Result<T, ProbeError> {
        let offset = offset as usize;
        if offset + size_of::<T>() <= RECORD_HEAD {
            // SAFETY: in bounds of the copied bytes; unaligned read of plain integers.
            Ok(unsafe { core::ptr::read_unaligned(self.bytes.as_ptr().add(offset).cast::<T>()) })
        } else {
            field(self.ctx, offset as u32)
        }
    }
}

fn try_sock_state(ctx: &TracePointContext) -> Result<(), ProbeError> {
    let off = offsets();
    let record = RecordHead::read(ctx)?;
    let protocol: u16 = record.get(off.tp_protocol)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let oldstate: i32 = record.get(off.tp_oldstate)?;
    let newstate: i32 = record.get(off.tp_newstate)?;
    let sk: u64 = record.get(off.tp_skaddr)?;
    let socket = Traced {
        probed: Probed { sk, off: &off },
        record: &record,
    };
    on_state_change(socket, oldstate, newstate)
}

/// The same hook as a raw tracepoint, the fallback of [`sock_state_btf`]: no trace record is
/// built for it, and the arguments (`sk`, `oldstate`, `newstate`) are read without a helper
/// call, so the transitions that matter nothing (most of them) cost almost nothing. The
/// protocol and port come from the socket, at offsets from BTF.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn sock_state_raw(ctx: RawTracePointContext) -> i32 {
    run(&ctx, Program::SockStateRaw, try_sock_state_raw) as i32
}

fn try_sock_state_raw(ctx: &RawTracePointContext) -> Result<(), ProbeError> {
    let sk: u64 = ctx.arg(0);
    let oldstate = ctx.arg::<u64>(1) as i32;
    let newstate = ctx.arg::<u64>(2) as i32;
    if classify(oldstate, newstate) == Transition::Other {
        return Ok(());
    }
    let off = offsets();
    let protocol: u16 = kread(sk, off.sock_protocol, ProbeError::ReadSocket)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    on_state_change(Probed { sk, off: &off }, oldstate, newstate)
}

/// The same hook as a BTF tracepoint, preferred when the kernel allows it: its argument is a
/// typed `struct sock *`, so every field is one load instruction (at an offset the loader
/// patched in, see [`crate::fields`]) instead of a `bpf_probe_read_kernel` call.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn sock_state_btf(ctx: BtfTracePointContext) -> i32 {
    run(&ctx, Program::SockStateBtf, try_sock_state_btf) as i32
}

fn try_sock_state_btf(ctx: &BtfTracePointContext) -> Result<(), ProbeError> {
    let oldstate: i32 = ctx.arg(1);
    let newstate: i32 = ctx.arg(2);
    if classify(oldstate, newstate) == Transition::Other {
        return Ok(());
    }
    let sk: u64 = ctx.arg(0);
    if load!(u16, sk, Field::SockProtocol) != IPPROTO_TCP {
        return Ok(());
    }
    let tp = tcp_sock(sk);
    if tp == 0 {
        return Ok(());
    }
    on_state_change(Typed { tp }, oldstate, newstate)
}

/// What counting a state change reads of a socket, by hook: helper reads at offsets the loader
/// resolved ([`Probed`], and [`Traced`] with the classic tracepoint's record), or direct loads
/// through a typed pointer ([`Typed`]).
trait Socket: Copy {
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
struct Probed<'a> {
    sk: u64,
    off: &'a SocketOffsets,
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
struct Traced<'a> {
    probed: Probed<'a>,
    record: &'a RecordHead<'a>,
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
struct Typed {
    tp: u64,
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

/// An IPv6 address from its two halves as loaded (memory order).
#[inline(always)]
fn v6(low: u64, high: u64) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&low.to_ne_bytes());
    a[8..].copy_from_slice(&high.to_ne_bytes());
    a
}

/// Bit of `SOCK_DONE` in `sk_flags`.
#[inline(always)]
fn done_bit() -> u32 {
    // SAFETY: a plain read of a global the loader initialised; volatile as in `offsets`.
    unsafe { core::ptr::read_volatile(&raw const SOCKET_OFFSETS.sock_done_bit) }
}

/// Counts an accept or a close of `socket`.
#[inline(always)]
fn on_state_change(socket: impl Socket, oldstate: i32, newstate: i32) -> Result<(), ProbeError> {
    let sk = socket.addr();
    match classify(oldstate, newstate) {
        Transition::PassiveOpen => {
            let listener = ListenerKey::new(socket.netns()?, socket.local_port()?);
            let Some(slot) = watched_slot(watch_of(&listener)) else {
                return Ok(());
            };
            let counters = listener_counters(slot, &listener)?;
            add!(counters, accepted, 1);
            let zero = opaque_zero();
            let state = ConnectionState {
                listener,
                established_ns: socket.established_ns(),
                base_received: zero,
                base_sent: zero,
                retrans_seen: zero as u32,
                flags: zero as u32,
                slot,
                _pad: 0,
            };
            if track(sk, &state, 0).is_err() {
                add!(counters, untracked, 1);
                return Err(ProbeError::ConnectionsFull);
            }
            send_event(CONN_OPEN, &listener, |e| socket.tuple(e));
            Ok(())
        }
        Transition::Listen => {
            let listener = ListenerKey::new(socket.netns()?, socket.local_port()?);
            if counted(&listener, watch_of(&listener)) {
                let _ = LISTEN_SOCKS.insert(&listener, &sk, 0);
            }
            Ok(())
        }
        Transition::Close if oldstate == tcp_state::LISTEN => {
            let listener = ListenerKey::new(socket.netns()?, socket.local_port()?);
            // SAFETY: a plain read of a map value returned by the lookup.
            if unsafe { LISTEN_SOCKS.get(&listener) } == Some(&sk) {
                let _ = LISTEN_SOCKS.remove(&listener);
            }
            Ok(())
        }
        Transition::Close => {
            let Some((state, tier)) = tracked(sk) else {
                return Ok(());
            };
            // SAFETY: the pointer came from a successful lookup and is valid for this run.
            let state = unsafe { *state };
            untrack(sk, tier);
            let counters = listener_counters(state.slot, &state.listener)?;
            add!(counters, closed, 1);
            let accounted = account_close(socket, oldstate, &state, counters);
            send_event(CONN_CLOSE, &state.listener, |e| {
                close_details(e, socket, oldstate, &state)?;
                socket.tuple(e)
            });
            accounted
        }
        Transition::Other => Ok(()),
    }
}

/// Adds a closing connection's payload bytes, outstanding retransmits, RTT and lifetime.
#[inline(always)]
fn account_close(
    socket: impl Socket,
    oldstate: i32,
    state: &ConnectionState,
    counters: *mut ListenerCounters,
) -> Result<(), ProbeError> {
    // At a CLOSE transition the socket's last state is the old one.
    let (sent, received) = socket.payload(oldstate)?;
    add!(counters, bytes_sent, sent.saturating_sub(state.base_sent));
    add!(
        counters,
        bytes_received,
        received.saturating_sub(state.base_received)
    );

    let total_retrans = socket.total_retrans()?;
    let retransmits = u64::from(total_retrans.saturating_sub(state.retrans_seen));
    add!(counters, retransmits, retransmits);

    let rtt_us = u64::from(socket.srtt_us()? >> 3);
    if rtt_us > 0 {
        add!(counters, rtt_sum_us, rtt_us);
        let i = log2_bucket(rtt_us, RTT_BUCKETS);
        if i < RTT_BUCKETS {
            add!(counters, rtt[i], 1);
        }
    }
    // An adopted connection's start is unknown: its lifetime is not observed.
    if state.flags & CONN_ADOPTED == 0 {
        // SAFETY: no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        let us = now.saturating_sub(state.established_ns) / 1000;
        add!(counters, duration_sum_us, us);
        let i = log2_bucket(us, DURATION_BUCKETS);
        if i < DURATION_BUCKETS {
            add!(counters, duration[i], 1);
        }
    }
    Ok(())
}

fn try_retransmit(ctx: &TracePointContext) -> Result<(), ProbeError> {
    let off = offsets();
    if off.tp_retransmit_err != NO_FIELD {
        let err: i32 = field(ctx, off.tp_retransmit_err)?;
        if err != 0 {
            return Ok(());
        }
    }
    let sk: u64 = field(ctx, off.tp_retransmit_skaddr)?;
    let Some((state, _)) = tracked(sk) else {
        return Ok(());
    };
    let total_retrans: u32 = kread(sk, off.tcp_total_retrans, ProbeError::ReadSocket)?;
    // SAFETY: the pointer came from a successful lookup; the socket is locked by the caller of
    // this tracepoint, so no other retransmit of this socket races this update.
    let (listener, slot, seen) =
        unsafe { ((*state).listener, (*state).slot, (*state).retrans_seen) };
    if total_retrans <= seen {
        return Ok(());
    }
    // SAFETY: as above.
    unsafe { (*state).retrans_seen = total_retrans };
    let counters = listener_counters(slot, &listener)?;
    add!(counters, retransmits, u64::from(total_retrans - seen));
    send_event(CONN_RETRANSMIT, &listener, |e| {
        e.count = u64::from(total_retrans - seen);
        if event_offsets().retransmit_family == NO_FIELD {
            return sock_tuple(sk, e);
        }
        retransmit_tuple(ctx, e)
    });
    Ok(())
}

/// Counts an RST on a watched listener's connection, keyed by the socket's namespace and the
/// local port the tracepoint reports. Not by the connection table, nor by `skc_num`: a
/// `SO_LINGER 0` close sends its RST after the socket moved to CLOSE, which already dropped it
/// from the table and released its port (`inet_num = 0`). RSTs sent without a socket (to closed
/// ports) are not ours.
fn try_reset(
    ctx: &TracePointContext,
    skaddr_offset: u32,
    port: u16,
    sent: bool,
) -> Result<(), ProbeError> {
    let off = offsets();
    let sk: u64 = field(ctx, skaddr_offset)?;
    if sk == 0 {
        return Ok(());
    }
    let key = ListenerKey::new(kread_netns(sk, &off)?, port);
    // Only listeners that have counters: an RST must not create them.
    let Some(counters) = existing_counters(&key) else {
        return Ok(());
    };
    if sent {
        add!(counters, resets_sent, 1);
    } else {
        add!(counters, resets_received, 1);
    }
    let kind = if sent {
        CONN_RESET_SENT
    } else {
        CONN_RESET_RECEIVED
    };
    send_event(kind, &key, |_| Ok(()));
    Ok(())
}

/// Where a tracked connection is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tier {
    /// The first tier's slot: bucket, way.
    First(u32, usize),
    Spill,
}

/// Starts tracking `sk`: in its first-tier bucket, or while that is full in the spill tier.
/// With `BPF_ANY` the new state replaces any entry of `sk` in either tier (the socket iterator
/// may have adopted it an instant before its accept was seen), so no socket is in both; with
/// `BPF_NOEXIST` a tracked socket is left alone.
#[inline(always)]
fn track(sk: u64, state: &ConnectionState, flags: u64) -> Result<(), i32> {
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
fn write_state(bucket: u32, way: usize, state: &ConnectionState) -> Result<(), i32> {
    let slot = CONN_STATES
        .get_ptr_mut(slot_index(bucket, way))
        .ok_or(E2BIG)?;
    // SAFETY: the pointer comes from the lookup just made.
    unsafe { *slot = *state };
    Ok(())
}

/// The index in CONN_STATES of slot (`bucket`, `way`).
#[inline(always)]
fn slot_index(bucket: u32, way: usize) -> u32 {
    bucket * CONN_WAYS as u32 + way as u32
}

/// The tracking state of `sk`, if it is tracked.
#[inline(always)]
fn tracked(sk: u64) -> Option<(*mut ConnectionState, Tier)> {
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
fn untrack(sk: u64, tier: Tier) {
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
fn bucket_of(sk: u64) -> Option<u32> {
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
fn low32(value: u64) -> u32 {
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
fn claim(slot: *mut u64) -> bool {
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
fn spill_in_use() -> bool {
    CONN_SPILLED.get(0).is_some_and(|n| *n != 0)
}

#[inline(always)]
fn count_spilled(n: u64) {
    if let Some(count) = CONN_SPILLED.get_ptr_mut(0) {
        // SAFETY: the pointer comes from the lookup just made.
        unsafe { increment(count, n) };
    }
}

/// `-E2BIG`: what a full preallocated hash map answers an insert of a new key.
const E2BIG: i32 = -7;
/// `-EEXIST`: an insert of a key already there, with `BPF_NOEXIST`.
const EEXIST: i32 = -17;

#[inline(always)]
fn spill_enabled() -> bool {
    SOCKETS_CONFIG.get(0).is_some_and(|c| c.spill != 0)
}

/// `key`'s WATCHED entry: from its index entry when that holds it, else (another key holds the
/// entry) from WATCHED itself.
#[inline(always)]
fn watch_of(key: &ListenerKey) -> Option<Watch> {
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
fn watched_slot(watch: Option<Watch>) -> Option<u32> {
    if !is_watched(watch.map(|w| w.mode), watch_all()) {
        return None;
    }
    Some(watch.map_or(NO_SLOT, |w| w.slot))
}

/// A listener whose counters are kept: watched, or in watch-all mode one that already has
/// counters (an outgoing connection's ephemeral port must not become a "listener"). `watch`
/// is `key`'s WATCHED entry ([`watch_of`]).
#[inline(always)]
fn counted(key: &ListenerKey, watch: Option<Watch>) -> bool {
    match watch {
        Some(w) => w.mode == WATCH,
        None => watch_all() && LISTENERS_AUTO.get_ptr(key).is_some(),
    }
}

/// The counters of `key` if it has any, without creating them.
#[inline(always)]
fn existing_counters(key: &ListenerKey) -> Option<*mut ListenerCounters> {
    match watch_of(key) {
        Some(w) if w.mode == WATCH && w.slot != NO_SLOT => LISTENERS.get_ptr_mut(w.slot),
        _ => LISTENERS_AUTO.get_ptr_mut(key),
    }
}

#[inline(always)]
fn watch_all() -> bool {
    SOCKETS_CONFIG.get(0).is_some_and(|c| c.watch_all != 0)
}

/// The counters of listener `key` at `slot`, or for [`NO_SLOT`] its entry in LISTENERS_AUTO,
/// created if need be.
#[inline(always)]
fn listener_counters(slot: u32, key: &ListenerKey) -> Result<*mut ListenerCounters, ProbeError> {
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

/// The inode number of the network namespace a socket belongs to: `sk->__sk_common.skc_net.net
/// ->ns.inum`, at offsets the loader resolved from BTF.
#[inline(always)]
fn kread_netns(sk: u64, off: &SocketOffsets) -> Result<u32, ProbeError> {
    let net: u64 = kread(sk, off.sock_net, ProbeError::ReadNetns)?;
    kread(net, off.net_inum, ProbeError::ReadNetns)
}

/// Live sockets, on demand: the loader creates an `iter/tcp` iterator inside each watched
/// network namespace at scrape time. For each tracked connection it writes the payload bytes
/// moved since tracking began (closed connections are already in LISTENERS); for each watched
/// listening socket its drop count; and an open connection on a watched listener that is not
/// tracked (it predates the agent) is adopted: tracked from now on, its past not counted.
///
/// The context is `struct bpf_iter__tcp { struct bpf_iter_meta *meta; struct sock_common
/// *sk_common; uid_t uid; }`; `sk_common` is NULL on the final call.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn tcp_live(ctx: *mut core::ffi::c_void) -> i32 {
    count_run(Program::TcpLive);
    if let Err(error) = try_tcp_live(ctx) {
        count_error(error);
    }
    0
}

fn try_tcp_live(ctx: *mut core::ffi::c_void) -> Result<(), ProbeError> {
    // Read the socket pointer as a plain number: the offsets below are runtime values, and the
    // verifier only allows constant offsets on typed kernel pointers.
    let sk: u64 = kread(ctx as u64, 8, ProbeError::ReadContext)?;
    if sk == 0 {
        return Ok(());
    }
    let off = offsets();
    let state: u8 = kread(sk, off.sock_state, ProbeError::ReadSocket)?;
    let state = i32::from(state);
    let listening = state == tcp_state::LISTEN;
    if !listening && !is_connection_state(state) {
        return Ok(());
    }
    if listening {
        let port: u16 = kread(sk, off.sock_num, ProbeError::ReadSocket)?;
        let key = ListenerKey::new(kread_netns(sk, &off)?, port);
        // One lookup for both questions: is it watched, is its socket kept for the drops.
        let watch = watch_of(&key);
        if watched_slot(watch).is_none() {
            return Ok(());
        }
        if counted(&key, watch) {
            let _ = LISTEN_SOCKS.insert(&key, &sk, 0);
        }
        let drops: u32 = kread(sk, off.sock_drops, ProbeError::ReadSocket)?;
        return emit(ctx, &listener_record(key, drops));
    }

    let (sent, received) = socket_payload(sk, state, &off)?;
    match tracked(sk) {
        Some((tracked, _)) => {
            // SAFETY: the pointer came from a successful lookup and is valid for this run.
            let tracked = unsafe { *tracked };
            emit(ctx, &connection_record(&tracked, sent, received))
        }
        None => {
            let port: u16 = kread(sk, off.sock_num, ProbeError::ReadSocket)?;
            let key = ListenerKey::new(kread_netns(sk, &off)?, port);
            // A broker's listener (explicitly watched) gets its counters now. In watch-all mode
            // only listeners that already have counters: an outgoing connection's ephemeral
            // port must not become a "listener".
            let (slot, counters) = match watch_of(&key) {
                Some(w) if w.mode == WATCH => (w.slot, listener_counters(w.slot, &key)?),
                Some(_) => return Ok(()),
                None if watch_all() => match LISTENERS_AUTO.get_ptr_mut(&key) {
                    Some(counters) => (NO_SLOT, counters),
                    None => return Ok(()),
                },
                None => return Ok(()),
            };
            let total_retrans: u32 = kread(sk, off.tcp_total_retrans, ProbeError::ReadSocket)?;
            let adopted = ConnectionState {
                listener: key,
                // SAFETY: no preconditions.
                established_ns: unsafe { bpf_ktime_get_ns() },
                base_received: received,
                base_sent: sent,
                retrans_seen: total_retrans,
                flags: CONN_ADOPTED,
                slot,
                _pad: 0,
            };
            // NOEXIST: if the socket was tracked meanwhile, leave its entry alone.
            if track(sk, &adopted, u64::from(BPF_NOEXIST)).is_ok() {
                add!(counters, adopted, 1);
            }
            Ok(())
        }
    }
}

/// Open tracked connections at scrape time: iterators over the connection tiers themselves,
/// so a scrape costs the number of tracked connections (and the first tier's few buckets), in
/// every namespace at once, instead of a walk of each namespace's whole socket table. For
/// each entry still open they write the payload bytes moved since tracking began.
///
/// The context is `struct bpf_iter__bpf_map_elem { meta; map; void *key; void *value; }`;
/// key and value are NULL on the final call. This one walks the first tier's buckets.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_map_elem")]
pub fn conn_live(ctx: *mut core::ffi::c_void) -> i32 {
    count_run(Program::ConnLive);
    if let Err(error) = try_conn_live(ctx) {
        count_error(error);
    }
    0
}

/// The same over the spill tier (a hash map of socket address to state).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_map_elem")]
pub fn conn_spill_live(ctx: *mut core::ffi::c_void) -> i32 {
    count_run(Program::ConnSpillLive);
    if let Err(error) = try_conn_spill_live(ctx) {
        count_error(error);
    }
    0
}

/// The key and value pointers of a map element iterator's context, as plain numbers (see
/// `try_tcp_live`); `None` on the final call.
#[inline(always)]
fn map_elem(ctx: *mut core::ffi::c_void) -> Result<Option<(u64, u64)>, ProbeError> {
    let key: u64 = kread(ctx as u64, 16, ProbeError::ReadContext)?;
    let value: u64 = kread(ctx as u64, 24, ProbeError::ReadContext)?;
    Ok((key != 0 && value != 0).then_some((key, value)))
}

/// Whether `sk` is still the socket the entry was made for: the address of a closed socket can
/// be reused by a new one (TCP sockets are SLAB_TYPESAFE_BY_RCU), so the entry's listener must
/// match the socket's own namespace and local port.
#[inline(always)]
fn same_listener(sk: u64, key: &ListenerKey, off: &SocketOffsets) -> Result<bool, ProbeError> {
    let port: u16 = kread(sk, off.sock_num, ProbeError::ReadSocket)?;
    Ok(port == key.port && kread_netns(sk, off)? == key.netns)
}

fn try_conn_live(ctx: *mut core::ffi::c_void) -> Result<(), ProbeError> {
    let Some((key, value)) = map_elem(ctx)? else {
        return Ok(());
    };
    let bucket: u32 = kread(key, 0, ProbeError::ReadContext)?;
    let keys: [u64; CONN_WAYS] = kread(value, 0, ProbeError::ReadContext)?;
    let off = offsets();
    for (way, sk) in keys.into_iter().enumerate() {
        if sk == 0 || sk == CLAIMED {
            continue;
        }
        let Some(tracked) = CONN_STATES.get(slot_index(bucket, way)) else {
            continue;
        };
        live_connection(ctx, sk, tracked, &off)?;
    }
    Ok(())
}

fn try_conn_spill_live(ctx: *mut core::ffi::c_void) -> Result<(), ProbeError> {
    let Some((key, value)) = map_elem(ctx)? else {
        return Ok(());
    };
    let sk: u64 = kread(key, 0, ProbeError::ReadContext)?;
    let tracked: ConnectionState = kread(value, 0, ProbeError::ReadContext)?;
    live_connection(ctx, sk, &tracked, &offsets())
}

/// Writes a tracked connection's bytes, if `sk` is still open and still the socket `tracked`
/// was made for.
#[inline(always)]
fn live_connection(
    ctx: *mut core::ffi::c_void,
    sk: u64,
    tracked: &ConnectionState,
    off: &SocketOffsets,
) -> Result<(), ProbeError> {
    let state: u8 = kread(sk, off.sock_state, ProbeError::ReadSocket)?;
    let state = i32::from(state);
    // Closing right now: its close accounting has it, or is about to.
    if !is_connection_state(state) || !same_listener(sk, &tracked.listener, off)? {
        return Ok(());
    }
    let (sent, received) = socket_payload(sk, state, off)?;
    emit(ctx, &connection_record(&tracked, sent, received))
}

/// A tracked connection's record: its payload bytes since tracking began, from the socket's
/// totals. Every field is written, zeros included, as values the compiler cannot merge into a
/// byte-wise memset call (see `opaque_zero`).
#[inline(always)]
fn connection_record(tracked: &ConnectionState, sent: u64, received: u64) -> LiveRecord {
    let zero = opaque_zero();
    LiveRecord {
        listener: tracked.listener,
        kind: LIVE_CONNECTION,
        _pad: zero as u32,
        bytes_sent: sent.saturating_sub(tracked.base_sent),
        bytes_received: received.saturating_sub(tracked.base_received),
        drops: zero,
    }
}

/// A watched listening socket's record: its drops. Written as [`connection_record`].
#[inline(always)]
fn listener_record(listener: ListenerKey, drops: u32) -> LiveRecord {
    let zero = opaque_zero();
    LiveRecord {
        listener,
        kind: LIVE_LISTENER,
        _pad: zero as u32,
        bytes_sent: zero,
        bytes_received: zero,
        drops: u64::from(drops),
    }
}

/// Watched listening sockets at scrape time: an iterator over LISTEN_SOCKS, writing each
/// one's drops (SYNs and accepts dropped on queue overflow).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_map_elem")]
pub fn listen_live(ctx: *mut core::ffi::c_void) -> i32 {
    count_run(Program::ListenLive);
    if let Err(error) = try_listen_live(ctx) {
        count_error(error);
    }
    0
}

fn try_listen_live(ctx: *mut core::ffi::c_void) -> Result<(), ProbeError> {
    let Some((key, value)) = map_elem(ctx)? else {
        return Ok(());
    };
    let listener: ListenerKey = kread(key, 0, ProbeError::ReadContext)?;
    let sk: u64 = kread(value, 0, ProbeError::ReadContext)?;
    let off = offsets();
    let state: u8 = kread(sk, off.sock_state, ProbeError::ReadSocket)?;
    if i32::from(state) != tcp_state::LISTEN
        || !same_listener(sk, &listener, &off)?
        || !counted(&listener, watch_of(&listener))
    {
        return Ok(());
    }
    let drops: u32 = kread(sk, off.sock_drops, ProbeError::ReadSocket)?;
    emit(ctx, &listener_record(listener, drops))
}

/// Payload bytes a socket in `state` has received and had acknowledged.
#[inline(always)]
fn socket_payload(sk: u64, state: i32, off: &SocketOffsets) -> Result<(u64, u64), ProbeError> {
    let bytes_acked: u64 = kread(sk, off.tcp_bytes_acked, ProbeError::ReadSocket)?;
    let bytes_received: u64 = kread(sk, off.tcp_bytes_received, ProbeError::ReadSocket)?;
    let snd_una: u32 = kread(sk, off.tcp_snd_una, ProbeError::ReadSocket)?;
    let write_seq: u32 = kread(sk, off.tcp_write_seq, ProbeError::ReadSocket)?;
    let flags: u64 = kread(sk, off.sock_flags, ProbeError::ReadSocket)?;
    let done = (flags >> off.sock_done_bit) & 1 == 1;
    Ok(payload_bytes(
        state,
        bytes_acked,
        bytes_received,
        snd_una,
        write_seq,
        done,
    ))
}

/// Writes one record to the iterator's seq_file (`ctx->meta->seq`).
#[inline(always)]
fn emit(ctx: *mut core::ffi::c_void, record: &LiveRecord) -> Result<(), ProbeError> {
    // SAFETY: ctx is the iterator context: its first word is `struct bpf_iter_meta *meta`,
    // whose first word is `struct seq_file *seq`. Both are direct loads of typed kernel
    // pointers at constant offsets, which is what bpf_seq_write requires of its first argument.
    unsafe {
        let meta = *(ctx as *const *const *mut core::ffi::c_void);
        let seq = *meta;
        aya_ebpf::helpers::generated::bpf_seq_write(
            seq.cast(),
            (record as *const LiveRecord).cast(),
            size_of::<LiveRecord>() as u32,
        );
    }
    Ok(())
}

// ---- Connection events for /v1/events -------------------------------------------------------
// Only while SOCKETS_CONFIG.events is set (a subscriber is connected): otherwise each call site
// costs one array lookup.

/// Connection events; bounded by its byte size, a full ring drops (and counts) the event.
#[map(name = "CONN_EVENTS")]
static CONN_EVENTS: RingBuf = RingBuf::with_byte_size(CONN_EVENTS_BYTES, 0);

/// Written by the loader from the tracepoint formats.
#[unsafe(no_mangle)]
static EVENT_OFFSETS: EventOffsets = EventOffsets::UNSET;

/// Emits a `kind` event of `listener`'s connection when events are on; `fill` adds what the
/// site knows. A failure to fill is counted and the event still goes out with what it has.
#[inline(always)]
fn send_event(
    kind: u32,
    listener: &ListenerKey,
    fill: impl FnOnce(&mut ConnEvent) -> Result<(), ProbeError>,
) {
    if !SOCKETS_CONFIG.get(0).is_some_and(|c| c.events != 0) {
        return;
    }
    // Zeros the compiler cannot merge into a byte-wise memset call (see `opaque_zero`).
    let zero = opaque_zero();
    let zero16 = v6(zero, zero);
    let mut event = ConnEvent {
        kind,
        netns: listener.netns,
        port: listener.port,
        remote_port: zero as u16,
        family: zero as u16,
        _pad: zero as u16,
        local_addr: zero16,
        remote_addr: zero16,
        bytes_sent: zero,
        bytes_received: zero,
        duration_ns: zero,
        count: zero,
    };
    if let Err(e) = fill(&mut event) {
        count_error(e);
    }
    if CONN_EVENTS.output::<ConnEvent>(&event, 0).is_err() {
        count_error(ProbeError::ConnEventsFull);
    }
}

#[inline(always)]
fn event_offsets() -> EventOffsets {
    // SAFETY: a plain read of a global the loader initialised; volatile so the compiler cannot
    // fold the compiled-in placeholder.
    unsafe { core::ptr::read_volatile(&EVENT_OFFSETS) }
}

/// Remote port, family and addresses from `sock:inet_sock_set_state`.
#[inline(always)]
fn state_tuple(ctx: &TracePointContext, e: &mut ConnEvent) -> Result<(), ProbeError> {
    let off = event_offsets();
    e.remote_port = field(ctx, off.state_dport)?;
    e.family = field(ctx, off.state_family)?;
    e.local_addr = field(ctx, off.state_saddr_v6)?;
    e.remote_addr = field(ctx, off.state_daddr_v6)?;
    Ok(())
}

/// The same from `tcp:tcp_retransmit_skb`.
#[inline(always)]
fn retransmit_tuple(ctx: &TracePointContext, e: &mut ConnEvent) -> Result<(), ProbeError> {
    let off = event_offsets();
    e.remote_port = field(ctx, off.retransmit_dport)?;
    e.family = field(ctx, off.retransmit_family)?;
    e.local_addr = field(ctx, off.retransmit_saddr_v6)?;
    e.remote_addr = field(ctx, off.retransmit_daddr_v6)?;
    Ok(())
}

/// The remote port, family and addresses from the socket itself (the raw tracepoint has no
/// record): IPv4 addresses as v4-mapped IPv6, as `inet_sock_set_state`'s record has them.
#[inline(always)]
fn sock_tuple(sk: u64, e: &mut ConnEvent) -> Result<(), ProbeError> {
    let off = event_offsets();
    let err = ProbeError::ReadSocket;
    e.remote_port = u16::from_be(kread(sk, off.sock_dport, err)?);
    e.family = kread(sk, off.sock_family, err)?;
    if e.family == AF_INET {
        let local: [u8; 4] = kread(sk, off.sock_rcv_saddr, err)?;
        let remote: [u8; 4] = kread(sk, off.sock_daddr, err)?;
        e.local_addr = v4_mapped(local);
        e.remote_addr = v4_mapped(remote);
    } else if off.sock_v6_daddr != NO_FIELD {
        e.local_addr = kread(sk, off.sock_v6_rcv_saddr, err)?;
        e.remote_addr = kread(sk, off.sock_v6_daddr, err)?;
    }
    Ok(())
}

const AF_INET: u16 = 2;

/// `::ffff:a.b.c.d` from an IPv4 address's bytes. Built from two 8-byte halves: as an array
/// literal, its ten zero bytes became a call to a byte-wise memset (see `opaque_zero`).
#[inline(always)]
fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    let high = [0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]];
    v6(opaque_zero(), u64::from_ne_bytes(high))
}

/// A closing connection's payload bytes over its tracked life, and lifetime (the tuple is
/// filled by the caller).
#[inline(always)]
fn close_details(
    e: &mut ConnEvent,
    socket: impl Socket,
    oldstate: i32,
    state: &ConnectionState,
) -> Result<(), ProbeError> {
    let (sent, received) = socket.payload(oldstate)?;
    e.bytes_sent = sent.saturating_sub(state.base_sent);
    e.bytes_received = received.saturating_sub(state.base_received);
    if state.flags & CONN_ADOPTED == 0 {
        // SAFETY: no preconditions.
        e.duration_ns = unsafe { bpf_ktime_get_ns() }.saturating_sub(state.established_ns);
    }
    Ok(())
}
