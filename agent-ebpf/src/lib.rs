//! Empty host-side library: lets the agent name this crate as a build-dependency so cargo rebuilds
//! the agent when the kernel programs change. The programs themselves are in `main.rs`.
#![no_std]
