//! A tar.zst bundle: the input is the tar stream, zstd-compressed here (inputs already
//! starting with the zstd magic are used as they are).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        common::open_file("in.tar.zst", data);
        return;
    }
    let compressed = zstd::encode_all(data, 1).unwrap();
    common::open_file("in.tar.zst", &compressed);
});
