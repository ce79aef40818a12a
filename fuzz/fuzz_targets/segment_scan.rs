#![no_main]
// Thin: the target and its invariants are shardmta::fuzzing::segment_scan.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shardmta::fuzzing::segment_scan(data));
