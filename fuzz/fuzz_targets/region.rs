//! cargo-fuzz target `region`: see `pcisim_fuzz::region` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pcisim_fuzz::region::run(data));
