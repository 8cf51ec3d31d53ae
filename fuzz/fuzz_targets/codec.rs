//! strata's default value codec (`PostcardCodec`), the decoder of every value read from
//! L2, on a value type with every length-prefixed serde shape: no panic, no allocation
//! beyond the input, and decode . encode round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata::codec::{Codec, PostcardCodec};
use strata_fuzz::Row;

fuzz_target!(|data: &[u8]| {
    let codec = PostcardCodec::<Row>::default();
    if let Ok(row) = codec.decode(data) {
        let bytes = codec.encode(&row).expect("a decoded value encodes");
        assert_eq!(codec.decode(&bytes).expect("its encoding decodes"), row);
    }
    // Strings and sequences of strings alone, the commonest cached values.
    let _ = PostcardCodec::<Vec<String>>::default().decode(data);
});
