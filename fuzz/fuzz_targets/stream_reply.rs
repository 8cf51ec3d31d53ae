//! The stream backplane's reading of Redis replies (RESP, through the client's parser):
//! `XREAD` (RESP2 arrays and RESP3 maps), entries `[[id, [field, value, …]], …]` with
//! their `m` (message) and `n` (number) fields, the messages in them, stream ids, the
//! publish script's repair report, and the pushes of push delivery
//! (`<id>\n<number>\n<message>`, any bytes anyone allowed to `PUBLISH` chooses). The
//! first byte picks the reading.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_redis::fuzzing::{
    open_backplane_message, push_entry, stream_entries, stream_id, stream_publish_repairs, xread,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 8 != 0 {
        // A push: what parses has an id that parses, and its message is opened as the
        // reader opens it.
        if let Some((id, message, _number)) = push_entry(rest) {
            assert!(stream_id(&id).is_some(), "a pushed entry's id parses");
            let _ = open_backplane_message(mode & 4 != 0, "strata:{bp}", &message.unwrap_or_default());
        }
        return;
    }
    if mode % 4 == 3 {
        // A stream id alone: what parses displays as an id that parses to itself.
        if let Some((shown, next, prev)) = std::str::from_utf8(rest).ok().and_then(stream_id) {
            assert_eq!(stream_id(&shown).map(|s| s.0), Some(shown.clone()));
            for id in next.iter().chain(prev.iter()) {
                assert!(stream_id(id).is_some(), "a neighbour id {id} parses");
            }
        }
        return;
    }
    let Ok(v) = redis::parse_redis_value(rest) else { return };
    let entries = match mode % 4 {
        0 => xread(&v),
        1 => stream_entries(&v),
        _ => {
            let _ = stream_publish_repairs(&v);
            return;
        }
    };
    for (id, message, _number) in entries.into_iter().flatten() {
        assert!(stream_id(&id).is_some(), "an entry's id parses");
        if let Some(m) = message {
            let _ = open_backplane_message(mode & 4 != 0, "strata:{bp}", &m);
        }
    }
});
