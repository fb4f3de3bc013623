//! A tar.gz bundle: the input is the tar stream, gzip-compressed here, so the fuzzer
//! explores tar headers behind the gzip decoder rather than deflate's own checks. Inputs
//! already gzip-compressed (starting with the gzip magic) are used as they are.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if data.starts_with(&[0x1f, 0x8b]) {
        common::open_file("in.tar.gz", data);
        return;
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    common::open_file("in.tar.gz", &gz.finish().unwrap());
});
