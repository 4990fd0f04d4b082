#![no_main]
//! `cargo xtask fuzz config_file`: see `brokerscope::fuzzing::config_file` for the input and what is asserted.

libfuzzer_sys::fuzz_target!(|data: &[u8]| brokerscope::fuzzing::config_file(data));
