//! Reads the socket programs share: the loader's offsets, tracepoint record fields, kernel memory
//! (a socket's namespace and payload bytes).

use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::TracePointContext};
use brokerscope_common::{
    sockets::{SocketOffsets, payload_bytes},
    telemetry::ProbeError,
};

/// Written by the loader from the running kernel's tracepoint formats and BTF.
#[unsafe(no_mangle)]
pub(super) static SOCKET_OFFSETS: SocketOffsets = SocketOffsets::UNSET;

#[inline(always)]
pub(super) fn offsets() -> SocketOffsets {
    // SAFETY: a plain read of a global the loader initialised; volatile so the compiler cannot
    // fold the compiled-in placeholder.
    unsafe { core::ptr::read_volatile(&SOCKET_OFFSETS) }
}

#[inline(always)]
pub(super) fn field<T>(ctx: &TracePointContext, offset: u32) -> Result<T, ProbeError> {
    // SAFETY: the offset comes from the tracepoint's own format file; the read is checked by
    // bpf_probe_read_kernel.
    unsafe { ctx.read_at::<T>(offset as usize) }.map_err(|_| ProbeError::ReadContext)
}

/// Reads a `T` at `base + offset` of a kernel object.
#[inline(always)]
pub(super) fn kread<T>(base: u64, offset: u32, error: ProbeError) -> Result<T, ProbeError> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.map_err(|_| error)
}

/// An IPv6 address from its two halves as loaded (memory order).
#[inline(always)]
pub(super) fn v6(low: u64, high: u64) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&low.to_ne_bytes());
    a[8..].copy_from_slice(&high.to_ne_bytes());
    a
}

/// Bit of `SOCK_DONE` in `sk_flags`.
#[inline(always)]
pub(super) fn done_bit() -> u32 {
    // SAFETY: a plain read of a global the loader initialised; volatile as in `offsets`.
    unsafe { core::ptr::read_volatile(&raw const SOCKET_OFFSETS.sock_done_bit) }
}

/// The inode number of the network namespace a socket belongs to: `sk->__sk_common.skc_net.net
/// ->ns.inum`, at offsets the loader resolved from BTF.
#[inline(always)]
pub(super) fn kread_netns(sk: u64, off: &SocketOffsets) -> Result<u32, ProbeError> {
    let net: u64 = kread(sk, off.sock_net, ProbeError::ReadNetns)?;
    kread(net, off.net_inum, ProbeError::ReadNetns)
}

/// Payload bytes a socket in `state` has received and had acknowledged.
#[inline(always)]
pub(super) fn socket_payload(
    sk: u64,
    state: i32,
    off: &SocketOffsets,
) -> Result<(u64, u64), ProbeError> {
    let bytes_acked: u64 = kread(sk, off.tcp_bytes_acked, ProbeError::ReadSocket)?;
    let bytes_received: u64 = kread(sk, off.tcp_bytes_received, ProbeError::ReadSocket)?;
    let snd_una: u32 = kread(sk, off.tcp_snd_una, ProbeError::ReadSocket)?;
    let write_seq: u32 = kread(sk, off.tcp_write_seq, ProbeError::ReadSocket)?;
    let flags: u64 = kread(sk, off.sock_flags, ProbeError::ReadSocket)?;
    let done = (flags >> off.sock_done_bit) & 1 == 1;
    Ok(payload_bytes(
        state,
        bytes_acked,
        bytes_received,
        snd_una,
        write_seq,
        done,
    ))
}
