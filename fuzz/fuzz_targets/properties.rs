#![no_main]
//! `cargo xtask fuzz properties`: see `brokerscope::fuzzing::properties` for the input and what is asserted.

libfuzzer_sys::fuzz_target!(|data: &[u8]| brokerscope::fuzzing::properties(data));
