//! cargo-fuzz target `config`: see `pcisim_fuzz::config` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pcisim_fuzz::config::run(data));
