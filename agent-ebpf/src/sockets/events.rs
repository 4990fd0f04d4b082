//! Connection events for /v1/events.
//!
//! Only while SOCKETS_CONFIG.events is set (a subscriber is connected): otherwise each call site
//! costs one array lookup.

use aya_ebpf::{macros::map, maps::RingBuf, programs::TracePointContext};
use brokerscope_common::{
    processes::NO_FIELD,
    sockets::{CONN_EVENTS_BYTES, ConnEvent, EventOffsets, ListenerKey},
    telemetry::ProbeError,
};

use super::{
    helpers::{field, kread, v6},
    maps::SOCKETS_CONFIG,
};
use crate::{fields::opaque_zero, telemetry::count_error};

/// Connection events; bounded by its byte size, a full ring drops (and counts) the event.
#[map(name = "CONN_EVENTS")]
pub(super) static CONN_EVENTS: RingBuf = RingBuf::with_byte_size(CONN_EVENTS_BYTES, 0);

/// Written by the loader from the tracepoint formats.
#[unsafe(no_mangle)]
pub(super) static EVENT_OFFSETS: EventOffsets = EventOffsets::UNSET;

/// Emits a `kind` event of `listener`'s connection when events are on; `fill` adds what the
/// site knows. A failure to fill is counted and the event still goes out with what it has.
#[inline(always)]
pub(super) fn send_event(
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
pub(super) fn event_offsets() -> EventOffsets {
    // SAFETY: a plain read of a global the loader initialised; volatile so the compiler cannot
    // fold the compiled-in placeholder.
    unsafe { core::ptr::read_volatile(&EVENT_OFFSETS) }
}

/// Remote port, family and addresses from `sock:inet_sock_set_state`.
#[inline(always)]
pub(super) fn state_tuple(ctx: &TracePointContext, e: &mut ConnEvent) -> Result<(), ProbeError> {
    let off = event_offsets();
    e.remote_port = field(ctx, off.state_dport)?;
    e.family = field(ctx, off.state_family)?;
    e.local_addr = field(ctx, off.state_saddr_v6)?;
    e.remote_addr = field(ctx, off.state_daddr_v6)?;
    Ok(())
}

/// The same from `tcp:tcp_retransmit_skb`.
#[inline(always)]
pub(super) fn retransmit_tuple(
    ctx: &TracePointContext,
    e: &mut ConnEvent,
) -> Result<(), ProbeError> {
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
pub(super) fn sock_tuple(sk: u64, e: &mut ConnEvent) -> Result<(), ProbeError> {
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

pub(super) const AF_INET: u16 = 2;

/// `::ffff:a.b.c.d` from an IPv4 address's bytes. Built from two 8-byte halves: as an array
/// literal, its ten zero bytes became a call to a byte-wise memset (see `opaque_zero`).
#[inline(always)]
pub(super) fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    let high = [0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]];
    v6(opaque_zero(), u64::from_ne_bytes(high))
}
