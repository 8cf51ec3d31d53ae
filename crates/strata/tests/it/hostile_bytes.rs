//! The decoders of bytes other processes wrote (backplane messages, L2 envelopes, values
//! through the default codec) fed length prefixes that claim gigabytes: each fails on
//! the missing bytes and allocates at most serde's cautious preallocation (1 MiB),
//! never the claim. The fuzz targets in `fuzz/` search the same decoders more widely.

use std::collections::BTreeMap;

use strata::backplane::Message;
use strata::codec::{Codec, PostcardCodec};
use strata::tier::Envelope;
use strata_testkit::alloc::largest_allocation;

/// serde's cap on what a sequence's length claim preallocates.
const MAX_PREALLOC: usize = 1 << 20;

/// A postcard varint.
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

const CLAIMS: [u64; 3] = [1 << 32, 1 << 40, u64::MAX];

#[test]
fn backplane_message_claiming_gigabytes_allocates_at_most_a_mebibyte() {
    // Format 2, origin 7, seq 1, namespace "ns", Invalidate(Keys([…])).
    let head = |ns_len: u64, keys: u64| {
        cat(&[&[2, 7, 1], &varint(ns_len), b"ns", &[0, 0], &varint(keys), &[1, b'k']])
    };
    let ok = Message::decode(&head(2, 1)).expect("the well-formed message decodes");
    assert_eq!(ok.namespace, "ns");
    for claim in CLAIMS {
        for bytes in [head(2, claim), head(claim, 1)] {
            let (res, largest) = largest_allocation(|| Message::decode(&bytes));
            assert!(res.is_err(), "a claim of {claim} with no bytes behind it decodes");
            assert!(largest <= MAX_PREALLOC, "claim {claim}: allocated {largest} bytes");
        }
    }
}

#[test]
fn envelope_claiming_gigabytes_allocates_at_most_a_mebibyte() {
    // value None, version None, created, soft, hard, stamp, tags ["t"], load, schema.
    let ok = postcard::from_bytes::<Envelope>(&[0, 0, 1, 2, 3, 4, 1, 1, b't', 5, 6]).expect("decodes");
    assert_eq!((ok.tags, ok.schema), (vec!["t".to_owned()], 6));
    // value Some(<len> bytes), then what would follow.
    for claim in CLAIMS {
        let value = cat(&[&[1], &varint(claim), b"abc"]);
        let (res, largest) = largest_allocation(|| postcard::from_bytes::<Envelope>(&value));
        assert!(res.is_err());
        assert!(largest <= MAX_PREALLOC, "value claim {claim}: allocated {largest} bytes");
        // value None, version None, created, soft, hard, stamp, then the tag count.
        let tags = cat(&[&[0, 0, 1, 2, 3, 4], &varint(claim), &[1, b't']]);
        let (res, largest) = largest_allocation(|| postcard::from_bytes::<Envelope>(&tags));
        assert!(res.is_err());
        assert!(largest <= MAX_PREALLOC, "tags claim {claim}: allocated {largest} bytes");
    }
}

#[test]
fn default_codec_claiming_gigabytes_allocates_at_most_a_mebibyte() {
    fn check<V: serde::Serialize + serde::de::DeserializeOwned + 'static>(claim: u64) {
        let codec = PostcardCodec::<V>::default();
        let bytes = cat(&[&varint(claim), b"abcd"]);
        let (res, largest) = largest_allocation(|| codec.decode(&bytes));
        assert!(res.is_err(), "{}: a claim of {claim} decodes", std::any::type_name::<V>());
        assert!(largest <= MAX_PREALLOC, "{}: claim {claim} allocated {largest}", std::any::type_name::<V>());
    }
    for claim in CLAIMS {
        check::<String>(claim);
        check::<Vec<u8>>(claim);
        check::<bytes::Bytes>(claim);
        check::<Vec<String>>(claim);
        check::<Vec<(u64, u64)>>(claim);
        check::<BTreeMap<String, String>>(claim);
    }
}

#[test]
fn the_allocation_probe_sees_allocations() {
    let (v, largest) = largest_allocation(|| Vec::<u8>::with_capacity(3 << 20));
    assert_eq!(v.capacity(), 3 << 20);
    assert!(largest >= 3 << 20, "is PeakAlloc the global allocator? saw {largest}");
}
