//! TCP sockets (kernel side: agent-ebpf/src/sockets.rs): resolving the offsets the programs need
//! and reading the per-listener counters.

use std::time::{Duration, Instant};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use brokerscope_common::sockets::{
    CONN_SPILLED_MAP, IGNORE, LISTENERS_AUTO_MAP, LISTENERS_MAP, LIVE_CONNECTION, LIVE_LISTENER,
    ListenerCounters, ListenerKey, LiveRecord, NO_SLOT, SOCKETS_CONFIG_MAP, SocketOffsets,
    SocketsConfig, WATCH, WATCH_INDEX_MAP, WATCHED_MAP, Watch, WatchIndexEntry, watch_index,
};

use brokerscope_common::records::{SLOT_KEYS_MAP, SlotKey};
use brokerscope_common::telemetry::Program;

use super::{
    batch::Batched,
    btf::Btf,
    error::ProbesError,
    lacks::{Lacks, NO_OFFSET},
    maps::{map_error, take_map as take},
    tracefs::Format,
};

/// Counters of one (network namespace, port) listener: closed connections' totals from the
/// kernel map plus what is still open, read by the iterator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerStats {
    pub key: ListenerKey,
    pub counters: ListenerCounters,
    /// Payload bytes, closed plus open connections; never lower than previously reported.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// `sk_drops` of the listening socket, when the iterator saw it.
    pub listen_drops: Option<u64>,
}

/// What one walk's iterators found, summed per listener.
#[derive(Debug, Default)]
pub struct Live {
    /// Open connections' (sent, received).
    pub sent: std::collections::HashMap<ListenerKey, (u64, u64)>,
    /// Listening sockets' `sk_drops`.
    pub drops: std::collections::HashMap<ListenerKey, u64>,
}

impl Live {
    pub fn add(&mut self, records: &[LiveRecord]) {
        for r in records {
            match r.kind {
                LIVE_CONNECTION => {
                    let e = self.sent.entry(r.listener).or_default();
                    e.0 += r.bytes_sent;
                    e.1 += r.bytes_received;
                }
                LIVE_LISTENER => {
                    *self.drops.entry(r.listener).or_default() += r.drops;
                }
                _ => {}
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IterError {
    #[error("iterator link: {0}")]
    Program(#[source] Box<aya::programs::ProgramError>),
    #[error("iterator file: {0}")]
    Link(#[source] Box<aya::programs::links::LinkError>),
    #[error("reading the iterator: {0}")]
    Read(#[source] std::io::Error),
    #[error(transparent)]
    Netns(#[from] super::netns::NetnsError),
    #[error("iterator output is {len} bytes, not whole records")]
    Torn { len: usize },
}

/// Creates an instance of the socket iterator inside namespace `ns` (it walks that namespace's
/// socket table when read, wherever it is read from).
pub fn open_in(
    prog: &mut aya::programs::Iter,
    ns: &std::fs::File,
) -> Result<std::fs::File, IterError> {
    let link_id = prog.attach().map_err(|e| IterError::Program(Box::new(e)))?;
    let link = prog
        .take_link(link_id)
        .map_err(|e| IterError::Program(Box::new(e)))?;
    super::netns::run_in(ns, move || {
        link.into_file().map_err(|e| IterError::Link(Box::new(e)))
    })?
}

/// Reads every record of an iterator instance, at most `max`.
pub fn read_records(file: std::fs::File, max: usize) -> Result<Vec<LiveRecord>, IterError> {
    use std::io::Read as _;
    let limit = (max * size_of::<LiveRecord>()) as u64;
    let mut bytes = Vec::new();
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(IterError::Read)?;
    parse_records(&bytes)
}

/// Whole records of an iterator's output.
pub fn parse_records(bytes: &[u8]) -> Result<Vec<LiveRecord>, IterError> {
    if !bytes.len().is_multiple_of(size_of::<LiveRecord>()) {
        return Err(IterError::Torn { len: bytes.len() });
    }
    Ok(bytes
        .chunks_exact(size_of::<LiveRecord>())
        .map(|chunk| {
            // SAFETY: LiveRecord is Pod (repr(C), integers only) and the chunk has its size;
            // read_unaligned because a Vec<u8> guarantees no alignment.
            unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<LiveRecord>()) }
        })
        .collect())
}

/// Every program that reads sockets through `struct sock`/`tcp_sock` members.
pub const SOCKET_PROGRAMS: &[Program] = &[
    Program::SockState,
    Program::SockStateRaw,
    Program::SockStateBtf,
    Program::Retransmit,
    Program::SendReset,
    Program::ReceiveReset,
    Program::TcpLive,
    Program::ConnLive,
    Program::ConnSpillLive,
    Program::ListenLive,
];

/// Reads the socket programs' tracepoint record layouts from tracefs and their `struct sock`,
/// `tcp_sock` and `net` members from BTF. A lookup that fails costs only the programs that
/// need it (see [`Lacks`]).
pub fn resolve_offsets(
    read: impl Fn(&str, &str) -> Format,
    btf: &Btf,
    lacks: &mut Lacks,
) -> SocketOffsets {
    use Program::{ReceiveReset, Retransmit, SendReset, SockState};
    let state = read("sock", "inet_sock_set_state");
    let retransmit = read("tcp", "tcp_retransmit_skb");
    let send_reset = read("tcp", "tcp_send_reset");
    let receive_reset = read("tcp", "tcp_receive_reset");
    let all = SOCKET_PROGRAMS;
    let sock = |lacks: &mut Lacks, path: &[&str]| lacks.offset(all, btf.offset_of("sock", path));
    let tcp =
        |lacks: &mut Lacks, field: &str| lacks.offset(all, btf.offset_of("tcp_sock", &[field]));
    // RSTs sent: the local port from the record's sockaddr (Linux 6.10+, whose record carries
    // the local address of a socket that already released its port), else its `sport`.
    let send_reset_saddr = Lacks::optional(send_reset.field("saddr", 28));
    let send_reset_sport = if send_reset_saddr == NO_OFFSET {
        lacks.offset(&[SendReset], send_reset.field("sport", 2))
    } else {
        NO_OFFSET
    };
    let sock_done_bit = btf
        .enum_value("SOCK_DONE")
        .map_err(|e| e.to_string())
        .and_then(|bit| {
            u32::try_from(bit)
                .ok()
                .filter(|bit| *bit < 64)
                .ok_or_else(|| format!("SOCK_DONE is {bit}, not a bit of sk_flags"))
        });
    SocketOffsets {
        tp_skaddr: lacks.offset(&[SockState], state.field("skaddr", 8)),
        tp_oldstate: lacks.offset(&[SockState], state.field("oldstate", 4)),
        tp_newstate: lacks.offset(&[SockState], state.field("newstate", 4)),
        tp_sport: lacks.offset(&[SockState], state.field("sport", 2)),
        tp_protocol: lacks.offset(&[SockState], state.field("protocol", 2)),
        tp_retransmit_skaddr: lacks.offset(&[Retransmit], retransmit.field("skaddr", 8)),
        // Linux 6.10+ also fires for failed retransmits, with `err`; before, only for sent ones.
        tp_retransmit_err: Lacks::optional(retransmit.field("err", 4)),
        tp_send_reset_skaddr: lacks.offset(&[SendReset], send_reset.field("skaddr", 8)),
        tp_send_reset_saddr: send_reset_saddr,
        tp_send_reset_sport: send_reset_sport,
        tp_receive_reset_skaddr: lacks.offset(&[ReceiveReset], receive_reset.field("skaddr", 8)),
        tp_receive_reset_sport: lacks.offset(&[ReceiveReset], receive_reset.field("sport", 2)),
        sock_net: sock(lacks, &["__sk_common", "skc_net", "net"]),
        sock_num: sock(lacks, &["__sk_common", "skc_num"]),
        sock_state: sock(lacks, &["__sk_common", "skc_state"]),
        sock_flags: sock(lacks, &["__sk_common", "skc_flags"]),
        sock_drops: sock(lacks, &["sk_drops"]),
        // A bitfield before Linux 5.6: the raw tracepoint program is then not loaded.
        sock_protocol: lacks.offset(
            &[Program::SockStateRaw],
            btf.offset_of("sock", &["sk_protocol"]),
        ),
        net_inum: lacks.offset(all, btf.offset_of("net", &["ns", "inum"])),
        tcp_bytes_received: tcp(lacks, "bytes_received"),
        tcp_bytes_acked: tcp(lacks, "bytes_acked"),
        tcp_snd_una: tcp(lacks, "snd_una"),
        tcp_write_seq: tcp(lacks, "write_seq"),
        tcp_total_retrans: tcp(lacks, "total_retrans"),
        tcp_srtt_us: tcp(lacks, "srtt_us"),
        sock_done_bit: lacks.offset(all, sock_done_bit),
    }
}

/// How long a listener's slot stays its own after it stops being watched, at least. Far longer
/// than an accept takes between reading the slot and counting into it.
const RECLAIM_AFTER: Duration = Duration::from_secs(5);

/// Owns the socket maps' handles.
pub struct SocketsReader {
    /// Counters by slot, and the same array for batch reads of its slots in use.
    listeners: Array<MapData, ListenerCounters>,
    listeners_batch: Batched<u32, ListenerCounters>,
    /// Counters of listeners without a slot, and the same map for batch reads.
    auto: HashMap<MapData, ListenerKey, ListenerCounters>,
    auto_batch: Batched<ListenerKey, ListenerCounters>,
    watched: HashMap<MapData, ListenerKey, Watch>,
    /// WATCHED's index; which key holds each entry, and how many other keys have its index.
    index: Array<MapData, WatchIndexEntry>,
    index_held: std::collections::HashMap<u32, ListenerKey>,
    index_others: std::collections::HashMap<u32, u32>,
    /// What WATCHED holds (each entry's mode): only this reader writes it, so scrapes need not
    /// read it back.
    watched_entries: std::collections::HashMap<ListenerKey, u32>,
    /// The listener of each slot given, by slot (`None`: reclaimed, free). A slot stays its
    /// listener's while watched and after, so a rewatched listener (a broker restarted in the
    /// same namespace) counts on where it left off; see [`Self::reclaim`] for when it is freed.
    slots: Vec<Option<ListenerKey>>,
    slot_of: std::collections::HashMap<ListenerKey, u32>,
    /// Since when each slot's listener has not been watched.
    unwatched_since: std::collections::HashMap<u32, Instant>,
    /// Each slot's listener, as kept for a restarted agent (see `SLOT_KEYS_MAP`).
    slot_keys: Array<MapData, SlotKey>,
    /// How long a slot stays its listener's once unwatched (`probes.listener_release_seconds`).
    release_after: Duration,
    /// Entries of LISTENERS_AUTO at the last read.
    auto_entries: usize,
    config: Array<MapData, SocketsConfig>,
    spilled: Array<MapData, u64>,
    watch_all: bool,
    events: bool,
    spill: bool,
    /// Last reported (sent, received) per listener, so totals never go down between scrapes
    /// (a walk older than the last report, or a connection that closed between a walk's read
    /// of the closed totals and its iterators, counted by neither: see `probes::live`).
    reported: std::collections::HashMap<ListenerKey, (u64, u64)>,
    /// Listeners whose namespace the socket iterator swept since they were (re)watched.
    swept: std::collections::HashSet<ListenerKey>,
}

impl SocketsReader {
    pub fn take(ebpf: &mut Ebpf, release_after: Duration) -> Result<Self, ProbesError> {
        Ok(Self {
            slot_keys: take(ebpf, SLOT_KEYS_MAP)?,
            release_after,
            listeners_batch: Batched::open(ebpf, LISTENERS_MAP)?,
            auto_batch: Batched::open(ebpf, LISTENERS_AUTO_MAP)?,
            watched_entries: std::collections::HashMap::new(),
            slots: Vec::new(),
            slot_of: std::collections::HashMap::new(),
            unwatched_since: std::collections::HashMap::new(),
            auto_entries: 0,
            listeners: take(ebpf, LISTENERS_MAP)?,
            auto: take(ebpf, LISTENERS_AUTO_MAP)?,
            watched: take(ebpf, WATCHED_MAP)?,
            index: take(ebpf, WATCH_INDEX_MAP)?,
            index_held: std::collections::HashMap::new(),
            index_others: std::collections::HashMap::new(),
            config: take(ebpf, SOCKETS_CONFIG_MAP)?,
            spilled: take(ebpf, CONN_SPILLED_MAP)?,
            watch_all: false,
            events: false,
            spill: false,
            reported: std::collections::HashMap::new(),
            swept: std::collections::HashSet::new(),
        })
    }

    /// Takes over what an earlier agent left in the maps it now adopts: the watched listeners
    /// and their slots (from WATCHED), the slots kept for listeners no longer watched (from
    /// SLOT_KEYS: released after [`Self::release_after`] from now), and which key holds each
    /// index entry. Its IGNORE entries go: the agent ignores its own endpoint anew.
    pub fn adopt(&mut self) -> Result<(), ProbesError> {
        let watched: Vec<(ListenerKey, Watch)> =
            self.watched.iter().filter_map(Result::ok).collect();
        for (key, watch) in &watched {
            self.watched_entries.insert(*key, watch.mode);
            if watch.mode == WATCH && watch.slot != NO_SLOT {
                self.hold_slot(watch.slot, *key);
            }
        }
        let now = Instant::now();
        for slot in 0..self.listeners.len() {
            let Ok(key) = self.slot_keys.get(&slot, 0) else {
                continue;
            };
            if key != ListenerKey::default() && !self.slot_of.contains_key(&key) {
                self.hold_slot(slot, key);
                self.unwatched_since.insert(slot, now);
            }
        }
        for key in self.watched_entries.keys() {
            let i = watch_index(key);
            if let Ok(entry) = self.index.get(&i, 0)
                && entry.watch.mode != 0
                && entry.key == *key
            {
                self.index_held.insert(i, *key);
            }
        }
        for key in self.watched_entries.keys() {
            let i = watch_index(key);
            if self.index_held.get(&i) != Some(key) {
                *self.index_others.entry(i).or_default() += 1;
            }
        }
        let ignored: Vec<ListenerKey> = watched
            .iter()
            .filter(|(_, w)| w.mode == IGNORE)
            .map(|(k, _)| *k)
            .collect();
        for key in ignored {
            self.drop_watch(&key);
            self.watched_entries.remove(&key);
        }
        tracing::info!(
            watched = self.watched_entries.len(),
            slots = self.slot_of.len(),
            "listener slots adopted"
        );
        Ok(())
    }

    /// Records `slot` as `key`'s (adoption).
    fn hold_slot(&mut self, slot: u32, key: ListenerKey) {
        let i = slot as usize;
        if self.slots.len() <= i {
            self.slots.resize(i + 1, None);
        }
        self.slots[i] = Some(key);
        self.slot_of.insert(key, slot);
    }

    /// Count every listener on the node (debugging), not only watched ones. Applied in place.
    pub fn set_watch_all(&mut self, on: bool) -> Result<(), ProbesError> {
        self.watch_all = on;
        self.write_config()
    }

    /// Emit connection events (while `/v1/events` has a subscriber). Applied in place.
    pub fn set_events(&mut self, on: bool) -> Result<(), ProbesError> {
        self.events = on;
        self.write_config()
    }

    /// Let the spill tier take connections while the first is full (it exists when the
    /// capacity is larger than the first tier).
    pub fn set_spill(&mut self, on: bool) -> Result<(), ProbesError> {
        self.spill = on;
        self.write_config()
    }

    /// Connections tracked in the spill tier now, if the count can be read.
    pub fn spilled(&self) -> Option<u64> {
        self.spilled.get(&0, 0).ok()
    }

    fn write_config(&mut self) -> Result<(), ProbesError> {
        let config = SocketsConfig {
            watch_all: u32::from(self.watch_all),
            events: u32::from(self.events),
            spill: u32::from(self.spill),
        };
        self.config
            .set(0, config, 0)
            .map_err(map_error(SOCKETS_CONFIG_MAP))
    }

    /// Makes the WATCH entries exactly `listeners`; IGNORE entries stay.
    pub fn set_watched(&mut self, listeners: &[(u32, u16)]) -> Result<(), ProbesError> {
        let wanted: std::collections::HashSet<ListenerKey> = listeners
            .iter()
            .map(|&(netns, port)| ListenerKey::new(netns, port))
            .collect();
        let current = self.watched_entries();
        for (key, value) in &current {
            if *value == WATCH && !wanted.contains(key) {
                self.drop_watch(key);
                self.watched_entries.remove(key);
                self.swept.remove(key);
                if let Some(&slot) = self.slot_of.get(key) {
                    self.unwatched_since.insert(slot, Instant::now());
                }
            }
        }
        for key in &wanted {
            if !current.iter().any(|(k, _)| k == key) {
                let watch = Watch {
                    mode: WATCH,
                    slot: self.slot_for(*key),
                };
                self.put_watch(*key, watch)?;
                self.watched_entries.insert(*key, WATCH);
                // Watched anew (a broker that started or restarted): its listening socket
                // may predate this, so its namespace gets swept again.
                self.swept.remove(key);
            }
        }
        Ok(())
    }

    /// Never count (netns, port), even in watch-all mode.
    pub fn ignore(&mut self, netns: u32, port: u16) -> Result<(), ProbesError> {
        let key = ListenerKey::new(netns, port);
        if self.watched_entries.get(&key) == Some(&IGNORE) {
            return Ok(());
        }
        let watch = Watch {
            mode: IGNORE,
            slot: NO_SLOT,
        };
        self.put_watch(key, watch)?;
        self.watched_entries.insert(key, IGNORE);
        Ok(())
    }

    /// Writes `key`'s watch into WATCHED, then into its index entry if no other key holds it
    /// (else flags the entry: another key has its index), in the order the programs' reads
    /// rely on (see `WatchIndexEntry`).
    fn put_watch(&mut self, key: ListenerKey, watch: Watch) -> Result<(), ProbesError> {
        self.watched
            .insert(key, watch, 0)
            .map_err(map_error(WATCHED_MAP))?;
        let i = watch_index(&key);
        match self.index_held.get(&i) {
            Some(held) if *held != key => {
                let others = self.index_others.entry(i).or_default();
                *others += 1;
                if *others == 1 {
                    self.set_others(i, 1)?;
                }
            }
            _ => {
                let others = u32::from(self.index_others.get(&i).is_some_and(|n| *n > 0));
                let mut entry = WatchIndexEntry {
                    key,
                    watch: Watch {
                        mode: 0,
                        slot: watch.slot,
                    },
                    others,
                    _pad: 0,
                };
                self.index
                    .set(i, entry, 0)
                    .map_err(map_error(WATCH_INDEX_MAP))?;
                entry.watch.mode = watch.mode;
                self.index
                    .set(i, entry, 0)
                    .map_err(map_error(WATCH_INDEX_MAP))?;
                self.index_held.insert(i, key);
            }
        }
        Ok(())
    }

    /// Removes `key` from its index entry (clearing the mode alone), or from the entry's count
    /// of other keys, then from WATCHED.
    fn drop_watch(&mut self, key: &ListenerKey) {
        let i = watch_index(key);
        if self.index_held.get(&i) == Some(key) {
            if let Ok(mut entry) = self.index.get(&i, 0) {
                entry.watch.mode = 0;
                let _ = self.index.set(i, entry, 0);
            }
            self.index_held.remove(&i);
        } else if let Some(others) = self.index_others.get_mut(&i) {
            *others -= 1;
            if *others == 0 {
                self.index_others.remove(&i);
                let _ = self.set_others(i, 0);
            }
        }
        let _ = self.watched.remove(key);
    }

    /// Sets the flag of index entry `i` that says other keys have its index.
    fn set_others(&mut self, i: u32, flag: u32) -> Result<(), ProbesError> {
        let err = map_error(WATCH_INDEX_MAP);
        let mut entry = self.index.get(&i, 0).map_err(err)?;
        entry.others = flag;
        self.index.set(i, entry, 0).map_err(err)
    }

    /// Namespaces to iterate: those of watched listeners and, in watch-all mode, of every
    /// listener that has counters.
    pub fn watched_namespaces(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .watched_entries()
            .into_iter()
            .filter(|(_, v)| *v == WATCH)
            .map(|(k, _)| k.netns)
            .collect();
        if self.watch_all {
            out.extend(self.listener_entries().into_iter().map(|(k, _)| k.netns));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Namespaces with listeners not swept since they became counted: watched ones and, in
    /// watch-all mode, those that got counters. They count as swept from now on.
    pub fn unswept_namespaces(&mut self) -> Vec<u32> {
        let mut current: std::collections::HashSet<ListenerKey> = self
            .watched_entries()
            .into_iter()
            .filter(|(_, v)| *v == WATCH)
            .map(|(k, _)| k)
            .collect();
        if self.watch_all {
            current.extend(self.listener_entries().into_iter().map(|(k, _)| k));
        }
        let mut out: Vec<u32> = current
            .iter()
            .filter(|k| !self.swept.contains(k))
            .map(|k| k.netns)
            .collect();
        self.swept = current;
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Every WATCHED entry.
    fn watched_entries(&self) -> Vec<(ListenerKey, u32)> {
        self.watched_entries.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// `key`'s slot: the one it was given, or a free one, or a reclaimed one, or [`NO_SLOT`]
    /// when none can be had (its counters then go to LISTENERS_AUTO, bounded too).
    fn slot_for(&mut self, key: ListenerKey) -> u32 {
        if let Some(&slot) = self.slot_of.get(&key) {
            self.unwatched_since.remove(&slot);
            return slot;
        }
        let slot = if let Some(free) = self.slots.iter().position(Option::is_none) {
            free as u32
        } else if (self.slots.len() as u32) < self.listeners.len() {
            self.slots.push(None);
            self.slots.len() as u32 - 1
        } else if let Some(reclaimed) = self.reclaim() {
            reclaimed
        } else {
            return NO_SLOT;
        };
        self.slots[slot as usize] = Some(key);
        self.slot_of.insert(key, slot);
        if let Err(e) = self.slot_keys.set(slot, key, 0) {
            tracing::warn!(slot, error = %e, "cannot record a slot's listener: a restarted agent will not know it");
        }
        slot
    }

    /// Frees the slot of the listener unwatched longest, once unwatched for [`RECLAIM_AFTER`]
    /// and with no connection open in it (`active` 0: every one accepted or adopted has closed
    /// or was never tracked, and no program can find the slot any more, so nothing writes it),
    /// and zeroes it for its next listener. The old listener's counters go: its broker has been
    /// gone that long, and its series are no longer shown. Only when every slot is taken, so on
    /// a node within its capacity counters are kept for the agent's life.
    fn reclaim(&mut self) -> Option<u32> {
        let mut unwatched: Vec<(Instant, u32)> = self
            .unwatched_since
            .iter()
            .filter(|(_, since)| since.elapsed() >= RECLAIM_AFTER)
            .map(|(slot, since)| (*since, *slot))
            .collect();
        unwatched.sort_unstable();
        unwatched
            .into_iter()
            .map(|(_, slot)| slot)
            .find(|&slot| self.free_slot(slot, "reclaimed for a new listener: every slot is taken"))
    }

    /// Frees every slot unwatched for [`Self::release_after`] with no connection open in it:
    /// its listener's broker stopped that long ago (its namespace is likely gone with its
    /// pod), and Prometheus had time for its last scrapes. Its series go with it.
    pub fn release_expired(&mut self) {
        let expired: Vec<u32> = self
            .unwatched_since
            .iter()
            .filter(|(_, since)| since.elapsed() >= self.release_after)
            .map(|(slot, _)| *slot)
            .collect();
        for slot in expired {
            self.free_slot(
                slot,
                "released: unwatched for probes.listener_release_seconds",
            );
        }
    }

    /// Zeroes and frees `slot` if no connection is open in it (`active` 0: every one accepted
    /// or adopted has closed or was never tracked, and no program can find the slot any more,
    /// so nothing writes it). Whether it was freed.
    fn free_slot(&mut self, slot: u32, why: &'static str) -> bool {
        let Ok(counters) = self.listeners.get(&slot, 0) else {
            return false;
        };
        if counters.active() != 0 || self.listeners.set(slot, ListenerCounters::ZERO, 0).is_err() {
            return false;
        }
        self.unwatched_since.remove(&slot);
        let _ = self.slot_keys.set(slot, ListenerKey::default(), 0);
        if let Some(key) = self.slots.get_mut(slot as usize).and_then(Option::take) {
            self.slot_of.remove(&key);
            // Counted anew if it is ever watched again: its totals start over.
            self.reported.remove(&key);
            tracing::info!(
                netns = key.netns,
                port = key.port,
                slot,
                "listener slot {why}; its counters and series are dropped"
            );
        }
        true
    }

    /// Every listener's counters: the slots in use and LISTENERS_AUTO, summed per listener (a
    /// listener counted in watch-all mode before it was watched has some in both). Batch reads,
    /// or entry by entry where the kernel cannot batch.
    fn listener_entries(&self) -> Vec<(ListenerKey, ListenerCounters)> {
        self.listener_entries_and_auto().0
    }

    /// [`Self::listener_entries`], and how many of the listeners have counters in
    /// LISTENERS_AUTO.
    fn listener_entries_and_auto(&self) -> (Vec<(ListenerKey, ListenerCounters)>, usize) {
        let used = self.slots.len();
        // Slots in use are a prefix of the array, some perhaps free (reclaimed, not given yet).
        let by_slot = self.listeners_batch.read_first(used).unwrap_or_else(|_| {
            (0..used as u32)
                .filter_map(|slot| Some((slot, self.listeners.get(&slot, 0).ok()?)))
                .collect()
        });
        // A slot still all zeros (its listener never accepted, adopted or reset a connection)
        // is left out, as a listener without counters was before slots: its series appear with
        // its first connection.
        let mut out: std::collections::HashMap<ListenerKey, ListenerCounters> = by_slot
            .into_iter()
            .filter(|(_, counters)| *counters != ListenerCounters::ZERO)
            .filter_map(|(slot, counters)| Some(((*self.slots.get(slot as usize)?)?, counters)))
            .collect();
        let auto = self
            .auto_batch
            .read_single()
            .unwrap_or_else(|_| self.auto.iter().filter_map(Result::ok).collect());
        let auto_entries = auto.len();
        for (key, counters) in auto {
            out.entry(key).or_default().add(&counters);
        }
        (out.into_iter().collect(), auto_entries)
    }

    /// Slots given to listeners, and entries of LISTENERS_AUTO at the last [`Self::read`].
    pub fn entries(&self) -> (u64, u64) {
        let given = self.slots.iter().filter(|s| s.is_some()).count();
        (given as u64, self.auto_entries as u64)
    }

    /// Namespaces whose sweep failed are swept again next time.
    pub fn sweep_failed(&mut self, namespaces: &[u32]) {
        self.swept.retain(|k| !namespaces.contains(&k.netns));
    }

    /// Closed connections' (sent, received) per listener, from the counter maps.
    pub fn closed_bytes(&self) -> std::collections::HashMap<ListenerKey, (u64, u64)> {
        self.listener_entries()
            .into_iter()
            .map(|(key, c)| (key, (c.bytes_sent, c.bytes_received)))
            .collect()
    }

    /// Every listener's counters, sorted by (netns, port), with the bytes of open connections
    /// as of the last walk: `walked` is its totals (closed before it plus open) and `drops` the
    /// listening sockets' `sk_drops` it saw (see `probes::live` for why the larger of the walk's
    /// totals, the closed totals now and the last report). An entry that vanishes mid-read is
    /// skipped.
    pub fn read(
        &mut self,
        walked: &std::collections::HashMap<ListenerKey, (u64, u64)>,
        drops: &std::collections::HashMap<ListenerKey, u64>,
    ) -> Vec<ListenerStats> {
        self.release_expired();
        let (entries, auto_entries) = self.listener_entries_and_auto();
        self.auto_entries = auto_entries;
        let mut out: Vec<ListenerStats> = entries
            .into_iter()
            .map(|(key, counters)| {
                let walk = walked.get(&key).copied().unwrap_or_default();
                let last = self.reported.get(&key).copied().unwrap_or_default();
                ListenerStats {
                    key,
                    counters,
                    bytes_sent: counters.bytes_sent.max(walk.0).max(last.0),
                    bytes_received: counters.bytes_received.max(walk.1).max(last.1),
                    listen_drops: drops.get(&key).copied(),
                }
            })
            .collect();
        out.sort_by_key(|l| l.key);
        self.reported = out
            .iter()
            .map(|l| (l.key, (l.bytes_sent, l.bytes_received)))
            .collect();
        out
    }
}
