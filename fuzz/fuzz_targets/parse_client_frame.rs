//! Client frames are hostile input: parsing any text must return an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parley_schemas::frames::ClientFrame;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = serde_json::from_str::<ClientFrame>(text);
    }
});
