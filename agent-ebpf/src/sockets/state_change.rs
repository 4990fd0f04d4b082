//! The accept/close programs: `sock:inet_sock_set_state` as a classic, raw and BTF tracepoint,
//! and the counting of a passive open, a listen, and a close.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use brokerscope_common::{
    fields::Field,
    sockets::{
        CONN_ADOPTED, CONN_CLOSE, CONN_OPEN, ConnEvent, ConnectionState, DURATION_BUCKETS,
        IPPROTO_TCP, ListenerCounters, ListenerKey, RTT_BUCKETS, Transition, classify, log2_bucket,
        tcp_state,
    },
    telemetry::{ProbeError, Program},
};

use super::{
    events::send_event,
    helpers::{kread, offsets},
    maps::LISTEN_SOCKS,
    run,
    socket::{Probed, RecordHead, Socket, Traced, Typed},
    tracking::{track, tracked, untrack},
    watch::{counted, listener_counters, watch_of, watched_slot},
};
use crate::{
    fields::{load, opaque_zero, tcp_sock},
    telemetry::increment,
};

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn sock_state(ctx: TracePointContext) -> u32 {
    run(&ctx, Program::SockState, try_sock_state)
}

pub(super) fn try_sock_state(ctx: &TracePointContext) -> Result<(), ProbeError> {
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

pub(super) fn try_sock_state_raw(ctx: &RawTracePointContext) -> Result<(), ProbeError> {
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

pub(super) fn try_sock_state_btf(ctx: &BtfTracePointContext) -> Result<(), ProbeError> {
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

/// Counts an accept or a close of `socket`.
#[inline(always)]
pub(super) fn on_state_change(
    socket: impl Socket,
    oldstate: i32,
    newstate: i32,
) -> Result<(), ProbeError> {
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
pub(super) fn account_close(
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

/// A closing connection's payload bytes over its tracked life, and lifetime (the tuple is
/// filled by the caller).
#[inline(always)]
pub(super) fn close_details(
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
