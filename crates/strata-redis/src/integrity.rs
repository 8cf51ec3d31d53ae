//! Optional keyed MACs (HMAC-SHA256) on what the tier and the backplanes read back from
//! Redis, for deployments where others can write under the key prefix (a shared Redis).
//!
//! Without integrity keys, whoever can write the prefix can serve arbitrary rows to the
//! fleet (a well-formed entry) or flush it (a forged invalidate-all). With them, a
//! reader accepts only what a holder of one of the keys wrote: a forged or altered
//! entry is a counted miss (deleted), a forged message is ignored and counted as
//! malformed. What a MAC cannot stop (deletes, replays of older signed data) is listed
//! in the crate docs, "Sharing a Redis: integrity keys".
//!
//! Every MAC covers a domain label and length-prefixed parts, so that bytes signed for
//! one purpose, namespace or key never verify for another.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use strata::error::{Error, ErrorKind, Result};

/// Length of a MAC (HMAC-SHA256).
pub(crate) const MAC_LEN: usize = 32;

/// The shortest key accepted: 128 bits.
pub const MIN_INTEGRITY_KEY_BYTES: usize = 16;

/// A secret key for [integrity MACs](crate#sharing-a-redis-integrity-keys). Its `Debug`
/// prints `***`: the bytes never reach a log.
#[derive(Clone)]
pub struct IntegrityKey(Vec<u8>);

impl IntegrityKey {
    /// A key of these bytes: at least [`MIN_INTEGRITY_KEY_BYTES`] random bytes (checked
    /// by the builders' `build`). Every instance sharing the prefix needs the same keys.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        IntegrityKey(bytes.into())
    }
}

impl std::fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IntegrityKey(***)")
    }
}

/// Checked integrity keys: the first signs, every one verifies (key rotation).
#[derive(Clone)]
pub(crate) struct Integrity {
    keys: Vec<Hmac<Sha256>>,
}

impl std::fmt::Debug for Integrity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Integrity({} keys: ***)", self.keys.len())
    }
}

impl Integrity {
    /// Checks `keys` for the builder named `what`: `None` when no keys were set at all.
    pub(crate) fn from_keys(keys: Option<&[IntegrityKey]>, what: &str) -> Result<Option<Self>> {
        let Some(keys) = keys else { return Ok(None) };
        let invalid = |msg: String| Err(Error::new(ErrorKind::InvalidInput, msg));
        if keys.is_empty() {
            return invalid(format!(
                "{what}: integrity_keys is empty; give at least one key (the first signs, all \
                 verify), or do not call integrity_keys"
            ));
        }
        let mut out = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            if k.0.len() < MIN_INTEGRITY_KEY_BYTES {
                return invalid(format!(
                    "{what}: integrity key #{i} is {} bytes; an integrity key must be at least \
                     {MIN_INTEGRITY_KEY_BYTES} bytes (use 32 random bytes)",
                    k.0.len()
                ));
            }
            match Hmac::<Sha256>::new_from_slice(&k.0) {
                Ok(mac) => out.push(mac),
                Err(_) => return invalid(format!("{what}: integrity key #{i} is not usable as an HMAC key")),
            }
        }
        Ok(Some(Integrity { keys: out }))
    }

    fn mac_with(key: &Hmac<Sha256>, domain: &str, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = key.clone();
        mac.update(&(domain.len() as u64).to_be_bytes());
        mac.update(domain.as_bytes());
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac
    }

    /// The MAC of `parts` under `domain`, with the signing (first) key.
    pub(crate) fn sign(&self, domain: &str, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        // `keys` is never empty (checked in `from_keys`).
        let Some(key) = self.keys.first() else { return [0; MAC_LEN] };
        Self::mac_with(key, domain, parts).finalize().into_bytes().into()
    }

    /// Whether `mac` is the MAC of `parts` under `domain` for one of the keys (compared
    /// in constant time).
    pub(crate) fn verify(&self, domain: &str, parts: &[&[u8]], mac: &[u8]) -> bool {
        mac.len() == MAC_LEN
            && self.keys.iter().any(|k| Self::mac_with(k, domain, parts).verify_slice(mac).is_ok())
    }

    /// `payload` followed by its MAC (bound to `domain` and `context`).
    pub(crate) fn seal(&self, domain: &str, context: &[u8], payload: &[u8]) -> Vec<u8> {
        let mac = self.sign(domain, &[context, payload]);
        let mut out = Vec::with_capacity(payload.len() + MAC_LEN);
        out.extend_from_slice(payload);
        out.extend_from_slice(&mac);
        out
    }

    /// The payload of `sealed` if its trailing MAC verifies, else `None`.
    pub(crate) fn open<'a>(&self, domain: &str, context: &[u8], sealed: &'a [u8]) -> Option<&'a [u8]> {
        let split = sealed.len().checked_sub(MAC_LEN)?;
        let (payload, mac) = sealed.split_at(split);
        self.verify(domain, &[context, payload], mac).then_some(payload)
    }
}

/// Seals `payload` when integrity is on; the bytes as they are otherwise.
pub(crate) fn seal_opt(
    integrity: Option<&Integrity>,
    domain: &str,
    context: &[u8],
    payload: Vec<u8>,
) -> Vec<u8> {
    match integrity {
        Some(i) => i.seal(domain, context, &payload),
        None => payload,
    }
}

/// Opens `sealed` when integrity is on (`None`: no valid MAC); the bytes as they are
/// otherwise.
pub(crate) fn open_opt<'a>(
    integrity: Option<&Integrity>,
    domain: &str,
    context: &[u8],
    sealed: &'a [u8],
) -> Option<&'a [u8]> {
    match integrity {
        Some(i) => i.open(domain, context, sealed),
        None => Some(sealed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&[u8]]) -> Integrity {
        let keys: Vec<IntegrityKey> = k.iter().map(|b| IntegrityKey::new(b.to_vec())).collect();
        Integrity::from_keys(Some(&keys), "test").unwrap().unwrap()
    }

    #[test]
    fn short_or_no_keys_are_refused_and_debug_hides_the_bytes() {
        let short = [IntegrityKey::new(b"0123456789abcde".to_vec())];
        let err = Integrity::from_keys(Some(&short), "redis tier").unwrap_err().to_string();
        assert!(err.contains("at least 16 bytes"), "{err}");
        assert!(Integrity::from_keys(Some(&[]), "x").is_err());
        assert!(Integrity::from_keys(None, "x").unwrap().is_none());
        let k = IntegrityKey::new(b"super secret key material".to_vec());
        assert_eq!(format!("{k:?}"), "IntegrityKey(***)");
        assert!(!format!("{:?}", keys(&[b"super secret key material"])).contains("secret"));
    }

    #[test]
    fn seal_open_binds_domain_context_and_bytes_and_rotation_verifies_old_keys() {
        let old = keys(&[b"old key 0123456789"]);
        let rotated = keys(&[b"new key 0123456789", b"old key 0123456789"]);
        let sealed = old.seal("msg", b"chan", b"payload");
        assert_eq!(old.open("msg", b"chan", &sealed), Some(&b"payload"[..]));
        assert_eq!(rotated.open("msg", b"chan", &sealed), Some(&b"payload"[..]), "old key verifies");
        let new = rotated.seal("msg", b"chan", b"payload");
        assert_eq!(old.open("msg", b"chan", &new), None, "the new key signs");
        assert_eq!(old.open("msg", b"other", &sealed), None);
        assert_eq!(old.open("entry", b"chan", &sealed), None);
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert_eq!(old.open("msg", b"chan", &flipped), None);
        assert_eq!(old.open("msg", b"chan", b"short"), None);
        // Length prefixes: moving bytes between parts changes the MAC.
        assert_ne!(old.sign("d", &[b"ab", b"c"]), old.sign("d", &[b"a", b"bc"]));
    }
}
