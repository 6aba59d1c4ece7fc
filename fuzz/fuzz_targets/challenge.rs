#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| harbor_router::fuzz_targets::challenge(data));
