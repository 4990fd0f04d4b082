#![no_main]
//! `cargo xtask fuzz config_patch`: see `brokerscope::fuzzing::config_patch` for the input and what is asserted.

libfuzzer_sys::fuzz_target!(|data: &[u8]| brokerscope::fuzzing::config_patch(data));
