//! cargo-fuzz target `gpu_ring`: see `pcisim_fuzz::gpu_ring` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pcisim_fuzz::gpu_ring::run(data));
