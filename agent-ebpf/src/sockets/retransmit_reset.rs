//! The retransmit and reset programs: `tcp:tcp_retransmit_skb`, `tcp:tcp_send_reset` and
//! `tcp:tcp_receive_reset`, counted on the tracked connection's or the socket's listener.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use brokerscope_common::{
    processes::NO_FIELD,
    sockets::{CONN_RESET_RECEIVED, CONN_RESET_SENT, CONN_RETRANSMIT, ListenerKey},
    telemetry::{ProbeError, Program},
};

use super::{
    events::{event_offsets, retransmit_tuple, send_event, sock_tuple},
    helpers::{field, kread, kread_netns, offsets},
    run,
    tracking::tracked,
    watch::{existing_counters, listener_counters},
};
use crate::telemetry::increment;

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

pub(super) fn try_retransmit(ctx: &TracePointContext) -> Result<(), ProbeError> {
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
pub(super) fn try_reset(
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
