#![no_main]
//! `cargo xtask fuzz http`: see `brokerscope::fuzzing::http` for the input and what is asserted.

libfuzzer_sys::fuzz_target!(|data: &[u8]| brokerscope::fuzzing::http(data));
