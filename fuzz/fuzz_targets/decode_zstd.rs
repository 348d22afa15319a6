#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| statsremote::fuzzing::decode_zstd(data));
