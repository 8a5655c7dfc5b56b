//! Spec parsing and validation must never panic, whatever the bytes, and a document that
//! validates must survive a round trip through both JSON forms with the same hash.
#![no_main]

use kiln_spec::{Form, TemplateRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(req) = TemplateRequest::parse_and_validate(&doc) else { return };
    for form in [Form::Wire, Form::Sdk] {
        let back = TemplateRequest::from_json(&req.to_json(form), form).expect("re-decodes");
        assert_eq!(back, req);
        assert_eq!(back.spec_hash(), req.spec_hash());
        back.validate_as(form).expect("still valid");
    }
});
