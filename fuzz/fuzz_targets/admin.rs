//! libFuzzer target: see `harness::admin` for the properties checked.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::admin(data));
