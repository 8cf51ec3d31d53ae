//! The tier's tags field `t` (`<byte len>:<tag>` per tag), which the Lua scripts parse:
//! the encoder against a Rust mirror of the scripts' parser. Any bytes: the parser
//! neither panics nor reads past the field, and what it accepts is exactly what the
//! encoder writes for the tags it found (one encoding per tag list). The same bytes
//! split into tags: they encode to a field that parses back to them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_fuzz::parse_tags_like_lua;
use strata_redis::fuzzing::encode_tags;

fuzz_target!(|data: &[u8]| {
    if let Some(tags) = parse_tags_like_lua(data) {
        let utf8: Option<Vec<String>> =
            tags.iter().map(|t| std::str::from_utf8(t).ok().map(str::to_owned)).collect();
        if let Some(tags) = utf8 {
            assert_eq!(encode_tags(&tags).as_bytes(), data, "an accepted field is the encoding of its tags");
        }
    }
    let tags: Vec<String> = String::from_utf8_lossy(data).split('\n').map(str::to_owned).collect();
    let field = encode_tags(&tags);
    let parsed = parse_tags_like_lua(field.as_bytes()).expect("an encoded field parses");
    assert_eq!(parsed, tags.iter().map(|t| t.as_bytes()).collect::<Vec<_>>());
});
