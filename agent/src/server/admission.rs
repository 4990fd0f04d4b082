//! Admission of *pending* connections: accepted, but not yet through the TLS handshake with a
//! verified client certificate. They have a budget per peer and one in total, apart from the
//! authenticated connections' (`limits::MAX_CONNECTIONS`), so unauthenticated clients can never
//! take the slots an operator's scrape needs.
//!
//! The accept loop admits every new connection; when a budget is full, the new one takes the
//! place of a pending connection of the same peer (per-peer budget) or of the peer holding the
//! most (total budget), which is *shed*: removed from the pool at once and told to close.
//! Among a peer's pending connections the one shed is the oldest that has sent nothing yet
//! (a real client sends its ClientHello right after connecting), else the oldest. Whether a
//! connection has sent anything is asked of its socket (a [`Probe`]: bytes queued in the
//! kernel count, read or not), so a client is protected from the moment its ClientHello
//! arrives, however busy the agent is. So a new connection is never refused for a pending
//! budget, a flood only ever displaces itself, and a client whose address is not the flood's is
//! never shed while the flood holds more.
//!
//! The pool keeps each pending connection's descriptor to probe it; the [`Ticket`] must leave
//! the pool before that descriptor is closed (`server` keeps it beside the socket, dropped
//! first).
//!
//! Bounded: the pool holds at most `total` connections, and a peer is tracked only while it has
//! one pending, so at most `total` peers. Each connection's task leaves the pool (its
//! [`Ticket`] drops) when its handshake ends, whichever way.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    net::IpAddr,
    os::fd::RawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
};

use tokio::sync::Notify;

use crate::locks::Recover as _;
use crate::stats::ServerStats;

/// Whom a per-peer budget belongs to: an IPv4 address, or an IPv6 /64 (the smallest prefix
/// routinely given to one host, which may use any address in it). IPv4-mapped IPv6 addresses
/// (a dual-stack listener) count as their IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerKey {
    V4([u8; 4]),
    V6Prefix64([u8; 8]),
}

impl PeerKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    Self::V6Prefix64([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
                }
            },
        }
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::V4(o) => write!(f, "{}", std::net::Ipv4Addr::from(o)),
            Self::V6Prefix64(p) => {
                let mut o = [0u8; 16];
                o[..8].copy_from_slice(&p);
                write!(f, "{}/64", std::net::Ipv6Addr::from(o))
            }
        }
    }
}

/// Which budget shed a pending connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedBy {
    /// Its peer had `per_peer` pending and another one came.
    PerPeer,
    /// The pool had `total` pending and its peer held the most.
    Total,
}

const NOT_SHED: u8 = 0;
const SHED_PER_PEER: u8 = 1;
const SHED_TOTAL: u8 = 2;

/// Whether the client of a pending connection has sent bytes: asked of its socket (`server`
/// peeks at it). Must not block.
pub type Probe = fn(RawFd) -> bool;

/// One pending connection, shared by the pool and the connection's task.
#[derive(Debug)]
pub struct Pending {
    /// Arrival order (the pool's counter).
    seq: u64,
    /// Its socket, open while the connection is in the pool.
    fd: RawFd,
    /// The client has sent at least one byte.
    spoke: AtomicBool,
    shed: AtomicU8,
    shed_signal: Notify,
}

impl Pending {
    /// The client sent its first bytes: from now on it is shed only after silent ones.
    pub fn mark_spoke(&self) {
        self.spoke.store(true, Ordering::Relaxed);
    }

    fn has_spoken(&self) -> bool {
        self.spoke.load(Ordering::Relaxed)
    }

    /// Whether (and by which budget) the pool shed this connection.
    pub fn shed_by(&self) -> Option<ShedBy> {
        match self.shed.load(Ordering::Acquire) {
            SHED_PER_PEER => Some(ShedBy::PerPeer),
            SHED_TOTAL => Some(ShedBy::Total),
            _ => None,
        }
    }

    /// Resolves once the pool has shed this connection (at once if it already has).
    pub async fn shed(&self) {
        let notified = self.shed_signal.notified();
        if self.shed_by().is_some() {
            return;
        }
        notified.await;
    }

    fn mark_shed(&self, by: ShedBy) {
        let v = match by {
            ShedBy::PerPeer => SHED_PER_PEER,
            ShedBy::Total => SHED_TOTAL,
        };
        self.shed.store(v, Ordering::Release);
        // notify_one keeps a permit when the task is not waiting yet: no wake-up is lost.
        self.shed_signal.notify_one();
    }
}

/// The pending connections of every peer that has one.
pub struct PendingPool {
    per_peer: usize,
    total: usize,
    probe: Probe,
    stats: Arc<ServerStats>,
    inner: Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    next_seq: u64,
    len: usize,
    /// Per peer, its pending connections in arrival order; never an empty queue.
    peers: HashMap<PeerKey, VecDeque<Arc<Pending>>>,
}

/// A connection admitted to the pool.
pub struct Admission {
    /// Held by the connection's task until its handshake ends.
    pub ticket: Ticket,
    /// The pool, or the peer's share of it, is at least half full: a shorter handshake
    /// timeout applies (`limits::HANDSHAKE_TIMEOUT_UNDER_PRESSURE`).
    pub pressure: bool,
}

impl PendingPool {
    /// A pool of at most `total` pending connections, `per_peer` of them from one peer (both at
    /// least 1), that asks `probe` whether a connection has spoken; it keeps
    /// `stats.connections_pending` equal to its size.
    pub fn new(per_peer: usize, total: usize, probe: Probe, stats: Arc<ServerStats>) -> Arc<Self> {
        let total = total.max(1);
        Arc::new(Self {
            per_peer: per_peer.clamp(1, total),
            total,
            probe,
            stats,
            inner: Mutex::new(Pool::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.inner.lock().recover()
    }

    /// Admits a new connection from `peer` on socket `fd`. Sheds a pending connection when a
    /// budget is full (see the module docs). Never blocks on anything but the pool's lock, held
    /// for a walk over at most `total` peers and at most `per_peer` probes.
    pub fn admit(self: &Arc<Self>, peer: PeerKey, fd: RawFd) -> Admission {
        let spoke = (self.probe)(fd);
        let mut pool = self.lock();
        let own = pool.peers.get(&peer).map_or(0, VecDeque::len);
        let shed = if own >= self.per_peer {
            Some((peer, ShedBy::PerPeer))
        } else if pool.len >= self.total {
            pool.heaviest().map(|key| (key, ShedBy::Total))
        } else {
            None
        };
        if let Some((key, by)) = shed
            && let Some(queue) = pool.peers.get_mut(&key)
            && let Some(victim) = victim(queue, self.probe).and_then(|i| queue.remove(i))
        {
            if queue.is_empty() {
                pool.peers.remove(&key);
            }
            pool.len -= 1;
            victim.mark_shed(by);
        }
        let pending = Arc::new(Pending {
            seq: pool.next_seq,
            fd,
            spoke: AtomicBool::new(spoke),
            shed: AtomicU8::new(NOT_SHED),
            shed_signal: Notify::new(),
        });
        pool.next_seq += 1;
        let queue = pool.peers.entry(peer).or_default();
        queue.push_back(pending.clone());
        let own = queue.len();
        pool.len += 1;
        let pressure = pool.len * 2 >= self.total || own * 2 >= self.per_peer;
        self.stats
            .connections_pending
            .store(pool.len as u64, Ordering::Relaxed);
        Admission {
            ticket: Ticket {
                pool: self.clone(),
                peer,
                pending,
            },
            pressure,
        }
    }

    /// Takes a connection out (its handshake ended); nothing when it was shed already.
    fn leave(&self, peer: PeerKey, pending: &Arc<Pending>) {
        let mut pool = self.lock();
        let Some(queue) = pool.peers.get_mut(&peer) else {
            return;
        };
        let Some(i) = queue.iter().position(|p| Arc::ptr_eq(p, pending)) else {
            return;
        };
        queue.remove(i);
        if queue.is_empty() {
            pool.peers.remove(&peer);
        }
        pool.len -= 1;
        self.stats
            .connections_pending
            .store(pool.len as u64, Ordering::Relaxed);
    }

    /// Pending connections now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Peers tracked now.
    #[cfg(test)]
    pub fn peers(&self) -> usize {
        self.lock().peers.len()
    }
}

impl Pool {
    /// The peer to shed from when the pool is full: the one with the most pending; among
    /// equals, the one whose candidate is silent (as last known: no probe), then the oldest.
    fn heaviest(&self) -> Option<PeerKey> {
        self.peers
            .iter()
            .filter_map(|(key, queue)| {
                let c = &queue[candidate(queue)?];
                Some((queue.len(), !c.has_spoken(), std::cmp::Reverse(c.seq), *key))
            })
            .max_by_key(|&(len, silent, age, _)| (len, silent, age))
            .map(|(.., key)| key)
    }
}

/// Which of a peer's pending connections to shed, as last known: the oldest silent one, else
/// the oldest.
fn candidate(queue: &VecDeque<Arc<Pending>>) -> Option<usize> {
    if queue.is_empty() {
        return None;
    }
    Some(queue.iter().position(|p| !p.has_spoken()).unwrap_or(0))
}

/// As [`candidate`], asking `probe` first whether a silent-looking one has spoken since.
fn victim(queue: &VecDeque<Arc<Pending>>, probe: Probe) -> Option<usize> {
    for (i, p) in queue.iter().enumerate() {
        if p.has_spoken() {
            continue;
        }
        if probe(p.fd) {
            p.mark_spoke();
            continue;
        }
        return Some(i);
    }
    (!queue.is_empty()).then_some(0)
}

/// A connection's place in the pool; dropping it takes the connection out.
pub struct Ticket {
    pool: Arc<PendingPool>,
    peer: PeerKey,
    pending: Arc<Pending>,
}

impl Ticket {
    pub fn pending(&self) -> &Arc<Pending> {
        &self.pending
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pool.leave(self.peer, &self.pending);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// Descriptors in these tests are not real: from SPOKE up they have bytes queued; TALKING
    /// has when a test says so.
    const SILENT: RawFd = -1;
    const SPOKE: RawFd = 1000;
    const TALKING: RawFd = 500;
    static TALKING_HAS_SPOKEN: AtomicBool = AtomicBool::new(false);

    fn probe(fd: RawFd) -> bool {
        fd >= SPOKE || (fd == TALKING && TALKING_HAS_SPOKEN.load(Ordering::Relaxed))
    }

    fn pool(per_peer: usize, total: usize) -> Arc<PendingPool> {
        PendingPool::new(per_peer, total, probe, Arc::new(ServerStats::default()))
    }

    fn v4(last: u8) -> PeerKey {
        PeerKey::of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)))
    }

    fn gauge(pool: &PendingPool) -> u64 {
        pool.stats.connections_pending.load(Ordering::Relaxed)
    }

    #[test]
    fn peers_are_ipv4_addresses_and_ipv6_64s() {
        let a: Ipv6Addr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(PeerKey::of(a.into()), PeerKey::of(b.into()));
        assert_ne!(PeerKey::of(a.into()), PeerKey::of(c.into()));
        assert_eq!(PeerKey::of(a.into()).to_string(), "2001:db8:1:2::/64");
        let mapped: Ipv6Addr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(PeerKey::of(mapped.into()), v4(7));
        assert_eq!(v4(7).to_string(), "10.0.0.7");
        assert_ne!(v4(7), v4(8));
    }

    #[test]
    fn the_per_peer_budget_sheds_that_peers_oldest_silent_connection() {
        let pool = pool(3, 100);
        let a: Vec<_> = (0..3).map(|_| pool.admit(v4(1), SILENT)).collect();
        assert!(a.iter().all(|x| x.ticket.pending().shed_by().is_none()));
        // The first one has spoken (its ClientHello arrived): the second is the oldest silent.
        a[0].ticket.pending().mark_spoke();
        let d = pool.admit(v4(1), SILENT);
        assert_eq!(a[1].ticket.pending().shed_by(), Some(ShedBy::PerPeer));
        assert_eq!(a[0].ticket.pending().shed_by(), None);
        assert_eq!(a[2].ticket.pending().shed_by(), None);
        assert_eq!(pool.len(), 3);
        // Another peer is not touched by this peer's budget.
        let other = pool.admit(v4(2), SILENT);
        assert_eq!(pool.len(), 4);
        assert!(
            a.iter()
                .filter_map(|x| x.ticket.pending().shed_by())
                .count()
                == 1
        );
        // Every one has spoken: the oldest goes.
        for x in [&a[2], &d] {
            x.ticket.pending().mark_spoke();
        }
        let _e = pool.admit(v4(1), SPOKE);
        assert_eq!(a[0].ticket.pending().shed_by(), Some(ShedBy::PerPeer));
        assert_eq!(other.ticket.pending().shed_by(), None);
        assert_eq!(pool.len(), 4);
        assert_eq!(gauge(&pool), 4);
    }

    #[test]
    fn the_total_budget_sheds_from_the_peer_with_the_most() {
        let pool = pool(8, 6);
        let flood: Vec<_> = (0..4).map(|_| pool.admit(v4(1), SILENT)).collect();
        let op = pool.admit(v4(9), SILENT);
        let other = pool.admit(v4(2), SILENT);
        assert_eq!(pool.len(), 6);
        // Full: the operator's newest connection comes; the flood's oldest goes.
        let op2 = pool.admit(v4(9), SILENT);
        assert_eq!(flood[0].ticket.pending().shed_by(), Some(ShedBy::Total));
        assert_eq!(pool.len(), 6);
        // Flood 3, operator 2, other 1: the flood is still the heaviest.
        let op3 = pool.admit(v4(9), SILENT);
        assert_eq!(flood[1].ticket.pending().shed_by(), Some(ShedBy::Total));
        // Flood 2, operator 3 now: the operator's own budget is shed from, its oldest silent.
        op3.ticket.pending().mark_spoke();
        op2.ticket.pending().mark_spoke();
        let _f = pool.admit(v4(1), SILENT);
        assert_eq!(op.ticket.pending().shed_by(), Some(ShedBy::Total));
        for x in [&op2, &op3, &other, &flood[2], &flood[3]] {
            assert_eq!(x.ticket.pending().shed_by(), None);
        }
        assert_eq!(pool.len(), 6);
    }

    #[test]
    fn among_equal_peers_a_silent_then_the_oldest_candidate_goes() {
        let pool = pool(4, 4);
        let a = pool.admit(v4(1), SPOKE);
        let b = pool.admit(v4(2), SILENT);
        let c = pool.admit(v4(3), SPOKE);
        let d = pool.admit(v4(4), SILENT);
        // One each: b is the oldest silent one.
        let _e = pool.admit(v4(5), SILENT);
        assert_eq!(b.ticket.pending().shed_by(), Some(ShedBy::Total));
        // Now d (silent) before the older a and c (spoken).
        let _f = pool.admit(v4(6), SPOKE);
        assert_eq!(d.ticket.pending().shed_by(), Some(ShedBy::Total));
        assert_eq!(a.ticket.pending().shed_by(), None);
        assert_eq!(c.ticket.pending().shed_by(), None);
    }

    #[test]
    fn leaving_frees_the_place_and_forgets_the_peer() {
        let pool = pool(2, 4);
        let a = pool.admit(v4(1), SILENT);
        let b = pool.admit(v4(1), SILENT);
        assert_eq!((pool.len(), pool.peers()), (2, 1));
        drop(a);
        assert_eq!((pool.len(), pool.peers()), (1, 1));
        // No shed: the peer has one place free again.
        let again = pool.admit(v4(1), SILENT);
        assert_eq!(b.ticket.pending().shed_by(), None);
        drop(again);
        assert_eq!((pool.len(), pool.peers()), (1, 1));
        drop(b);
        assert_eq!((pool.len(), pool.peers()), (0, 0));
        assert_eq!(gauge(&pool), 0);
        // A shed connection's ticket leaving later changes nothing.
        let c = pool.admit(v4(2), SILENT);
        let d = pool.admit(v4(2), SILENT);
        let e = pool.admit(v4(2), SILENT);
        assert_eq!(c.ticket.pending().shed_by(), Some(ShedBy::PerPeer));
        drop(c);
        assert_eq!(pool.len(), 2);
        drop((d, e));
        assert_eq!((pool.len(), pool.peers()), (0, 0));
    }

    #[test]
    fn peers_tracked_are_bounded_by_the_total() {
        let v4_pool = pool(16, 64);
        let mut held = Vec::new();
        for i in 0..10_000u32 {
            let ip = Ipv4Addr::from(0x0a00_0000 + i);
            let fd = if i % 3 == 0 { SPOKE } else { SILENT };
            held.push(v4_pool.admit(PeerKey::of(ip.into()), fd));
            assert!(v4_pool.len() <= 64);
            assert!(v4_pool.peers() <= 64);
        }
        let kept = held
            .iter()
            .filter(|a| a.ticket.pending().shed_by().is_none());
        assert_eq!(kept.count(), 64);
        drop(held);
        assert_eq!((v4_pool.len(), v4_pool.peers()), (0, 0));
        // IPv6: one /64, any number of addresses, is one peer with one budget.
        let v6_pool = pool(16, 64);
        let mut held = Vec::new();
        for i in 0..1000u128 {
            let ip = Ipv6Addr::from(0x2001_0db8_0000_0001_0000_0000_0000_0000u128 + i);
            held.push(v6_pool.admit(PeerKey::of(ip.into()), SILENT));
        }
        assert_eq!((v6_pool.len(), v6_pool.peers()), (16, 1));
    }

    #[test]
    fn a_client_whose_bytes_arrived_is_not_shed_as_silent_even_before_they_are_read() {
        let pool = pool(3, 100);
        let op = pool.admit(v4(1), TALKING);
        let flood: Vec<_> = (0..2).map(|_| pool.admit(v4(1), SILENT)).collect();
        // Its ClientHello arrives; nobody has read it yet.
        TALKING_HAS_SPOKEN.store(true, Ordering::Relaxed);
        let more: Vec<_> = (0..4).map(|_| pool.admit(v4(1), SILENT)).collect();
        assert_eq!(op.ticket.pending().shed_by(), None);
        assert!(
            op.ticket.pending().has_spoken(),
            "the probe's answer is kept"
        );
        for x in flood.iter().chain(&more[..2]) {
            assert_eq!(x.ticket.pending().shed_by(), Some(ShedBy::PerPeer));
        }
        assert_eq!(pool.len(), 3);
    }

    #[test]
    fn pressure_is_half_of_either_budget() {
        let pool = pool(8, 16);
        let a: Vec<_> = (0..3).map(|_| pool.admit(v4(1), SILENT)).collect();
        assert!(a.iter().all(|x| !x.pressure));
        let fourth = pool.admit(v4(1), SILENT);
        assert!(fourth.pressure, "4 of the peer's 8");
        let b: Vec<_> = (2..5).map(|i| pool.admit(v4(i), SILENT)).collect();
        assert!(b.iter().all(|x| !x.pressure));
        assert!(pool.admit(v4(7), SILENT).pressure, "8 of 16 in total");
    }

    #[tokio::test]
    async fn a_shed_connection_is_told_even_before_it_waits() {
        let pool = pool(1, 8);
        let a = pool.admit(v4(1), SILENT);
        let _b = pool.admit(v4(1), SILENT);
        // The signal was sent before anyone waited: it is not lost.
        tokio::time::timeout(std::time::Duration::from_secs(1), a.ticket.pending().shed())
            .await
            .expect("shed signal");
        let c = pool.admit(v4(2), SILENT);
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            c.ticket.pending().shed(),
        )
        .await;
        assert!(waited.is_err(), "not shed: no signal");
    }
}
