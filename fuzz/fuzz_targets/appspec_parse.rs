//! The AppSpec parser on arbitrary text: it must answer Ok or a typed error, never panic,
//! and whatever it accepts must be accepted again (parsing is deterministic).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = shoal_agent::appspec::parse(text);
    let again = shoal_agent::appspec::parse(text);
    assert_eq!(first.is_ok(), again.is_ok());
});
