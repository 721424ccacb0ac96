//! The harness of `central-unit/tests/pmon_stateful.rs`, under libFuzzer.
#![no_main]

#[path = "../../central-unit/tests/pmon_stateful.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
