//! cargo-fuzz target `frame`: see `pcisim_fuzz::frame` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pcisim_fuzz::frame::run(data));
