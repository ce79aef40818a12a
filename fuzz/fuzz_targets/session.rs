#![no_main]
// Thin: the target and its invariants are shardmta::fuzzing::session.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shardmta::fuzzing::session(data));
