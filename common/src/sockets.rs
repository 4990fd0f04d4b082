//! TCP sockets: the per-listener connection counters and the per-connection tracking state.
//!
//! The kernel side watches `sock:inet_sock_set_state`. A passive open (`SYN_RECV -> ESTABLISHED`
//! on a socket cloned from a listener) counts an accept on the socket's (network namespace,
//! local port) and starts tracking the socket; the tracked socket's move to `CLOSE` counts a close.
//! Sockets that were open before the agent started are never tracked, so no history is invented.

/// Name of the array of per-listener counters, indexed by the slot the loader gives each
/// watched listener. The slot is in the listener's [`WATCHED_MAP`] entry and in each of its
/// tracked connections' [`ConnectionState`], so the programs reach the counters by index: no
/// hash lookup on an accept's or a close's path.
pub const LISTENERS_MAP: &str = "LISTENERS";
/// Name of the hash map of per-listener counters, keyed by [`ListenerKey`], of listeners
/// counted without a slot: those only watch-all mode counts, and watched ones once every slot
/// is taken. Allocated as used, so it costs nothing while watch-all mode is off.
pub const LISTENERS_AUTO_MAP: &str = "LISTENERS_AUTO";
/// Default capacity of [`LISTENERS_MAP`] (slots) and of [`LISTENERS_AUTO_MAP`]: one entry per
/// (network namespace, listening port) counted. A node with a few hundred pods of a few
/// listeners each fits easily.
pub const LISTENERS_CAPACITY: u32 = 4096;
/// A listener without a slot in [`LISTENERS_MAP`]: its counters are in [`LISTENERS_AUTO_MAP`].
pub const NO_SLOT: u32 = u32::MAX;

/// Name of the first tier of tracked connections: an array of buckets of [`CONN_WAYS`] kernel
/// addresses of `struct sock` (0: a free slot), with their states in [`CONN_STATES_MAP`].
pub const CONNECTIONS_MAP: &str = "CONNECTIONS";
/// Name of the array of the first tier's [`ConnectionState`]s, one per slot.
pub const CONN_STATES_MAP: &str = "CONN_STATES";
/// Name of the global holding the first tier's bucket count.
pub const CONN_BUCKETS_GLOBAL: &str = "CONN_BUCKETS";
/// Slots per first-tier bucket: 8 addresses are one 64-byte cache line.
pub const CONN_WAYS: usize = 8;
/// Default capacity for tracked connections (accepted and not yet closed, node-wide): the
/// sum of [`CONNECTIONS_MAP`] and [`CONNECTIONS_SPILL_MAP`] (see [`connection_tiers`]).
pub const CONNECTIONS_CAPACITY: u32 = 65_536;

/// Name of the second tier of tracked connections, used only while a socket's bucket in
/// [`CONNECTIONS_MAP`] is full: a hash map from its address to its [`ConnectionState`].
pub const CONNECTIONS_SPILL_MAP: &str = "CONNECTIONS_SPILL";
/// Name of the one-entry array counting the entries in [`CONNECTIONS_SPILL_MAP`]: zero lets the
/// close path and the scrape skip the second tier.
pub const CONN_SPILLED_MAP: &str = "CONN_SPILLED";
/// The first tier's largest size. A scrape walks it whole, used or not (as it would a hash
/// map's every bucket): 65536 slots cost about 1.2 ms per scrape here, 4096 about a sixteenth.
pub const FIRST_TIER_MAX: u32 = 4096;

/// Splits a connection capacity into (first tier, spill tier): the first tier holds a
/// sixteenth of it in whole buckets of [`CONN_WAYS`], at least [`MIN_CAPACITY`] and at most
/// [`FIRST_TIER_MAX`]; the spill tier the rest (zero: no second tier).
pub const fn connection_tiers(capacity: u32) -> (u32, u32) {
    let mut first = capacity / 16;
    if first < MIN_CAPACITY {
        first = MIN_CAPACITY;
    }
    if first > FIRST_TIER_MAX {
        first = FIRST_TIER_MAX;
    }
    if first > capacity {
        first = capacity;
    }
    first -= first % CONN_WAYS as u32;
    (first, capacity - first)
}

/// Name of the hash map of watched listening sockets: [`ListenerKey`] to the kernel address of
/// the listening `struct sock`, so their drops can be read without walking a socket table.
/// Bounded like [`LISTENERS_MAP`].
pub const LISTEN_SOCKS_MAP: &str = "LISTEN_SOCKS";

/// Bounds for capacities set from the configuration.
pub const MIN_CAPACITY: u32 = 16;
/// Upper bound: a hash map entry costs roughly key + value + 64 bytes of kernel overhead, so
/// 4 Mi entries of [`ConnectionState`] stay under half a GiB even at the cap.
pub const MAX_CAPACITY: u32 = 4 * 1024 * 1024;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const FIN_WAIT1: i32 = 4;
    pub const FIN_WAIT2: i32 = 5;
    pub const TIME_WAIT: i32 = 6;
    pub const CLOSE: i32 = 7;
    pub const CLOSE_WAIT: i32 = 8;
    pub const LAST_ACK: i32 = 9;
    pub const LISTEN: i32 = 10;
    pub const CLOSING: i32 = 11;
    pub const NEW_SYN_RECV: i32 = 12;
}

/// `IPPROTO_TCP`: `inet_sock_set_state` also fires for SCTP and MPTCP sockets.
pub const IPPROTO_TCP: u16 = 6;

/// A listening port in a network namespace: what every connection is attributed to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    /// Inode number of the socket's network namespace (as in `/proc/<pid>/ns/net`).
    pub netns: u32,
    /// Local port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl ListenerKey {
    pub const fn new(netns: u32, port: u16) -> Self {
        Self {
            netns,
            port,
            _pad: 0,
        }
    }
}

/// Log2 histogram of connection lifetimes in microseconds: bucket `i` counts values in
/// `[2^i, 2^(i+1))` µs (bucket 0 also takes 0 and 1 µs); the last bucket is open-ended.
/// 40 buckets reach 2^40 µs, about 12.7 days.
pub const DURATION_BUCKETS: usize = 40;
/// Log2 histogram of smoothed RTT in microseconds, as [`DURATION_BUCKETS`]; 2^26 µs is 67 s.
pub const RTT_BUCKETS: usize = 26;

/// Counters of one listener. Updated with atomic adds from any CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerCounters {
    /// Passive opens that reached ESTABLISHED.
    pub accepted: u64,
    /// Live connections found by the socket iterator that were open before the agent started:
    /// tracked from then on, never counted as accepted.
    pub adopted: u64,
    /// Tracked connections that reached CLOSE.
    pub closed: u64,
    /// Accepted connections the connection map had no room for: their close cannot be seen.
    pub untracked: u64,
    /// Payload bytes received and sent (acknowledged) by closed tracked connections, counted
    /// from when tracking began; SYN and FIN sequence numbers excluded.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Retransmitted segments of tracked connections.
    pub retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    /// Sum and histogram of accepted connections' lifetimes, observed at close.
    pub duration_sum_us: u64,
    pub duration: [u64; DURATION_BUCKETS],
    /// Sum and histogram of connections' smoothed RTT, observed at close.
    pub rtt_sum_us: u64,
    pub rtt: [u64; RTT_BUCKETS],
}

impl ListenerCounters {
    pub const ZERO: ListenerCounters = ListenerCounters {
        accepted: 0,
        adopted: 0,
        closed: 0,
        untracked: 0,
        bytes_received: 0,
        bytes_sent: 0,
        retransmits: 0,
        resets_sent: 0,
        resets_received: 0,
        duration_sum_us: 0,
        duration: [0; DURATION_BUCKETS],
        rtt_sum_us: 0,
        rtt: [0; RTT_BUCKETS],
    };

    /// Connections open now: accepted or adopted, not yet closed. Untracked connections are
    /// left out rather than counted as open forever.
    pub const fn active(&self) -> u64 {
        (self.accepted + self.adopted)
            .saturating_sub(self.closed)
            .saturating_sub(self.untracked)
    }

    /// Adds `other`'s counts to these: one listener's counters from both maps.
    pub fn add(&mut self, other: &Self) {
        self.accepted += other.accepted;
        self.adopted += other.adopted;
        self.closed += other.closed;
        self.untracked += other.untracked;
        self.bytes_received += other.bytes_received;
        self.bytes_sent += other.bytes_sent;
        self.retransmits += other.retransmits;
        self.resets_sent += other.resets_sent;
        self.resets_received += other.resets_received;
        self.duration_sum_us += other.duration_sum_us;
        for (a, b) in self.duration.iter_mut().zip(other.duration) {
            *a += b;
        }
        self.rtt_sum_us += other.rtt_sum_us;
        for (a, b) in self.rtt.iter_mut().zip(other.rtt) {
            *a += b;
        }
    }
}

impl Default for ListenerCounters {
    fn default() -> Self {
        Self::ZERO
    }
}

/// `ConnectionState::flags`: found live by the iterator, not seen being accepted.
pub const CONN_ADOPTED: u32 = 1;

/// What the kernel keeps per tracked connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionState {
    pub listener: ListenerKey,
    /// When tracking began, in `bpf_ktime_get_ns`'s clock (CLOCK_MONOTONIC). At a passive open
    /// seen by the BTF hook, the socket's `tcp_clock_cache`: when TCP began processing the
    /// handshake's last ACK, a moment before the transition.
    pub established_ns: u64,
    /// Payload bytes already moved when tracking began (0 for accepted connections), so only
    /// what happens afterwards is counted.
    pub base_received: u64,
    pub base_sent: u64,
    /// `tcp_sock.total_retrans` already counted into the listener.
    pub retrans_seen: u32,
    pub flags: u32,
    /// The listener's slot in [`LISTENERS_MAP`] when tracking began, or [`NO_SLOT`].
    pub slot: u32,
    pub _pad: u32,
}

/// Where the kernel programs find what they read, resolved by the loader at load time from the
/// running kernel (tracepoint format files and BTF), never compiled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOffsets {
    /// `sock:inet_sock_set_state` record fields.
    pub tp_skaddr: u32,
    pub tp_oldstate: u32,
    pub tp_newstate: u32,
    pub tp_sport: u32,
    pub tp_protocol: u32,
    /// `skaddr` in `tcp:tcp_retransmit_skb`, `tcp:tcp_send_reset`, `tcp:tcp_receive_reset`.
    pub tp_retransmit_skaddr: u32,
    /// `err` of `tcp:tcp_retransmit_skb` (Linux 6.10+, which also traces failed
    /// retransmits); `NO_FIELD` before, when only sent ones are traced.
    pub tp_retransmit_err: u32,
    pub tp_send_reset_skaddr: u32,
    /// `saddr` of `tcp:tcp_send_reset`: a sockaddr_in/in6 of the local side; its port (network
    /// order) is at byte 2. `NO_FIELD` before Linux 6.10, whose record has `sport` instead.
    pub tp_send_reset_saddr: u32,
    /// `sport` of `tcp:tcp_send_reset` (host order), read where `saddr` is `NO_FIELD`.
    pub tp_send_reset_sport: u32,
    pub tp_receive_reset_skaddr: u32,
    /// `sport` of `tcp:tcp_receive_reset` (host order).
    pub tp_receive_reset_sport: u32,
    /// `struct sock`: `__sk_common.skc_net.net`, `__sk_common.skc_num` (local port),
    /// `__sk_common.skc_state`, `__sk_common.skc_flags`, `sk_drops`.
    pub sock_net: u32,
    pub sock_num: u32,
    pub sock_state: u32,
    pub sock_flags: u32,
    pub sock_drops: u32,
    /// `struct sock`: `sk_protocol` (a plain u16 since Linux 5.6; the raw tracepoint program
    /// needs it and is not used where BTF shows a bitfield).
    pub sock_protocol: u32,
    /// `struct net`: `ns.inum`.
    pub net_inum: u32,
    /// `struct tcp_sock` fields.
    pub tcp_bytes_received: u32,
    pub tcp_bytes_acked: u32,
    pub tcp_snd_una: u32,
    pub tcp_write_seq: u32,
    pub tcp_total_retrans: u32,
    pub tcp_srtt_us: u32,
    /// Bit of `SOCK_DONE` in `sk_flags` (from BTF `enum sock_flags`): set by `tcp_fin()`, so the
    /// peer's FIN was counted in `bytes_received`.
    pub sock_done_bit: u32,
}

impl SocketOffsets {
    /// Placeholder compiled into the object; the loader always overrides it.
    pub const UNSET: SocketOffsets = SocketOffsets {
        tp_skaddr: 0,
        tp_oldstate: 0,
        tp_newstate: 0,
        tp_sport: 0,
        tp_protocol: 0,
        tp_retransmit_skaddr: 0,
        tp_retransmit_err: 0,
        tp_send_reset_skaddr: 0,
        tp_send_reset_saddr: 0,
        tp_send_reset_sport: 0,
        tp_receive_reset_skaddr: 0,
        tp_receive_reset_sport: 0,
        sock_net: 0,
        sock_num: 0,
        sock_state: 0,
        sock_flags: 0,
        sock_drops: 0,
        sock_protocol: 0,
        net_inum: 0,
        tcp_bytes_received: 0,
        tcp_bytes_acked: 0,
        tcp_snd_una: 0,
        tcp_write_seq: 0,
        tcp_total_retrans: 0,
        tcp_srtt_us: 0,
        sock_done_bit: 0,
    };
}

/// What the live-socket iterator (`iter/tcp`) writes per socket of interest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveRecord {
    pub listener: ListenerKey,
    /// [`LIVE_CONNECTION`] or [`LIVE_LISTENER`].
    pub kind: u32,
    pub _pad: u32,
    /// Connections: payload bytes since tracking began, not yet in the listener's counters.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Listeners: `sk_drops` of the listening socket (SYNs and accepts dropped on overflow).
    pub drops: u64,
}

/// [`LiveRecord::kind`]: a tracked connection that is still open.
pub const LIVE_CONNECTION: u32 = 1;
/// [`LiveRecord::kind`]: a watched listening socket.
pub const LIVE_LISTENER: u32 = 2;

/// Full sockets the iterator reads: established or closing, not the mini sockets
/// (`TIME_WAIT`, `NEW_SYN_RECV`) whose memory has no `tcp_sock` behind it.
pub const fn is_connection_state(state: i32) -> bool {
    matches!(
        state,
        tcp_state::ESTABLISHED
            | tcp_state::FIN_WAIT1
            | tcp_state::FIN_WAIT2
            | tcp_state::CLOSE_WAIT
            | tcp_state::LAST_ACK
            | tcp_state::CLOSING
    )
}

/// Name of the hash map of listeners to watch, keyed by [`ListenerKey`], valued by [`Watch`].
/// Filled by the loader from discovery; bounded like [`LISTENERS_MAP`].
pub const WATCHED_MAP: &str = "WATCHED";
pub const WATCH: u32 = 1;
/// The agent's own listener: never counted, even in watch-all mode.
pub const IGNORE: u32 = 2;

/// A [`WATCHED_MAP`] entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watch {
    /// [`WATCH`] or [`IGNORE`].
    pub mode: u32,
    /// A watched listener's slot in [`LISTENERS_MAP`], or [`NO_SLOT`].
    pub slot: u32,
}

/// Name of the direct-mapped index of [`WATCHED_MAP`]: an array of [`WATCH_INDEX_SIZE`]
/// [`WatchIndexEntry`]s, where a listener's entry, if any, is at [`watch_index`] of its key. A
/// lookup is one array element the verifier inlines; a hash map's is a call, a hash of the key
/// and two more cache lines, on every accept. Keys whose index another key holds are found in
/// [`WATCHED_MAP`], which holds every key.
pub const WATCH_INDEX_MAP: &str = "WATCH_INDEX";
/// Entries of [`WATCH_INDEX_MAP`]: a power of two.
pub const WATCH_INDEX_SIZE: u32 = 4096;

/// A [`WATCH_INDEX_MAP`] entry. The loader changes one with two writes, so that a program
/// reading it while it changes never takes one key's watch for another's: a key is written
/// with `watch.mode` 0 (empty), then `mode` alone is set; it is removed by clearing `mode`.
/// Programs read `mode` first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchIndexEntry {
    pub key: ListenerKey,
    /// `mode` 0: no key held here.
    pub watch: Watch,
    /// 1 if some [`WATCHED_MAP`] key has this index but is not the one held here: a lookup
    /// that does not match then asks [`WATCHED_MAP`]. 0 or 1 only, so that it changes as one
    /// byte.
    pub others: u32,
    pub _pad: u32,
}

/// The [`WATCH_INDEX_MAP`] index of `key`: a multiplicative hash of its namespace and port.
pub const fn watch_index(key: &ListenerKey) -> u32 {
    let h = key.netns.wrapping_mul(0x9e37_79b1) ^ (key.port as u32).wrapping_mul(0x85eb_ca6b);
    (h ^ (h >> 16)) & (WATCH_INDEX_SIZE - 1)
}

/// Name of the one-entry array holding [`SocketsConfig`], updated in place for live changes.
pub const SOCKETS_CONFIG_MAP: &str = "SOCKETS_CONFIG";

/// Live kernel-side settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketsConfig {
    /// Non-zero: count every listener on the node, not only [`WATCHED_MAP`]'s.
    pub watch_all: u32,
    /// Non-zero: emit [`ConnEvent`]s into [`CONN_EVENTS_MAP`] (while `/v1/events` has a
    /// subscriber); zero keeps the hot path free of it.
    pub events: u32,
    /// Non-zero: [`CONNECTIONS_SPILL_MAP`] takes connections whose bucket in
    /// [`CONNECTIONS_MAP`] is full.
    pub spill: u32,
}

/// Whether a passive open on a listener is counted.
pub const fn is_watched(watched: Option<u32>, watch_all: bool) -> bool {
    match watched {
        Some(IGNORE) => false,
        Some(_) => true,
        None => watch_all,
    }
}

/// Payload bytes a TCP socket has sent (and had acknowledged) and received, from its
/// RFC 4898 counters. `bytes_acked` counts our FIN once the peer acknowledged it, and
/// `bytes_received` counts the peer's FIN once `tcp_fin()` consumed it (which sets SOCK_DONE);
/// SYNs are in neither. `state` is the socket's state (the old state at a CLOSE transition).
pub const fn payload_bytes(
    state: i32,
    bytes_acked: u64,
    bytes_received: u64,
    snd_una: u32,
    write_seq: u32,
    peer_fin_consumed: bool,
) -> (u64, u64) {
    // Our FIN has been queued (write_seq includes it) exactly in these states.
    let fin_sent = matches!(
        state,
        tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2 | tcp_state::CLOSING | tcp_state::LAST_ACK
    );
    let fin_acked = fin_sent && snd_una == write_seq;
    let sent = bytes_acked.saturating_sub(if fin_acked { 1 } else { 0 });
    let received = bytes_received.saturating_sub(if peer_fin_consumed { 1 } else { 0 });
    (sent, received)
}

/// Log2 bucket of `value` in a histogram of `buckets` buckets (see [`DURATION_BUCKETS`]).
pub const fn log2_bucket(value: u64, buckets: usize) -> usize {
    let bucket = if value < 2 {
        0
    } else {
        (63 - value.leading_zeros()) as usize
    };
    if bucket >= buckets {
        buckets - 1
    } else {
        bucket
    }
}

/// Upper bound (exclusive), in microseconds, of log2 bucket `i`: `2^(i+1)`.
pub const fn log2_bucket_upper_us(i: usize) -> u64 {
    1u64 << (i + 1)
}

/// Name of the global the loader writes [`SocketOffsets`] into.
pub const SOCKET_OFFSETS_GLOBAL: &str = "SOCKET_OFFSETS";

/// What a TCP state change means for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// A connection accepted on a listener is now established.
    PassiveOpen,
    /// The socket is gone; counts a close if the socket was tracked, forgets it if it was a
    /// registered listening socket.
    Close,
    /// A socket started listening (`listen(2)`).
    Listen,
    /// Nothing to count.
    Other,
}

/// Classifies one `inet_sock_set_state` record.
///
/// Passive opens are `SYN_RECV -> ESTABLISHED`: the child socket is cloned from the listener in
/// `SYN_RECV` and moves to `ESTABLISHED` when the handshake's last ACK arrives. Active opens
/// (`SYN_SENT -> ESTABLISHED`) are the node's outgoing connections and are not counted. Every full
/// socket ends in `CLOSE`, whichever way it got there (FIN, RST, TIME_WAIT hand-over).
pub const fn classify(oldstate: i32, newstate: i32) -> Transition {
    if oldstate == tcp_state::SYN_RECV && newstate == tcp_state::ESTABLISHED {
        Transition::PassiveOpen
    } else if newstate == tcp_state::CLOSE && oldstate != tcp_state::CLOSE {
        Transition::Close
    } else if newstate == tcp_state::LISTEN {
        Transition::Listen
    } else {
        Transition::Other
    }
}

/// A capacity from the configuration that the kernel map cannot take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapacityOutOfRange {
    pub requested: u32,
}

/// Checks a configured map capacity against [`MIN_CAPACITY`]..=[`MAX_CAPACITY`].
pub const fn checked_capacity(requested: u32) -> Result<u32, CapacityOutOfRange> {
    if requested < MIN_CAPACITY || requested > MAX_CAPACITY {
        Err(CapacityOutOfRange { requested })
    } else {
        Ok(requested)
    }
}

/// Ring buffer of [`ConnEvent`]s for `/v1/events`. Bounded by its byte size: 256 KiB holds
/// about 3000 events; a full ring drops the event and counts `connection_events_full`.
pub const CONN_EVENTS_MAP: &str = "CONN_EVENTS";
pub const CONN_EVENTS_BYTES: u32 = 256 * 1024;

/// [`ConnEvent::kind`].
pub const CONN_OPEN: u32 = 1;
pub const CONN_CLOSE: u32 = 2;
pub const CONN_RESET_SENT: u32 = 3;
pub const CONN_RESET_RECEIVED: u32 = 4;
pub const CONN_RETRANSMIT: u32 = 5;

/// One connection event of a watched listener. Addresses are IPv6 or IPv4-mapped (as the
/// tracepoints give them); all zero where the hook does not know them (resets).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    pub kind: u32,
    /// Network namespace inode of the socket.
    pub netns: u32,
    /// Local (listener) port.
    pub port: u16,
    pub remote_port: u16,
    /// AF_INET (2) or AF_INET6 (10); 0 when unknown.
    pub family: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Close: payload bytes over the connection's tracked life.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Close: time since the passive open (0 for adopted connections, whose start is unknown).
    pub duration_ns: u64,
    /// Retransmit: segments retransmitted since the last event of this connection.
    pub count: u64,
}

/// Tracepoint field offsets for [`ConnEvent`]'s 4-tuple, written by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventOffsets {
    /// `sock:inet_sock_set_state`.
    pub state_dport: u32,
    pub state_family: u32,
    pub state_saddr_v6: u32,
    pub state_daddr_v6: u32,
    /// `tcp:tcp_retransmit_skb`.
    pub retransmit_dport: u32,
    pub retransmit_family: u32,
    pub retransmit_saddr_v6: u32,
    pub retransmit_daddr_v6: u32,
    /// `struct sock` (BTF), for the raw tracepoint, which has no record: `skc_dport` (network
    /// order), `skc_family`, `skc_daddr`, `skc_rcv_saddr`, and `skc_v6_daddr`,
    /// `skc_v6_rcv_saddr` ([`crate::processes::NO_FIELD`] without IPv6).
    pub sock_dport: u32,
    pub sock_family: u32,
    pub sock_daddr: u32,
    pub sock_rcv_saddr: u32,
    pub sock_v6_daddr: u32,
    pub sock_v6_rcv_saddr: u32,
}

impl EventOffsets {
    pub const UNSET: EventOffsets = EventOffsets {
        state_dport: 0,
        state_family: 0,
        state_saddr_v6: 0,
        state_daddr_v6: 0,
        retransmit_dport: 0,
        retransmit_family: 0,
        retransmit_saddr_v6: 0,
        retransmit_daddr_v6: 0,
        sock_dport: 0,
        sock_family: 0,
        sock_daddr: 0,
        sock_rcv_saddr: 0,
        sock_v6_daddr: 0,
        sock_v6_rcv_saddr: 0,
    };
}

/// Symbol of the [`EventOffsets`] global in the object.
pub const EVENT_OFFSETS_GLOBAL: &str = "EVENT_OFFSETS";

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are #[repr(C)] with explicit padding and only integer fields, so every
    // bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectionState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Watch {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WatchIndexEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SocketOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SocketsConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LiveRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EventOffsets {}
}

#[cfg(test)]
mod tests {
    use super::tcp_state::*;
    use super::*;

    #[test]
    fn passive_open_is_syn_recv_to_established() {
        assert_eq!(classify(SYN_RECV, ESTABLISHED), Transition::PassiveOpen);
    }

    #[test]
    fn active_open_is_not_an_accept() {
        assert_eq!(classify(SYN_SENT, ESTABLISHED), Transition::Other);
        assert_eq!(classify(CLOSE, SYN_SENT), Transition::Other);
    }

    #[test]
    fn every_way_into_close_is_a_close() {
        for old in [ESTABLISHED, SYN_SENT, SYN_RECV, 4, 5, 6, 8, 9, LISTEN, 11] {
            assert_eq!(classify(old, CLOSE), Transition::Close, "from {old}");
        }
        assert_eq!(classify(CLOSE, CLOSE), Transition::Other);
    }

    #[test]
    fn listen_is_its_own_transition() {
        assert_eq!(classify(CLOSE, LISTEN), Transition::Listen);
        assert_eq!(classify(LISTEN, CLOSE), Transition::Close);
    }

    #[test]
    fn active_counts_adopted_and_leaves_out_closed_and_untracked() {
        let c = ListenerCounters {
            accepted: 10,
            adopted: 4,
            closed: 3,
            untracked: 2,
            ..ListenerCounters::ZERO
        };
        assert_eq!(c.active(), 9);
        let inconsistent = ListenerCounters {
            accepted: 1,
            closed: 2,
            ..ListenerCounters::ZERO
        };
        assert_eq!(inconsistent.active(), 0);
    }

    /// The cases measured on Linux 6.18 with 1000 bytes in and 500 bytes out per connection
    /// (bytes_acked, bytes_received and SOCK_DONE read at the CLOSE transition).
    #[test]
    fn payload_bytes_strip_exactly_the_fins_the_counters_hold() {
        let cases = [
            // server closed first, orphaned into TIME_WAIT from FIN_WAIT2: our FIN acked.
            (FIN_WAIT2, 501, 1000, false),
            // client closed first, server closed later: both FINs.
            (LAST_ACK, 501, 1001, true),
            // server reset (SO_LINGER 0) while established: no FIN either way.
            (ESTABLISHED, 500, 1000, false),
            // server shut down writes, then the peer's FIN arrived in FIN_WAIT2.
            (FIN_WAIT2, 501, 1001, true),
            // peer closed, server reset from CLOSE_WAIT: only the peer's FIN.
            (CLOSE_WAIT, 500, 1001, true),
        ];
        for (state, acked, received, done) in cases {
            assert_eq!(
                payload_bytes(state, acked, received, 7, 7, done),
                (500, 1000),
                "{state}"
            );
        }
        // FIN queued but not yet acknowledged: bytes_acked does not hold it.
        assert_eq!(payload_bytes(FIN_WAIT1, 500, 0, 6, 7, false), (500, 0));
        // Never underflows.
        assert_eq!(payload_bytes(LAST_ACK, 0, 0, 1, 1, true), (0, 0));
    }

    #[test]
    fn log2_buckets() {
        assert_eq!(log2_bucket(0, 40), 0);
        assert_eq!(log2_bucket(1, 40), 0);
        assert_eq!(log2_bucket(2, 40), 1);
        assert_eq!(log2_bucket(3, 40), 1);
        assert_eq!(log2_bucket(1024, 40), 10);
        assert_eq!(log2_bucket(2047, 40), 10);
        assert_eq!(log2_bucket(u64::MAX, 40), 39);
        assert_eq!(log2_bucket(1 << 30, 26), 25);
        for v in [1u64, 5, 1000, 123_456_789] {
            let i = log2_bucket(v, 64);
            assert!(v < log2_bucket_upper_us(i), "{v} in bucket {i}");
            assert!(i == 0 || v >= log2_bucket_upper_us(i - 1));
        }
    }

    #[test]
    fn watching() {
        assert!(is_watched(Some(WATCH), false));
        assert!(!is_watched(Some(IGNORE), true));
        assert!(!is_watched(None, false));
        assert!(is_watched(None, true));
    }

    #[test]
    fn capacity_bounds() {
        assert_eq!(checked_capacity(MIN_CAPACITY), Ok(MIN_CAPACITY));
        // The tiers always add up to the capacity; the first is bounded both ways.
        assert_eq!(connection_tiers(CONNECTIONS_CAPACITY), (4096, 61_440));
        assert_eq!(connection_tiers(MIN_CAPACITY), (MIN_CAPACITY, 0));
        assert_eq!(connection_tiers(64), (16, 48));
        assert_eq!(connection_tiers(1024), (64, 960));
        // Whole buckets of 8.
        assert_eq!(connection_tiers(1000), (56, 944));
        assert_eq!(connection_tiers(MIN_CAPACITY + 7), (MIN_CAPACITY, 7));
        assert_eq!(
            connection_tiers(MAX_CAPACITY),
            (FIRST_TIER_MAX, MAX_CAPACITY - 4096)
        );
        assert_eq!(checked_capacity(MAX_CAPACITY), Ok(MAX_CAPACITY));
        assert_eq!(
            checked_capacity(0),
            Err(CapacityOutOfRange { requested: 0 })
        );
        assert!(checked_capacity(MAX_CAPACITY + 1).is_err());
    }

    #[test]
    fn watch_indexes_stay_in_the_index_and_spread_ports_and_namespaces() {
        assert!(WATCH_INDEX_SIZE.is_power_of_two());
        let mut seen = [0u32; WATCH_INDEX_SIZE as usize];
        // A node's usual keys: a few ports in many pod namespaces (consecutive inodes).
        for netns in 4_026_532_000..4_026_532_256u32 {
            for port in [9091, 9092, 9093, 9094] {
                let i = watch_index(&ListenerKey::new(netns, port));
                assert!(i < WATCH_INDEX_SIZE);
                seen[i as usize] += 1;
            }
        }
        // 1024 keys in 4096 entries: mostly apart.
        let shared: u32 = seen.iter().filter(|n| **n > 1).map(|n| n - 1).sum();
        assert!(shared < 200, "{shared} keys share an index");
        assert_ne!(
            watch_index(&ListenerKey::new(1, 9092)),
            watch_index(&ListenerKey::new(2, 9092))
        );
    }

    #[test]
    fn adding_counters_adds_every_field() {
        let counters = |n: u64| ListenerCounters {
            accepted: n,
            adopted: 2 * n,
            closed: 3 * n,
            untracked: 4 * n,
            bytes_received: 5 * n,
            bytes_sent: 6 * n,
            retransmits: 7 * n,
            resets_sent: 8 * n,
            resets_received: 9 * n,
            duration_sum_us: 10 * n,
            duration: [11 * n; DURATION_BUCKETS],
            rtt_sum_us: 12 * n,
            rtt: [13 * n; RTT_BUCKETS],
        };
        let mut a = counters(1);
        a.add(&counters(2));
        assert_eq!(a, counters(3));
    }

    #[test]
    fn shared_types_have_the_layout_the_kernel_expects() {
        assert_eq!(core::mem::size_of::<ListenerKey>(), 8);
        assert_eq!(
            core::mem::size_of::<ListenerCounters>(),
            8 * (11 + DURATION_BUCKETS + RTT_BUCKETS)
        );
        assert_eq!(core::mem::size_of::<ConnectionState>(), 48);
        assert_eq!(core::mem::size_of::<Watch>(), 8);
        assert_eq!(core::mem::size_of::<WatchIndexEntry>(), 24);
        assert_eq!(core::mem::size_of::<LiveRecord>(), 40);
        assert_eq!(core::mem::size_of::<SocketOffsets>() % 8, 0);
    }
}
