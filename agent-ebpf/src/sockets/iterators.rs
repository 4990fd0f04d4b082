//! The scrape-time iterators: `iter/tcp` over a namespace's socket table, and `iter/bpf_map_elem`
//! over the connection tiers and the listening sockets, each writing `LiveRecord`s.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use brokerscope_common::{
    sockets::{
        CONN_ADOPTED, CONN_WAYS, ConnectionState, LIVE_CONNECTION, LIVE_LISTENER, ListenerKey,
        LiveRecord, NO_SLOT, SocketOffsets, WATCH, is_connection_state, tcp_state,
    },
    telemetry::{ProbeError, Program},
};

use super::{
    helpers::{kread, kread_netns, offsets, socket_payload},
    maps::{CLAIMED, CONN_STATES, LISTEN_SOCKS, LISTENERS_AUTO},
    tracking::{slot_index, track, tracked},
    watch::{counted, listener_counters, watch_all, watch_of, watched_slot},
};
use crate::{
    fields::opaque_zero,
    telemetry::{count_error, count_run, increment},
};

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

pub(super) fn try_tcp_live(ctx: *mut core::ffi::c_void) -> Result<(), ProbeError> {
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
pub(super) fn map_elem(ctx: *mut core::ffi::c_void) -> Result<Option<(u64, u64)>, ProbeError> {
    let key: u64 = kread(ctx as u64, 16, ProbeError::ReadContext)?;
    let value: u64 = kread(ctx as u64, 24, ProbeError::ReadContext)?;
    Ok((key != 0 && value != 0).then_some((key, value)))
}

/// Whether `sk` is still the socket the entry was made for: the address of a closed socket can
/// be reused by a new one (TCP sockets are SLAB_TYPESAFE_BY_RCU), so the entry's listener must
/// match the socket's own namespace and local port.
#[inline(always)]
pub(super) fn same_listener(
    sk: u64,
    key: &ListenerKey,
    off: &SocketOffsets,
) -> Result<bool, ProbeError> {
    let port: u16 = kread(sk, off.sock_num, ProbeError::ReadSocket)?;
    Ok(port == key.port && kread_netns(sk, off)? == key.netns)
}

pub(super) fn try_conn_live(ctx: *mut core::ffi::c_void) -> Result<(), ProbeError> {
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

pub(super) fn try_conn_spill_live(ctx: *mut core::ffi::c_void) -> Result<(), ProbeError> {
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
pub(super) fn live_connection(
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
pub(super) fn connection_record(tracked: &ConnectionState, sent: u64, received: u64) -> LiveRecord {
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
pub(super) fn listener_record(listener: ListenerKey, drops: u32) -> LiveRecord {
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

pub(super) fn try_listen_live(ctx: *mut core::ffi::c_void) -> Result<(), ProbeError> {
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

/// Writes one record to the iterator's seq_file (`ctx->meta->seq`).
#[inline(always)]
pub(super) fn emit(ctx: *mut core::ffi::c_void, record: &LiveRecord) -> Result<(), ProbeError> {
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
