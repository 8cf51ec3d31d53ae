//! A backplane message as received: a Pub/Sub payload or a stream entry's `m` field
//! (format byte + postcard, the send time last, then the MAC with integrity keys). No
//! panic, no allocation beyond the input; what decodes re-encodes to a message that
//! decodes the same, and seals and opens again under the integrity key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata::backplane::Message;
use strata_redis::fuzzing::{open_backplane_message, seal_backplane_message};

const CHANNEL: &str = "strata:{bp}";

fuzz_target!(|data: &[u8]| {
    let plain = Message::decode(data).ok();
    assert_eq!(open_backplane_message(false, CHANNEL, data), plain, "without keys, opening is decoding");
    if let Some(m) = plain {
        let bytes = m.encode().expect("a decoded message encodes");
        assert_eq!(Message::decode(&bytes).expect("its encoding decodes"), m);
        let sealed = seal_backplane_message(true, CHANNEL, &m).expect("seals");
        assert_eq!(open_backplane_message(true, CHANNEL, &sealed).as_ref(), Some(&m));
        assert_eq!(open_backplane_message(true, "strata:{other}", &sealed), None, "bound to its channel");
    }
    // With keys: only a valid MAC opens (the fuzzer cannot forge one, so this is mostly
    // the parsing of the trailer).
    let _ = open_backplane_message(true, CHANNEL, data);
});
