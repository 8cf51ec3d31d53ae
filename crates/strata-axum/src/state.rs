//! [`AdminState`]: the caches an admin router serves, the token its mutating routes
//! require, the Prometheus handle `/metrics` renders, and the rate limit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use strata::{BuildError, CacheHandle};
use subtle::ConstantTimeEq;

/// The bearer token of the mutating routes. Its `Debug` never shows it.
#[derive(Clone)]
pub struct AdminToken(Arc<[u8]>);

impl AdminToken {
    /// A token; at least 16 bytes (checked by [`AdminStateBuilder::build`]).
    pub fn new(token: impl AsRef<[u8]>) -> Self {
        AdminToken(token.as_ref().into())
    }

    /// Compares in constant time (for equal lengths), so response timing does not
    /// leak how much of a guess was right.
    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        self.0.len() == presented.len() && bool::from(self.0.ct_eq(presented))
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// A token bucket: `burst` calls at once, refilled at `per_second`.
#[derive(Debug)]
pub(crate) struct RateLimit {
    per_second: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    fn new(per_second: f64, burst: u32) -> Self {
        RateLimit {
            per_second,
            burst: f64::from(burst),
            state: Mutex::new((f64::from(burst), Instant::now())),
        }
    }

    /// Takes one call's token; false when there is none (the caller gets a 429).
    pub(crate) fn try_take(&self) -> bool {
        let mut s = self.state.lock();
        let now = Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.per_second).min(self.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What [`router`](crate::router) serves. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AdminState {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) caches: BTreeMap<String, CacheHandle>,
    pub(crate) token: Option<AdminToken>,
    pub(crate) prometheus: Option<PrometheusHandle>,
    pub(crate) limit: RateLimit,
    pub(crate) caller_header: Option<String>,
    pub(crate) started: Instant,
}

impl AdminState {
    /// Starts an empty state: add caches, a token, a Prometheus handle.
    pub fn builder() -> AdminStateBuilder {
        AdminStateBuilder {
            caches: Vec::new(),
            token: None,
            prometheus: None,
            per_second: 5.0,
            burst: 20,
            caller_header: None,
        }
    }
}

/// Builds an [`AdminState`]; see [`AdminState::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until .build()"]
pub struct AdminStateBuilder {
    caches: Vec<CacheHandle>,
    token: Option<AdminToken>,
    prometheus: Option<PrometheusHandle>,
    per_second: f64,
    burst: u32,
    caller_header: Option<String>,
}

impl AdminStateBuilder {
    /// Serves `cache` (from [`Cache::handle`](strata::Cache::handle)) under its namespace.
    pub fn cache(mut self, cache: CacheHandle) -> Self {
        self.caches.push(cache);
        self
    }

    /// The bearer token the mutating routes require. Without one they answer 403:
    /// an admin surface that anyone on the network could use to flush caches is off
    /// until it is protected.
    pub fn token(mut self, token: AdminToken) -> Self {
        self.token = Some(token);
        self
    }

    /// The handle of the Prometheus recorder the application installed
    /// (`PrometheusBuilder::new().install_recorder()`): `/metrics` renders it. Without
    /// one, `/metrics` answers 404.
    pub fn prometheus(mut self, handle: PrometheusHandle) -> Self {
        self.prometheus = Some(handle);
        self
    }

    /// Mutating calls allowed: `burst` at once, refilled at `per_second` (default 5/s,
    /// burst 20); past it, 429.
    pub fn rate_limit(mut self, per_second: f64, burst: u32) -> Self {
        self.per_second = per_second;
        self.burst = burst;
        self
    }

    /// A request header naming the caller in audit lines (e.g. `x-forwarded-user` set
    /// by the proxy in front); the peer address otherwise.
    pub fn caller_header(mut self, name: impl Into<String>) -> Self {
        self.caller_header = Some(name.into().to_ascii_lowercase());
        self
    }

    /// Checks the settings.
    pub fn build(self) -> Result<AdminState, BuildError> {
        let mut caches = BTreeMap::new();
        for c in self.caches {
            let ns = c.namespace().to_owned();
            if caches.insert(ns.clone(), c).is_some() {
                return Err(invalid(
                    "cache",
                    format!("two caches share the namespace {ns:?}"),
                    "register each namespace once",
                ));
            }
        }
        if let Some(t) = &self.token
            && t.0.len() < 16
        {
            return Err(invalid(
                "token",
                format!("is {} bytes", t.0.len()),
                "use a random token of at least 16 bytes",
            ));
        }
        if !(self.per_second > 0.0 && self.per_second.is_finite()) || self.burst == 0 {
            return Err(invalid(
                "rate_limit",
                format!("{}/s with a burst of {}", self.per_second, self.burst),
                "use a positive rate and a burst of at least 1",
            ));
        }
        Ok(AdminState {
            inner: Arc::new(Inner {
                caches,
                token: self.token,
                prometheus: self.prometheus,
                limit: RateLimit::new(self.per_second, self.burst),
                caller_header: self.caller_header,
                started: Instant::now(),
            }),
        })
    }
}

fn invalid(setting: &'static str, problem: String, fix: &str) -> BuildError {
    BuildError { setting, problem, fix: fix.to_owned() }
}

impl Inner {
    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole_and_never_show() {
        let t = AdminToken::new("0123456789abcdef");
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeX"));
        assert!(!t.matches(b"0123456789abcdef0"));
        assert_eq!(format!("{t:?}"), "AdminToken(***)");
    }

    #[test]
    fn the_bucket_empties_and_refills() {
        let l = RateLimit::new(1000.0, 2);
        assert!(l.try_take() && l.try_take());
        assert!(!l.try_take());
        std::thread::sleep(Duration::from_millis(5));
        assert!(l.try_take());
    }
}
