//! The harness of `router/monitor/tests/stateful.rs`, under libFuzzer.
#![no_main]

#[path = "../../router/monitor/tests/stateful.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
