//! The kernel's connection events (`CONN_EVENTS` ring buffer): passive opens, closes with
//! bytes and lifetime, resets and retransmits of watched listeners' connections. Emitted only
//! while `SOCKETS_CONFIG.events` is set; the loader sets it while `/v1/events` has a subscriber.
//!
//! Owns the ring's reader; what the events mean to users (broker, listener) is the model's.

use std::path::Path;

use aya::maps::{MapData, RingBuf};
use brokerscope_common::sockets::{ConnEvent, EventOffsets};
use tokio::io::unix::AsyncFd;

use brokerscope_common::processes::NO_FIELD;

use super::{ProbesError, btf::Btf, tracefs::Format};

/// Most events handed over per wakeup; the rest wait for the next round (bounded batches).
const BATCH: usize = 1024;

/// The 4-tuple fields of the two tracepoints that have them, and of `struct sock` for the raw
/// tracepoint.
pub fn resolve_offsets(tracefs: &Path, btf: &Btf) -> Result<EventOffsets, ProbesError> {
    let sock = |member: &str| btf.offset_of("sock", &["__sk_common", member]);
    let state = Format::read(tracefs, "sock", "inet_sock_set_state")?;
    let retransmit = Format::read(tracefs, "tcp", "tcp_retransmit_skb")?;
    Ok(EventOffsets {
        state_dport: state.field("dport", 2)?,
        state_family: state.field("family", 2)?,
        state_saddr_v6: state.field("saddr_v6", 16)?,
        state_daddr_v6: state.field("daddr_v6", 16)?,
        retransmit_dport: retransmit.field("dport", 2)?,
        retransmit_family: retransmit.field("family", 2)?,
        retransmit_saddr_v6: retransmit.field("saddr_v6", 16)?,
        retransmit_daddr_v6: retransmit.field("daddr_v6", 16)?,
        sock_dport: sock("skc_dport")?,
        sock_family: sock("skc_family")?,
        sock_daddr: sock("skc_daddr")?,
        sock_rcv_saddr: sock("skc_rcv_saddr")?,
        // Absent in kernels built without IPv6.
        sock_v6_daddr: sock("skc_v6_daddr").unwrap_or(NO_FIELD),
        sock_v6_rcv_saddr: sock("skc_v6_rcv_saddr").unwrap_or(NO_FIELD),
    })
}

/// Drains the ring on the runtime and hands each batch to `sink`.
pub fn spawn_reader(
    ring: RingBuf<MapData>,
    sink: impl Fn(&[ConnEvent]) + Send + 'static,
) -> Result<(), ProbesError> {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same for as long as
    // it lives, and the AsyncFd owns the ring buffer.
    let mut ring =
        unsafe { AsyncFd::register(ring) }.map_err(|e| ProbesError::LogFd(e.into_parts().1))?;
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let mut guard = match ring.readable_mut().await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::warn!(error = %e, "connection event reader stopped");
                    return;
                }
            };
            let ring = guard.get_inner_mut();
            loop {
                while batch.len() < BATCH {
                    let Some(item) = ring.next() else { break };
                    if let Some(event) = parse(&item) {
                        batch.push(event);
                    }
                }
                if batch.is_empty() {
                    break;
                }
                sink(&batch);
                batch.clear();
            }
            guard.clear_ready();
        }
    });
    Ok(())
}

fn parse(bytes: &[u8]) -> Option<ConnEvent> {
    if bytes.len() < size_of::<ConnEvent>() {
        return None;
    }
    // SAFETY: the length was checked, ConnEvent is plain integers (any bit pattern is valid),
    // and read_unaligned copes with the ring's 8-byte alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ConnEvent>()) })
}
