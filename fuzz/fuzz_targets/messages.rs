//! Arbitrary JSON headers parse into messages or fail cleanly; whatever parses survives a
//! serialise/parse round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sharefs_protocol::{ClientMessage, ServerMessage};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = serde_json::from_slice::<ClientMessage>(data) {
        let text = serde_json::to_vec(&msg).expect("serialise");
        let back: ClientMessage = serde_json::from_slice(&text).expect("reparse");
        assert_eq!(back, msg);
    }
    if let Ok(msg) = serde_json::from_slice::<ServerMessage>(data) {
        let text = serde_json::to_vec(&msg).expect("serialise");
        let back: ServerMessage = serde_json::from_slice(&text).expect("reparse");
        assert_eq!(back, msg);
    }
});
