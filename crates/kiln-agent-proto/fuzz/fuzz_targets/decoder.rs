//! Arbitrary bytes, fed in arbitrary splits, must never panic the decoder, never yield
//! a payload above the limit, and control payloads must be safe to parse as messages.
#![no_main]

use kiln_agent_proto::{DecodeEvent, Decoder, FrameKind, HostMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(split).max(1);
    let mut d = Decoder::new_hunting(4096);
    for (i, chunk) in rest.chunks(step).enumerate() {
        d.push(chunk);
        while let Some(ev) = d.next_event() {
            if let DecodeEvent::Frame(f) = ev {
                assert!(f.payload.len() <= 4096);
                if f.kind == FrameKind::Control {
                    let _ = serde_json::from_slice::<HostMsg>(&f.payload);
                }
            }
        }
        if i % 7 == 3 {
            d.expire_partial();
        }
    }
});
