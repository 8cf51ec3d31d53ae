//! The tier's reading of its scripts' replies (RESP, through the client's parser): the
//! lookup reply (hits and stale entries: envelope bytes, the stamp and expiries as
//! decimal fields, the tags field, the MAC) opened without and with integrity keys, and
//! the `{result, repaired, corrupt}` reply of the other scripts. The first byte is the
//! number of answers expected.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_redis::fuzzing::{Answer, lookup_reply, script_reply};

fuzz_target!(|data: &[u8]| {
    let Some((&expected, resp)) = data.split_first() else { return };
    let Ok(v) = redis::parse_redis_value(resp) else { return };
    if let Some((answers, _repaired)) = lookup_reply(&v, usize::from(expected % 8), "strata:{ns}:e:k") {
        assert_eq!(answers.len(), usize::from(expected % 8));
        for a in &answers {
            let (env, signed) = match a {
                Answer::Hit(env, signed) => (env, *signed),
                Answer::Miss(Some((env, signed))) => (env, *signed),
                Answer::Miss(None) => continue,
            };
            // What verifies with a key also decodes without one.
            assert!(!signed || env.is_some(), "a signed entry that does not decode");
        }
    }
    let _ = script_reply(&v);
});
