#![no_main]
// Thin: the target and its invariants are shardmta::fuzzing::data.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shardmta::fuzzing::data(data));
