//! The kernel's connection events (`CONN_EVENTS` ring buffer): passive opens, closes with
//! bytes and lifetime, resets and retransmits of watched listeners' connections. Emitted only
//! while `SOCKETS_CONFIG.events` is set; the loader sets it while `/v1/events` has a subscriber.
//!
//! Owns the ring's reader; what the events mean to users (broker, listener) is the model's.

use aya::maps::{MapData, RingBuf};
use brokerscope_common::sockets::{ConnEvent, EventOffsets};
use tokio::io::unix::AsyncFd;

use super::{
    btf::Btf,
    error::ProbesError,
    lacks::{Lacks, NO_OFFSET},
    tracefs::Format,
};

/// The kernel's connection-event ring, as [`spawn_reader`] takes it (see
/// `Probes::take_conn_events`).
pub type ConnEventRing = RingBuf<MapData>;

/// Most events handed over per wakeup; the rest wait for the next round (bounded batches).
const BATCH: usize = 1024;

/// The 4-tuple fields of the two tracepoints that have them, and of `struct sock` for the raw
/// tracepoint. The records' tuples are optional: where a record lacks them, the programs read
/// the tuple from the socket (all four record fields of a tracepoint, or none, are used).
pub fn resolve_offsets(
    read: impl Fn(&str, &str) -> Format,
    btf: &Btf,
    lacks: &mut Lacks,
) -> EventOffsets {
    let all = super::sockets::SOCKET_PROGRAMS;
    let mut sock =
        |member: &str| lacks.offset(all, btf.offset_of("sock", &["__sk_common", member]));
    // [dport, family, saddr_v6, daddr_v6] of a record, or all NO_OFFSET.
    let tuple = |format: Format| {
        let fields = [
            format.field("dport", 2),
            format.field("family", 2),
            format.field("saddr_v6", 16),
            format.field("daddr_v6", 16),
        ];
        if fields.iter().all(Result::is_ok) {
            fields.map(|f| f.unwrap_or(NO_OFFSET))
        } else {
            [NO_OFFSET; 4]
        }
    };
    let [state_dport, state_family, state_saddr_v6, state_daddr_v6] =
        tuple(read("sock", "inet_sock_set_state"));
    let [
        retransmit_dport,
        retransmit_family,
        retransmit_saddr_v6,
        retransmit_daddr_v6,
    ] = tuple(read("tcp", "tcp_retransmit_skb"));
    EventOffsets {
        state_dport,
        state_family,
        state_saddr_v6,
        state_daddr_v6,
        retransmit_dport,
        retransmit_family,
        retransmit_saddr_v6,
        retransmit_daddr_v6,
        sock_dport: sock("skc_dport"),
        sock_family: sock("skc_family"),
        sock_daddr: sock("skc_daddr"),
        sock_rcv_saddr: sock("skc_rcv_saddr"),
        // Absent in kernels built without IPv6.
        sock_v6_daddr: Lacks::optional(btf.offset_of("sock", &["__sk_common", "skc_v6_daddr"])),
        sock_v6_rcv_saddr: Lacks::optional(
            btf.offset_of("sock", &["__sk_common", "skc_v6_rcv_saddr"]),
        ),
    }
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
    crate::tasks::spawn("conn-events", async move {
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
