//! How values are turned into bytes for the L2 tier.

use std::marker::PhantomData;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind, Result};

/// Encodes and decodes values stored in the L2 tier.
pub trait Codec<V>: Send + Sync + 'static {
    /// Encodes a value.
    fn encode(&self, value: &V) -> Result<Bytes>;
    /// Decodes a value; an error makes the L2 entry a miss (it is evicted and counted).
    fn decode(&self, bytes: &[u8]) -> Result<V>;

    /// Names the byte format. It is part of the [schema fingerprint](crate::schema)
    /// every L2 entry carries, so caches whose codecs differ never decode each other's
    /// entries: keep it stable, and change it when the bytes written change. Default:
    /// the codec's Rust type name (which moves with the type: override it).
    fn name(&self) -> &str {
        std::any::type_name::<Self>()
    }
}

/// The default codec: postcard, compact and fast, for values only Rust reads.
pub struct PostcardCodec<V>(PhantomData<fn() -> V>);

impl<V> Default for PostcardCodec<V> {
    fn default() -> Self {
        PostcardCodec(PhantomData)
    }
}

impl<V: Serialize + DeserializeOwned + 'static> Codec<V> for PostcardCodec<V> {
    fn encode(&self, value: &V) -> Result<Bytes> {
        postcard::to_stdvec(value)
            .map(Bytes::from)
            .map_err(|e| Error::new(ErrorKind::Codec, "cannot encode value with postcard").with_source(e))
    }

    fn decode(&self, bytes: &[u8]) -> Result<V> {
        postcard::from_bytes(bytes)
            .map_err(|e| Error::new(ErrorKind::Codec, "cannot decode value with postcard").with_source(e))
    }

    fn name(&self) -> &str {
        "postcard-1"
    }
}
