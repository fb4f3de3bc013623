//! A tar bundle, the input taken as the archive's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    common::open_file("in.tar", data);
});
