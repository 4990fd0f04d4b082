//! TCP sockets: accepts and closes per (network namespace, local port) from
//! `sock:inet_sock_set_state`.
//!
//! Attribution uses the socket itself (its `struct sock`: namespace and local port), never the
//! current task: the tracepoint fires in softirq context on whatever task happens to run.

use aya_log_ebpf::warn;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use brokerscope_common::{
    sockets::{
        CONNECTIONS_CAPACITY, ConnectionState, IPPROTO_TCP, LISTENERS_CAPACITY, ListenerCounters,
        ListenerKey, SocketOffsets, Transition, classify,
    },
    telemetry::{ProbeError, Program},
};

use crate::telemetry::{count_error, count_run, increment};

/// Written by the loader from the running kernel's tracepoint format and BTF.
#[unsafe(no_mangle)]
static SOCKET_OFFSETS: SocketOffsets = SocketOffsets::UNSET;

/// Per-listener counters; bounded by the number of (netns, port) pairs that accepted a connection.
/// The loader resizes it from `probes.listeners_capacity`.
#[map(name = "LISTENERS")]
static LISTENERS: HashMap<ListenerKey, ListenerCounters> =
    HashMap::with_max_entries(LISTENERS_CAPACITY, 0);

/// Accepted connections not yet closed, keyed by `struct sock` address; bounded by
/// `probes.connections_capacity`. Full means "counted but not tracked" (see `untracked`).
#[map(name = "CONNECTIONS")]
static CONNECTIONS: HashMap<u64, ConnectionState> =
    HashMap::with_max_entries(CONNECTIONS_CAPACITY, 0);

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn sock_state(ctx: TracePointContext) -> u32 {
    count_run(Program::SockState);
    if let Err(error) = try_sock_state(&ctx) {
        count_error(error);
        // Only failures are logged: the success path must stay cheap. The log ring is bounded,
        // so a storm of failures drops log records, never counts.
        warn!(
            &ctx,
            "sock_state: {} (error kind {})",
            error.label(),
            error as u32
        );
    }
    0
}

#[inline(always)]
fn offsets() -> SocketOffsets {
    // SAFETY: a plain read of a global the loader initialised; volatile so the compiler cannot
    // fold the compiled-in placeholder.
    unsafe { core::ptr::read_volatile(&SOCKET_OFFSETS) }
}

#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u32) -> Result<T, ProbeError> {
    // SAFETY: the offset comes from the tracepoint's own format file; the read is checked by
    // bpf_probe_read_kernel.
    unsafe { ctx.read_at::<T>(offset as usize) }.map_err(|_| ProbeError::ReadContext)
}

fn try_sock_state(ctx: &TracePointContext) -> Result<(), ProbeError> {
    let off = offsets();
    let protocol: u16 = field(ctx, off.tp_protocol)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let oldstate: i32 = field(ctx, off.tp_oldstate)?;
    let newstate: i32 = field(ctx, off.tp_newstate)?;
    match classify(oldstate, newstate) {
        Transition::PassiveOpen => {
            let sk: u64 = field(ctx, off.tp_skaddr)?;
            let port: u16 = field(ctx, off.tp_sport)?;
            let listener = ListenerKey::new(netns_of(sk, &off)?, port);
            let counters = listener_counters(&listener)?;
            add(counters.accepted);
            let state = ConnectionState {
                listener,
                // SAFETY: no preconditions.
                established_ns: unsafe { bpf_ktime_get_ns() },
            };
            if CONNECTIONS.insert(sk, state, 0).is_err() {
                add(counters.untracked);
                return Err(ProbeError::ConnectionsFull);
            }
            Ok(())
        }
        Transition::Close => {
            let sk: u64 = field(ctx, off.tp_skaddr)?;
            let Some(state) = CONNECTIONS.get_ptr(sk) else {
                return Ok(());
            };
            // SAFETY: the pointer came from a successful lookup and is valid for this run.
            let listener = unsafe { (*state).listener };
            let _ = CONNECTIONS.remove(sk);
            let counters = listener_counters(&listener)?;
            add(counters.closed);
            Ok(())
        }
        Transition::Other => Ok(()),
    }
}

/// One listener's counters, in the map.
struct CountersRef {
    accepted: *mut u64,
    closed: *mut u64,
    untracked: *mut u64,
}

fn listener_counters(key: &ListenerKey) -> Result<CountersRef, ProbeError> {
    let ptr = match LISTENERS.get_ptr_mut(key) {
        Some(ptr) => ptr,
        None => {
            // Another CPU may insert the same key between our lookup and insert: NOEXIST makes
            // that a harmless failure and the second lookup finds its entry.
            let _ = LISTENERS.insert(key, ListenerCounters::default(), BPF_NOEXIST.into());
            LISTENERS
                .get_ptr_mut(key)
                .ok_or(ProbeError::ListenersFull)?
        }
    };
    // SAFETY: field projections of a valid map value pointer; nothing is read here.
    unsafe {
        Ok(CountersRef {
            accepted: &raw mut (*ptr).accepted,
            closed: &raw mut (*ptr).closed,
            untracked: &raw mut (*ptr).untracked,
        })
    }
}

#[inline(always)]
fn add(counter: *mut u64) {
    // SAFETY: every caller passes a field of a value looked up in LISTENERS during this run.
    unsafe { increment(counter) }
}

/// The inode number of the network namespace a socket belongs to: `sk->__sk_common.skc_net.net
/// ->ns.inum`, at offsets the loader resolved from BTF.
#[inline(always)]
fn netns_of(sk: u64, off: &SocketOffsets) -> Result<u32, ProbeError> {
    // SAFETY: both reads go through bpf_probe_read_kernel, which checks the address.
    unsafe {
        let net: u64 = bpf_probe_read_kernel((sk + u64::from(off.sock_net)) as *const u64)
            .map_err(|_| ProbeError::ReadNetns)?;
        bpf_probe_read_kernel((net + u64::from(off.net_inum)) as *const u32)
            .map_err(|_| ProbeError::ReadNetns)
    }
}
