//! The harness of `router/tunnel/tests/stateful.rs`, under libFuzzer.
#![no_main]

#[path = "../../router/tunnel/tests/stateful.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
