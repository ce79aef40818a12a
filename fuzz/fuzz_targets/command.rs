#![no_main]
// Thin: the target and its invariants are shardmta::fuzzing::command.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shardmta::fuzzing::command(data));
