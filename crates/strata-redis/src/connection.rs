//! Connections to Redis: the settings every builder shares ([`ConnectionOptions`]),
//! opening clients from URLs (passwords redacted from every message), mapping redis-rs
//! errors into strata's, reconnect backoff, and [`ManagedConn`], the self-replacing
//! connection of the tier and of the backplanes' publishers.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use rand::Rng;
use redis::RedisError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use strata::error::{Error, ErrorKind};

use crate::tls::TlsConfig;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "strata";

/// Default timeout of each connection attempt.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The connection settings shared by [`RedisTier`](crate::RedisTier),
/// [`RedisStreamBackplane`](crate::RedisStreamBackplane) and
/// [`RedisPubSubBackplane`](crate::RedisPubSubBackplane).
///
/// Each builder holds one and its setters (`prefix`, `connect_timeout`, `tls`, `lazy`)
/// write into it; [`RedisTierBuilder::connection`](crate::RedisTierBuilder::connection)
/// and the backplane builders' `connection` replace it whole, so one value configured
/// once can be handed to the tier and to the backplane of an application.
///
/// Timeouts of calls are not here: their meaning differs per component (a response
/// timeout for the tier, a publish timeout for the backplanes), so each builder keeps
/// its own `op_timeout`.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionOptions {
    /// `redis://[user:password@]host[:port][/db]` (user and password are ACL
    /// credentials, percent-encoded), or `rediss://…` for TLS (the `tls` feature).
    pub url: String,
    /// Prefix of every key and channel (default `strata`): components with different
    /// prefixes on one server never see each other's data. Non-empty, without braces
    /// or whitespace.
    pub prefix: String,
    /// Timeout of each connection attempt (default 1 s).
    pub connect_timeout: Duration,
    /// Certificates for a `rediss://` URL (a private CA, a client certificate); `None`
    /// verifies the server against the system's root certificates.
    pub tls: Option<TlsConfig>,
    /// Do not contact the server in `build` (default `false`: `build` sends a `PING` and
    /// fails if the server is unreachable or refuses the credentials).
    pub lazy: bool,
}

impl ConnectionOptions {
    /// Settings for `url` with every other field at its default.
    pub fn new(url: impl Into<String>) -> Self {
        ConnectionOptions {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls: None,
            lazy: false,
        }
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Checks the prefix and the connect timeout; `what` names the component in errors.
    pub(crate) fn check(&self, what: &str) -> Result<(), Error> {
        let prefix = &self.prefix;
        if prefix.is_empty()
            || prefix.chars().any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{what}: prefix `{prefix}` is invalid; use a non-empty name without \
                     braces or whitespace, such as `strata` or `myapp-cache`"
                ),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{what}: connect_timeout is zero; use for example 1s"),
            ));
        }
        Ok(())
    }

    /// Opens a redis-rs client for the URL, with an error that says how to fix a bad one.
    pub(crate) fn open_client(&self, what: &str) -> Result<redis::Client, Error> {
        open_client(&self.url, what, self.tls.as_ref())
    }
}

impl std::fmt::Debug for ConnectionOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionOptions")
            .field("url", &self.redacted_url())
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .field("lazy", &self.lazy)
            .finish()
    }
}

/// The URL with any password replaced by `***`, safe for error messages and logs.
pub(crate) fn redact_url(url: &str) -> String {
    // scheme://[user[:password]@]host...
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_owned(),
    }
}

fn bad_url(what: &str, shown: &str, e: RedisError) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "{what}: cannot use Redis URL `{shown}`; write it as \
             redis://[user:password@]host[:port][/db] (rediss:// for TLS), \
             with user and password percent-encoded"
        ),
    )
    .with_source(e)
}

/// Opens a redis-rs client for `url`, with an error that says how to fix a bad URL.
fn open_client(url: &str, what: &str, tls: Option<&TlsConfig>) -> Result<redis::Client, Error> {
    let shown = redact_url(url);
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    match scheme {
        "redis" | "redis+unix" | "unix" => {
            if tls.is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "{what}: TLS settings were given but `{shown}` is not a rediss:// URL; use rediss://"
                    ),
                ));
            }
            redis::Client::open(url).map_err(|e| bad_url(what, &shown, e))
        }
        "rediss" => open_tls(url, what, &shown, tls),
        _ => Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{what}: `{shown}` is not a Redis URL; use \
                 redis://[user:password@]host[:port][/db] (or rediss:// for TLS)"
            ),
        )),
    }
}

#[cfg(feature = "tls")]
fn open_tls(url: &str, what: &str, shown: &str, tls: Option<&TlsConfig>) -> Result<redis::Client, Error> {
    crate::tls::install_crypto_provider();
    match tls {
        None => redis::Client::open(url),
        Some(t) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: t.client_auth_pem.as_ref().map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
                root_cert: t.root_cert_pem.clone(),
            },
        ),
    }
    .map_err(|e| bad_url(what, shown, e))
}

#[cfg(not(feature = "tls"))]
fn open_tls(_url: &str, what: &str, shown: &str, _tls: Option<&TlsConfig>) -> Result<redis::Client, Error> {
    Err(Error::new(
        ErrorKind::InvalidInput,
        format!(
            "{what}: `{shown}` asks for TLS but strata-redis was built without TLS; \
             enable the `tls` feature of strata-redis (on by default) or use redis://"
        ),
    ))
}

/// Maps a redis-rs error: timeouts become [`ErrorKind::Timeout`], everything else `kind`.
pub(crate) fn map_redis_error(kind: ErrorKind, what: &str, e: RedisError) -> Error {
    if e.is_timeout() {
        Error::new(ErrorKind::Timeout, format!("{what}: redis timed out")).with_source(e)
    } else {
        Error::new(kind, format!("{what} failed")).with_source(e)
    }
}

/// Exponential backoff with full jitter for reconnect loops.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max, attempt: 0 }
    }

    /// The delay before the next attempt (grows until `max`, randomised in [d/2, d]).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let factor = 1u32 << self.attempt.min(16);
        self.attempt = self.attempt.saturating_add(1);
        let d = self.min.saturating_mul(factor).min(self.max);
        let half = d / 2;
        half + d.mul_f64(rand::rng().random_range(0.0..=0.5))
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Checks a builder's reconnect backoff bounds (`0 < min <= max`).
    pub(crate) fn check(what: &str, min: Duration, max: Duration) -> Result<(), Error> {
        if min.is_zero() || max < min {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{what}: reconnect_backoff needs 0 < min <= max (default 20ms..1s)"),
            ));
        }
        Ok(())
    }
}

/// A [`ConnectionManager`] that is replaced by a fresh one after repeated timeouts:
/// a connection to a peer that vanished without a reset (a paused server, a dropped
/// network path) never reports an error by itself.
///
/// A call its caller abandons before Redis answered (its future dropped, as the cache
/// does at its `l2_timeout`) counts like a timeout: the cache gives up long before the
/// tier's response timeout, so without this a connection that stopped answering would
/// never be replaced while a cache uses the tier.
pub(crate) struct ManagedConn {
    client: redis::Client,
    config: ConnectionManagerConfig,
    conn: RwLock<ConnectionManager>,
    shown_url: String,
    consecutive_timeouts: AtomicU32,
    reconnect_after: u32,
    reconnects: AtomicU64,
    abandoned: AtomicU64,
}

/// How a [`ManagedConn::call`] ended, for the caller's counters.
pub(crate) enum CallError {
    /// The call did not finish within its timeout.
    Timeout(Error),
    /// Redis or the connection returned an error.
    Failed(Error),
}

impl CallError {
    pub(crate) fn into_error(self) -> Error {
        match self {
            CallError::Timeout(e) | CallError::Failed(e) => e,
        }
    }
}

/// Notes a call as abandoned when dropped before [`InFlight::finish`].
struct InFlight<'a> {
    conn: &'a ManagedConn,
    what: &'a str,
    finished: bool,
}

impl InFlight<'_> {
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.abandoned.fetch_add(1, Ordering::Relaxed);
            self.conn.note_timeout(self.what);
        }
    }
}

impl ManagedConn {
    /// A lazy connection to `options.url` through `client` (opened from the same
    /// options): nothing is sent before the first call.
    pub(crate) fn new(
        client: redis::Client,
        options: &ConnectionOptions,
        reconnect_after: u32,
        what: &str,
    ) -> Result<Self, Error> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(None)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(500))
            .set_number_of_retries(3);
        let shown_url = options.redacted_url();
        let conn = Self::manager(&client, &config, &shown_url, what)?;
        Ok(ManagedConn {
            client,
            config,
            conn: RwLock::new(conn),
            shown_url,
            consecutive_timeouts: AtomicU32::new(0),
            reconnect_after: reconnect_after.max(1),
            reconnects: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
        })
    }

    fn manager(
        client: &redis::Client,
        config: &ConnectionManagerConfig,
        shown: &str,
        what: &str,
    ) -> Result<ConnectionManager, Error> {
        ConnectionManager::new_lazy_with_config(client.clone(), config.clone()).map_err(|e| {
            Error::new(ErrorKind::InvalidInput, format!("{what}: cannot set up a connection to `{shown}`"))
                .with_source(e)
        })
    }

    /// The URL with the password redacted.
    pub(crate) fn shown_url(&self) -> &str {
        &self.shown_url
    }

    /// A handle to the current connection.
    pub(crate) fn get(&self) -> ConnectionManager {
        self.conn.read().clone()
    }

    /// How many times the connection was replaced.
    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// How many calls were abandoned by their caller before Redis answered.
    pub(crate) fn abandoned(&self) -> u64 {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// Runs `f` on the connection with `timeout`; errors are mapped to `kind`.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        timeout: Duration,
        kind: ErrorKind,
        what: &'static str,
        f: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let in_flight = InFlight { conn: self, what, finished: false };
        let out = tokio::time::timeout(timeout, f(self.get())).await;
        in_flight.finish();
        match out {
            Ok(Ok(v)) => {
                self.consecutive_timeouts.store(0, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => Err(CallError::Failed(map_redis_error(kind, what, e))),
            Err(_) => {
                self.note_timeout(what);
                Err(CallError::Timeout(Error::timeout(what, timeout)))
            }
        }
    }

    fn note_timeout(&self, what: &str) {
        let n = self.consecutive_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        // A new manager spawns a task, which needs a runtime; a call dropped outside one
        // (a runtime shutting down) leaves the replacement to the next timeout.
        if n >= self.reconnect_after && tokio::runtime::Handle::try_current().is_ok() {
            self.consecutive_timeouts.store(0, Ordering::Relaxed);
            if let Ok(m) = Self::manager(&self.client, &self.config, &self.shown_url, what) {
                *self.conn.write() = m;
                self.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    url = %self.shown_url,
                    "{what}: replacing the redis connection after {n} consecutive timeouts"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("redis://alice:s3cret@host:6379/0"), "redis://alice:***@host:6379/0");
        assert_eq!(redact_url("redis://:pw@host"), "redis://:***@host");
        assert_eq!(redact_url("redis://host:1/2"), "redis://host:1/2");
        assert_eq!(redact_url("rediss://bob@h"), "rediss://bob@h");
    }

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(100));
        }
    }
}
