#![no_main]
//! `cargo xtask fuzz identity`: see `brokerscope::fuzzing::identity` for the input and what is asserted.

libfuzzer_sys::fuzz_target!(|data: &[u8]| brokerscope::fuzzing::identity(data));
