//! cargo-fuzz target `npu_queue`: see `pcisim_fuzz::npu_queue` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pcisim_fuzz::npu_queue::run(data));
