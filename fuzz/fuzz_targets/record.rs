#![no_main]
// Thin: the target and its invariants are shardmta::fuzzing::record.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shardmta::fuzzing::record(data));
