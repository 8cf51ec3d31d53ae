//! The L2 envelope as stored in Redis (format byte + postcard `Envelope`): decoding
//! hostile bytes never panics nor allocates beyond the input, and what decodes
//! re-encodes to bytes that decode to the same envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_redis::fuzzing::{decode_envelope, encode_envelope};

fuzz_target!(|data: &[u8]| {
    if let Some(env) = decode_envelope(data) {
        let again = encode_envelope(&env).expect("a decoded envelope encodes");
        assert_eq!(decode_envelope(&again).as_ref(), Some(&env), "decode . encode is the identity");
        assert!(again.len() <= data.len(), "the canonical encoding is never longer than what decoded");
    }
});
