//! TCP sockets: the per-listener connection counters and the per-connection tracking state.
//!
//! The kernel side watches `sock:inet_sock_set_state`. A passive open (`SYN_RECV -> ESTABLISHED`
//! on a socket cloned from a listener) counts an accept on the socket's (network namespace,
//! local port) and starts tracking the socket; the tracked socket's move to `CLOSE` counts a close.
//! Sockets that were open before the agent started are never tracked, so no history is invented.

/// Name of the hash map of per-listener counters, keyed by [`ListenerKey`].
pub const LISTENERS_MAP: &str = "LISTENERS";
/// Default capacity of [`LISTENERS_MAP`]: one entry per (network namespace, listening port) that
/// has accepted a connection. A node with a few hundred pods of a few listeners each fits easily.
pub const LISTENERS_CAPACITY: u32 = 4096;

/// Name of the hash map of tracked connections, keyed by the kernel address of the `struct sock`.
pub const CONNECTIONS_MAP: &str = "CONNECTIONS";
/// Default capacity of [`CONNECTIONS_MAP`]: connections accepted and not yet closed, node-wide.
pub const CONNECTIONS_CAPACITY: u32 = 65_536;

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
    pub const CLOSE: i32 = 7;
    pub const LISTEN: i32 = 10;
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

/// Counters of one listener. Updated with atomic adds from any CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerCounters {
    /// Passive opens that reached ESTABLISHED.
    pub accepted: u64,
    /// Tracked connections that reached CLOSE.
    pub closed: u64,
    /// Accepted connections the connection map had no room for: their close cannot be seen.
    pub untracked: u64,
}

impl ListenerCounters {
    /// Connections accepted and not yet closed. Untracked connections are left out rather than
    /// counted as open forever.
    pub const fn active(&self) -> u64 {
        self.accepted
            .saturating_sub(self.closed)
            .saturating_sub(self.untracked)
    }
}

/// What the kernel keeps per tracked connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionState {
    pub listener: ListenerKey,
    /// `bpf_ktime_get_ns()` when the connection was established.
    pub established_ns: u64,
}

/// Where the kernel programs find what they read, resolved by the loader at load time from the
/// running kernel (tracepoint format files and BTF), never compiled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOffsets {
    /// `inet_sock_set_state` field offsets in the tracepoint record.
    pub tp_skaddr: u32,
    pub tp_oldstate: u32,
    pub tp_newstate: u32,
    pub tp_sport: u32,
    pub tp_protocol: u32,
    /// Offset of `struct net *` in `struct sock` (`__sk_common.skc_net.net`).
    pub sock_net: u32,
    /// Offset of the namespace inode number in `struct net` (`ns.inum`).
    pub net_inum: u32,
    pub _pad: u32,
}

impl SocketOffsets {
    /// Placeholder compiled into the object; the loader always overrides it.
    pub const UNSET: SocketOffsets = SocketOffsets {
        tp_skaddr: 0,
        tp_oldstate: 0,
        tp_newstate: 0,
        tp_sport: 0,
        tp_protocol: 0,
        sock_net: 0,
        net_inum: 0,
        _pad: 0,
    };
}

/// Name of the global the loader writes [`SocketOffsets`] into.
pub const SOCKET_OFFSETS_GLOBAL: &str = "SOCKET_OFFSETS";

/// What a TCP state change means for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// A connection accepted on a listener is now established.
    PassiveOpen,
    /// The socket is gone; counts a close if the socket was tracked.
    Close,
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
    unsafe impl aya::Pod for super::SocketOffsets {}
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
    fn active_leaves_out_closed_and_untracked() {
        let c = ListenerCounters {
            accepted: 10,
            closed: 3,
            untracked: 2,
        };
        assert_eq!(c.active(), 5);
        let inconsistent = ListenerCounters {
            accepted: 1,
            closed: 2,
            untracked: 0,
        };
        assert_eq!(inconsistent.active(), 0);
    }

    #[test]
    fn capacity_bounds() {
        assert_eq!(checked_capacity(MIN_CAPACITY), Ok(MIN_CAPACITY));
        assert_eq!(checked_capacity(MAX_CAPACITY), Ok(MAX_CAPACITY));
        assert_eq!(
            checked_capacity(0),
            Err(CapacityOutOfRange { requested: 0 })
        );
        assert!(checked_capacity(MAX_CAPACITY + 1).is_err());
    }

    #[test]
    fn shared_types_have_the_layout_the_kernel_expects() {
        assert_eq!(core::mem::size_of::<ListenerKey>(), 8);
        assert_eq!(core::mem::size_of::<ListenerCounters>(), 24);
        assert_eq!(core::mem::size_of::<ConnectionState>(), 16);
        assert_eq!(core::mem::size_of::<SocketOffsets>(), 32);
    }
}
