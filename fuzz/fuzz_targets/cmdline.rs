#![no_main]
//! `cargo xtask fuzz cmdline`: see `brokerscope::fuzzing::cmdline` for the input and what is asserted.

libfuzzer_sys::fuzz_target!(|data: &[u8]| brokerscope::fuzzing::cmdline(data));
