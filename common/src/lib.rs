//! Types both sides of the kernel boundary agree on, and the kernel logic that can be pure.
//!
//! Everything here is `#![no_std]`, `#[repr(C)]`, `Copy`, padded explicitly and free of `bool`,
//! so the eBPF programs (agent-ebpf) and the loader (agent) see the same bytes. Logic that the
//! kernel programs run but that needs no kernel (classifying a TCP state change, sizing maps) lives
//! here so it is unit-tested on the host.
//!
//! Module names follow the hook families: `sockets` is `agent-ebpf/src/sockets.rs`,
//! `agent/src/probes/sockets.rs` and `tests/tests/sockets.rs`.
#![no_std]
#![cfg_attr(not(feature = "user"), forbid(unsafe_code))]

pub mod fields;
pub mod processes;
pub mod records;
pub mod resources;
pub mod sockets;
pub mod state;
pub mod telemetry;
