#![no_main]
// Thin: the target and its invariants are shardmta::fuzzing::bdat.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shardmta::fuzzing::bdat(data));
