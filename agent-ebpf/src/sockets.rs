//! TCP sockets of watched listeners: accepts, closes, payload bytes, retransmits, resets, RTT
//! and lifetimes, per (network namespace, local port).
//!
//! Attribution uses the socket itself (its `struct sock`: namespace and local port), never the
//! current task: these tracepoints fire in softirq context on whatever task happens to run.
//! Nothing here runs per packet or per send: bytes come from the socket's own RFC 4898 counters
//! read once, when the connection closes (live connections are read by the loader's iterator).
//!
//! The programs are in [`state_change`] (accepts and closes), [`retransmit_reset`] and
//! [`iterators`] (scrape time); the maps in [`maps`], the connection table in [`tracking`], the
//! watched listeners in [`watch`], connection events in [`events`]. The run-and-count wrapper of
//! every tracepoint stays in this file: its log record names this module and file, as before the
//! split.

use aya_ebpf::EbpfContext;
use aya_log_ebpf::warn;
use brokerscope_common::telemetry::{ProbeError, Program};

use crate::telemetry::{count_error, count_run};

/// `add!(counters, field, n)` or `add!(counters, array[i], n)`: atomic add to a field of a
/// LISTENERS or LISTENERS_AUTO value.
macro_rules! add {
    ($counters:ident, $field:ident $([$i:expr])?, $n:expr) => {
        // SAFETY: `$counters` points to a counters value looked up during this run, and any
        // index was bounds-checked by the caller.
        unsafe { increment(&raw mut (*$counters).$field $([$i])?, $n) }
    };
}

mod events;
mod helpers;
mod iterators;
mod maps;
mod retransmit_reset;
mod socket;
mod state_change;
mod tracking;
mod watch;

#[inline(always)]
fn run<C: EbpfContext>(
    ctx: &C,
    program: Program,
    f: impl FnOnce(&C) -> Result<(), ProbeError>,
) -> u32 {
    count_run(program);
    if let Err(error) = f(ctx) {
        count_error(error);
        // Only failures are logged: the success path must stay cheap. The log ring is bounded,
        // so a storm of failures drops log records, never counts.
        warn!(
            ctx,
            "{}: {} (error kind {})",
            program.name(),
            error.label(),
            error as u32
        );
    }
    0
}
