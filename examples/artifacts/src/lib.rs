//! The example hooks and the test guests, compiled to Wasm by this crate's build script.
//! Tests use the paths; `shoal demo` embeds the bytes so it runs anywhere.

/// One compiled guest.
#[derive(Clone, Copy, Debug)]
pub struct Artifact {
    /// The file stem, e.g. `model_checksum`.
    pub name: &'static str,
    /// Where the build left the `.wasm` file.
    pub path: &'static str,
    /// The `.wasm` file itself.
    pub bytes: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));
