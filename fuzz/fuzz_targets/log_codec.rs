#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| statsremote::fuzzing::log_codec(data));
