//! The harness of `agents/tests/stateful.rs`, under libFuzzer.
#![no_main]

#[path = "../../agents/tests/stateful.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
