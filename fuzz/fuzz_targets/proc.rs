#![no_main]
//! `cargo xtask fuzz proc`: see `brokerscope::fuzzing::proc` for the input and what is asserted.

libfuzzer_sys::fuzz_target!(|data: &[u8]| brokerscope::fuzzing::proc(data));
