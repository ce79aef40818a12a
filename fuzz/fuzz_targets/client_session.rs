#![no_main]
// Thin: the target and its invariants are shardmta::fuzzing::client_session.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shardmta::fuzzing::client_session(data));
