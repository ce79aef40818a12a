#![no_main]
// Thin: the target and its invariants are shardmta::fuzzing::dns_answer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shardmta::fuzzing::dns_answer(data));
