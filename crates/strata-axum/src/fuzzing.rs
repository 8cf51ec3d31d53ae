//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`): the decoder
//! of the admin router's invalidation body, which comes from the network. Not a stable
//! API.

use strata::Scope;

/// Most keys one call may name.
pub const MAX_KEYS: usize = crate::routes::MAX_KEYS;

/// Reads a `POST /caches/{ns}/invalidate` body as the route does: the scope, or the
/// message of its 400 answer.
pub fn parse_invalidate_body(body: &[u8]) -> Result<Scope, String> {
    crate::routes::parse_invalidate_body(body)
}
