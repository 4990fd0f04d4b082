//! The socket family's maps, and the loader-written global that sizes the first connection tier.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap},
};
use brokerscope_common::sockets::{
    CONN_WAYS, CONNECTIONS_CAPACITY, ConnectionState, FIRST_TIER_MAX, LISTENERS_CAPACITY,
    ListenerCounters, ListenerKey, SocketsConfig, WATCH_INDEX_SIZE, Watch, WatchIndexEntry,
};

/// Per-listener counters by slot, given by the loader to each watched listener: an array
/// lookup, which the verifier inlines, where a hash lookup was a call, a hash of the key and
/// two more cache lines. The loader resizes it from `probes.listeners_capacity`.
#[map(name = "LISTENERS")]
pub(super) static LISTENERS: Array<ListenerCounters> =
    Array::with_max_entries(LISTENERS_CAPACITY, 0);

/// Per-listener counters of listeners without a slot (watch-all mode's, and watched ones once
/// every slot is taken), created at their first accept; bounded like LISTENERS, allocated as
/// used.
#[map(name = "LISTENERS_AUTO")]
pub(super) static LISTENERS_AUTO: HashMap<ListenerKey, ListenerCounters> =
    HashMap::with_max_entries(LISTENERS_CAPACITY, BPF_F_NO_PREALLOC);

/// Listeners to count, with their slot (or to ignore: the agent's own); bounded like LISTENERS.
#[map(name = "WATCHED")]
pub(super) static WATCHED: HashMap<ListenerKey, Watch> =
    HashMap::with_max_entries(LISTENERS_CAPACITY, 0);

/// WATCHED's direct-mapped index, looked up first (see `WATCH_INDEX_MAP`).
#[map(name = "WATCH_INDEX")]
pub(super) static WATCH_INDEX: Array<WatchIndexEntry> =
    Array::with_max_entries(WATCH_INDEX_SIZE, 0);

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
pub(super) static CONNECTIONS: Array<[u64; CONN_WAYS]> =
    Array::with_max_entries(FIRST_TIER_MAX / CONN_WAYS as u32, 0);

#[map(name = "CONN_STATES")]
pub(super) static CONN_STATES: Array<ConnectionState> = Array::with_max_entries(FIRST_TIER_MAX, 0);

/// Buckets in use in CONNECTIONS, written by the loader (0 before: nothing goes there).
#[unsafe(no_mangle)]
pub(super) static CONN_BUCKETS: u32 = 0;

/// The key of a slot being claimed: no socket lives at address 1.
pub(super) const CLAIMED: u64 = 1;

#[map(name = "CONNECTIONS_SPILL")]
pub(super) static CONNECTIONS_SPILL: HashMap<u64, ConnectionState> =
    HashMap::with_max_entries(CONNECTIONS_CAPACITY - FIRST_TIER_MAX, 0);

/// Entries in CONNECTIONS_SPILL; while zero, nothing looks there.
#[map(name = "CONN_SPILLED")]
pub(super) static CONN_SPILLED: Array<u64> = Array::with_max_entries(1, 0);

/// Watched listening sockets by listener, so the scrape-time iterator reads their drops without
/// walking a socket table: set at `listen(2)` and by the namespace sweep, cleared at close.
/// Bounded like LISTENERS.
#[map(name = "LISTEN_SOCKS")]
pub(super) static LISTEN_SOCKS: HashMap<ListenerKey, u64> =
    HashMap::with_max_entries(LISTENERS_CAPACITY, 0);

/// Initial value of a new LISTENERS_AUTO entry (too large for the BPF stack).
pub(super) static ZERO_COUNTERS: ListenerCounters = ListenerCounters::ZERO;

/// One entry: live settings, updated in place by the loader.
#[map(name = "SOCKETS_CONFIG")]
pub(super) static SOCKETS_CONFIG: Array<SocketsConfig> = Array::with_max_entries(1, 0);
