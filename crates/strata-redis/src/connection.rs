//! Connections to Redis: the settings every builder shares ([`ConnectionOptions`]),
//! opening clients from URLs (passwords redacted from every message), mapping redis-rs
//! errors into strata's, and reconnect backoff. The connection calls go through is in
//! `cluster` (one server or a Redis Cluster) and `managed` (the self-replacing one).

use std::time::Duration;

use rand::Rng;
use redis::RedisError;
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
    /// The seed nodes of a Redis Cluster (URLs as for `url`, with the same credentials
    /// and TLS mode), from which the cluster's topology is discovered; empty (the
    /// default) for one server at `url`. [`ConnectionOptions::cluster`] sets it, and
    /// `url` to the first node (shown in messages).
    pub cluster_nodes: Vec<String>,
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
            cluster_nodes: Vec::new(),
        }
    }

    /// Settings for a Redis Cluster reached through `nodes` (one or more of its nodes;
    /// the rest is discovered), with every other field at its default.
    pub fn cluster(nodes: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let cluster_nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        let mut options = Self::new(cluster_nodes.first().cloned().unwrap_or_default());
        options.cluster_nodes = cluster_nodes;
        options
    }

    /// Whether these settings address a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }

    /// The URL with its password, and anything else that may be secret, replaced by
    /// `***`: safe to print, whatever the URL's form (an unencoded `/ ? # @ :` in the
    /// password, a password without user, a unix socket's `pass=`, text that is not a
    /// URL at all).
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
        if self.url.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{what}: no Redis URL given; use redis://host:port (for a Redis Cluster, \
                     the URL of at least one of its nodes)"
                ),
            ));
        }
        Ok(())
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
            .field("cluster_nodes", &self.cluster_nodes.iter().map(|u| redact_url(u)).collect::<Vec<_>>())
            .finish()
    }
}

/// The URL with anything that may be a secret replaced by `***`, safe for error
/// messages and logs. It errs on the side of hiding: a password may hold unencoded
/// `/ ? # @ :`, so the userinfo runs to the *last* `@`; its user is shown only beside a
/// password and when it looks like a user name (a lone userinfo may be a password
/// written without its colon); a non-numeric port, the values of query parameters
/// named like a password (redis-rs's `pass=` of unix sockets, `password=`) and what
/// follows them are hidden; and text that is not `scheme://…` is hidden whole.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return if url.is_empty() { String::new() } else { "***".to_owned() };
    };
    let is_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !is_scheme {
        return "***".to_owned();
    }
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => {
            let user = match rest[..at].split_once(':') {
                Some((user, _))
                    if user.chars().all(|c| c.is_ascii_alphanumeric() || "-_.~%+".contains(c)) =>
                {
                    format!("{user}:***@")
                }
                _ => "***@".to_owned(),
            };
            (user, &rest[at + 1..])
        }
        None => (String::new(), rest),
    };
    format!("{scheme}://{userinfo}{}", redact_host_and_rest(after))
}

/// `host[:port][/path][?query][#fragment]` with a non-numeric port (and all after it)
/// and secret query values (and all after them) hidden.
fn redact_host_and_rest(s: &str) -> String {
    let end = s.find(['/', '?', '#']).unwrap_or(s.len());
    let (authority, tail) = s.split_at(end);
    // The port follows the first `:` past an IPv6 literal's brackets.
    let host_end = authority.find(']').map_or(0, |i| i + 1);
    if let Some(colon) = authority[host_end..].find(':').map(|i| host_end + i)
        && !authority[colon + 1..].chars().all(|c| c.is_ascii_digit())
    {
        return format!("{}:***", &authority[..colon]);
    }
    let Some(q) = tail.find('?') else { return s.to_owned() };
    let mut out = format!("{authority}{}", &tail[..=q]);
    for (i, pair) in tail[q + 1..].split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let key = pair.split_once('=').map_or(pair, |(k, _)| k).to_ascii_lowercase();
        if ["pass", "secret", "token"].iter().any(|w| key.contains(w)) {
            out.push_str(&format!("{}=***", pair.split_once('=').map_or(pair, |(k, _)| k)));
            return out;
        }
        out.push_str(pair);
    }
    out
}

pub(crate) fn bad_url(what: &str, shown: &str, e: RedisError) -> Error {
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
pub(crate) fn open_client(url: &str, what: &str, tls: Option<&TlsConfig>) -> Result<redis::Client, Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `(url, its redacted form, the secret it holds)`: every way a user might write one.
    const TRICKY: &[(&str, &str, &str)] = &[
        ("redis://alice:s3cr3t@127.0.0.1:1/0", "redis://alice:***@127.0.0.1:1/0", "s3cr3t"),
        ("redis://alice:pa/ss@127.0.0.1:1/0", "redis://alice:***@127.0.0.1:1/0", "pa/ss"),
        ("redis://alice:pa?ss@127.0.0.1:1/0", "redis://alice:***@127.0.0.1:1/0", "pa?ss"),
        ("redis://alice:pa#ss@127.0.0.1:1/0", "redis://alice:***@127.0.0.1:1/0", "pa#ss"),
        ("redis://alice:pa@ss@127.0.0.1:1/0", "redis://alice:***@127.0.0.1:1/0", "pa@ss"),
        ("redis://alice:pa:ss@127.0.0.1:1/0", "redis://alice:***@127.0.0.1:1/0", "pa:ss"),
        ("redis://alice:p/a?s#s:w@rd@127.0.0.1:1", "redis://alice:***@127.0.0.1:1", "p/a?s#s:w@rd"),
        ("redis://alice:pa%2Fss@127.0.0.1:1/0", "redis://alice:***@127.0.0.1:1/0", "pa%2Fss"),
        ("redis://:s3cr3t@127.0.0.1:1", "redis://:***@127.0.0.1:1", "s3cr3t"),
        ("redis://:s3/cr3t@127.0.0.1:1/2", "redis://:***@127.0.0.1:1/2", "s3/cr3t"),
        // A lone userinfo may be a password written without its colon.
        ("redis://s3cr3t@127.0.0.1:1", "redis://***@127.0.0.1:1", "s3cr3t"),
        ("redis://s3/cr3t@127.0.0.1:1", "redis://***@127.0.0.1:1", "s3/cr3t"),
        // A "user" that cannot be one is part of a password.
        ("redis://s3/cr:3t@127.0.0.1:1", "redis://***@127.0.0.1:1", "s3/cr"),
        (
            "rediss://alice:s3cr3t@127.0.0.1:1/2#insecure",
            "rediss://alice:***@127.0.0.1:1/2#insecure",
            "s3cr3t",
        ),
        ("REDIS://alice:s3cr3t@127.0.0.1:1", "REDIS://alice:***@127.0.0.1:1", "s3cr3t"),
        ("redis://alice:s3cr3t@[::1]:1/0", "redis://alice:***@[::1]:1/0", "s3cr3t"),
        ("redis+unix:///run/r.sock?db=1&pass=s3cr3t", "redis+unix:///run/r.sock?db=1&pass=***", "s3cr3t"),
        ("unix:///run/r.sock?user=u&pass=s3&cr3t", "unix:///run/r.sock?user=u&pass=***", "cr3t"),
        ("redis://127.0.0.1:1/0?password=s3cr3t#x", "redis://127.0.0.1:1/0?password=***", "s3cr3t"),
        // No `@`: a password where the port should be.
        ("redis://alice:s3cr3t", "redis://alice:***", "s3cr3t"),
        ("redis://alice:s3/cr3t", "redis://alice:***", "cr3t"),
        ("redis://:s3cr3t", "redis://:***", "s3cr3t"),
        // Not URLs at all: nothing of them is shown.
        ("alice:s3cr3t@127.0.0.1:1", "***", "s3cr3t"),
        ("redis:/alice:s3cr3t@127.0.0.1:1", "***", "s3cr3t"),
        ("redis//alice:s3cr3t@127.0.0.1:1", "***", "s3cr3t"),
        ("s3cr3t", "***", "s3cr3t"),
        ("al:ice://s3cr3t@127.0.0.1:1", "***", "s3cr3t"),
    ];

    #[test]
    fn redacts_every_form_of_password() {
        for (url, redacted, secret) in TRICKY {
            let shown = redact_url(url);
            assert_eq!(&shown, redacted, "redacting {url}");
            assert!(!shown.contains(secret), "{url} shown as {shown}");
        }
    }

    #[test]
    fn keeps_urls_without_secrets() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "redis://host",
            "redis://[::1]:6379/0",
            "rediss://host:6380/0?protocol=resp3#insecure",
            "redis+unix:///run/redis.sock?db=2",
            "postgres://127.0.0.1:5432/db?sslmode=disable",
            "",
        ] {
            assert_eq!(redact_url(url), url);
        }
        // A `@` past the host is taken for the end of a userinfo: hidden, not shown.
        assert_eq!(redact_url("redis://host/0?x=a@b"), "redis://***@b");
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db?sslmode=disable&password=x"),
            "postgres://u:***@h:5432/db?sslmode=disable&password=***"
        );
    }

    fn assert_hidden(text: &str, url: &str, secret: &str) {
        assert!(!text.contains(secret), "{url}: the password shows in {text}");
    }

    /// The builders' `Debug`, the built components' and the errors of a bad or
    /// unreachable URL never show the password.
    #[tokio::test]
    async fn builders_and_errors_hide_the_password() {
        use crate::{RedisPubSubBackplane, RedisStreamBackplane, RedisTier};
        let short = Duration::from_millis(200);
        for (url, _, secret) in TRICKY {
            let options = ConnectionOptions::new(*url);
            assert_hidden(&format!("{options:?}"), url, secret);
            assert_hidden(&format!("{:?}", RedisTier::builder(*url)), url, secret);
            assert_hidden(&format!("{:?}", RedisStreamBackplane::builder(*url)), url, secret);
            assert_hidden(&format!("{:?}", RedisPubSubBackplane::builder(*url)), url, secret);
            if let Err(e) = crate::cluster::Connector::open(&options, "test") {
                assert_hidden(&format!("{e} {e:?}"), url, secret);
            }
            let tier = RedisTier::builder(*url).connect_timeout(short).build().await;
            let e = tier.err().unwrap_or_else(|| panic!("{url}: nothing listens on port 1"));
            assert_hidden(&format!("{e} {e:?}"), url, secret);
            let bp = RedisStreamBackplane::builder(*url).connect_timeout(short).build().await;
            let e = bp.err().unwrap_or_else(|| panic!("{url}: nothing listens on port 1"));
            assert_hidden(&format!("{e} {e:?}"), url, secret);
            let bp = RedisPubSubBackplane::builder(*url).connect_timeout(short).build().await;
            let e = bp.err().unwrap_or_else(|| panic!("{url}: nothing listens on port 1"));
            assert_hidden(&format!("{e} {e:?}"), url, secret);
            if let Ok(tier) = RedisTier::builder(*url).lazy(true).build().await {
                assert_hidden(&format!("{tier:?}"), url, secret);
                let cache = strata::Cache::<u64, u64>::builder("leak").tier(std::sync::Arc::new(tier));
                assert_hidden(&format!("{cache:?}"), url, secret);
            }
        }
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
