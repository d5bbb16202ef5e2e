//! Stored events come from a stream anyone with publish rights could write to: decoding any
//! bytes as any event type must return an error, never panic; and whatever decodes must render.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parley_schemas::cloudevent::decode;
use parley_schemas::{ChatEvent, ReceiptEvent, UserEvent};

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = decode::<ChatEvent>(data) {
        let _ = parley_schemas::frames::render(&ev);
    }
    let _ = decode::<UserEvent>(data);
    let _ = decode::<ReceiptEvent>(data);
});
