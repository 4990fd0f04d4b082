//! brokerscope's kernel programs. One module per hook family; each program is a thin entry point
//! that fails open and counts its failures in the per-CPU `PROBE_ERRORS` array.
#![no_std]
#![no_main]
// The BPF target's core has no 64-bit fetch_add; `telemetry::increment` uses the intrinsic.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only 64-bit atomic add on bpf"
)]
// `fields::load!`: a load at an offset the loader patches needs the instruction written out.
#![feature(asm_experimental_arch)]

mod broker_pids;
mod fields;
mod processes;
mod records;
mod resources;
mod sockets;
mod state;
mod telemetry;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves no panic path is reachable; this only satisfies the compiler.
    loop {}
}

/// The tracepoint and sock_ops helpers the programs call are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
