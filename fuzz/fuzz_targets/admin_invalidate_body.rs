//! The admin router's `POST /caches/{ns}/invalidate` body, as it arrives from the
//! network. No panic; what is accepted names exactly one non-empty scope within the key
//! limit, and reading it back from its own JSON gives the same scope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata::Scope;
use strata_axum::fuzzing::{MAX_KEYS, parse_invalidate_body};

fuzz_target!(|data: &[u8]| {
    let Ok(scope) = parse_invalidate_body(data) else { return };
    let again = match &scope {
        Scope::Keys(keys) => {
            assert!(!keys.is_empty() && keys.len() <= MAX_KEYS, "{} keys accepted", keys.len());
            serde_json::json!({ "keys": keys })
        }
        Scope::Tag(tag) => {
            assert!(!tag.is_empty(), "an empty tag accepted");
            serde_json::json!({ "tag": tag })
        }
        Scope::All => serde_json::json!({ "all": true }),
    };
    let bytes = serde_json::to_vec(&again).expect("a scope encodes");
    assert_eq!(parse_invalidate_body(&bytes).ok(), Some(scope), "the scope reads back the same");
});
