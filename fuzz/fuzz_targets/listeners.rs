#![no_main]
//! `cargo xtask fuzz listeners`: see `brokerscope::fuzzing::listeners` for the input and what is asserted.

libfuzzer_sys::fuzz_target!(|data: &[u8]| brokerscope::fuzzing::listeners(data));
