//! Keeping the passwords of `--redis` and `--database` URLs out of everything the tool
//! prints or writes.
//!
//! * [`SecretUrl`] holds a URL whose `Display` and `Debug` are redacted, so that a URL
//!   formatted into a message or a report never shows its password; only
//!   [`SecretUrl::expose`] gives the real text, to hand to a client library.
//! * [`scrub`] is the safety net for text that came from elsewhere (error chains of
//!   client libraries, a worker's stderr): every secret of every `SecretUrl` made in
//!   this process is replaced by `***`.
//! * Worker processes get their URLs through [`REDIS_URL_ENV`] and
//!   [`DATABASE_URL_ENV`], never on their command line (which `ps` shows to every
//!   user of the machine).

use std::fmt;

use parking_lot::Mutex;

/// The environment variable through which `strata check` hands the Redis URL to its
/// workers.
pub const REDIS_URL_ENV: &str = "STRATA_CHECK_REDIS_URL";
/// The environment variable through which `strata check` hands the database URL to
/// its workers.
pub const DATABASE_URL_ENV: &str = "STRATA_CHECK_DATABASE_URL";

/// Every secret of every [`SecretUrl`] made so far, for [`scrub`].
static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A URL that may hold a password: shown redacted, exposed only on request.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl {
    url: String,
    redacted: String,
}

impl SecretUrl {
    /// Wraps `url` and remembers its secrets for [`scrub`].
    pub fn new(url: impl Into<String>) -> SecretUrl {
        let url = url.into();
        if url.starts_with("sqlite:") {
            // A file name: nothing to hide (and the redaction would hide it whole, as
            // it is not `scheme://…`).
            return SecretUrl { redacted: url.clone(), url };
        }
        // The library's redaction works on any `scheme://` URL (Postgres ones too).
        let redacted = strata_redis::ConnectionOptions::new(url.as_str()).redacted_url();
        let mut secrets = SECRETS.lock();
        for s in secrets_of(&url) {
            if !secrets.contains(&s) {
                secrets.push(s);
            }
        }
        // Longest first, so that a secret containing another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        SecretUrl { url, redacted }
    }

    /// The URL itself, password included: for client libraries only, never for output.
    pub fn expose(&self) -> &str {
        &self.url
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> SecretUrl {
        SecretUrl::new(url)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({:?})", self.redacted)
    }
}

/// `text` with every known secret replaced by `***`.
pub fn scrub(text: &str) -> String {
    let secrets = SECRETS.lock();
    let mut out = text.to_owned();
    for s in secrets.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
    }
    out
}

/// What in `url` may be secret, as written and percent-decoded: the password (or the
/// whole userinfo when it has no `:`), up to the last `@`; the values of query
/// parameters named like a password; the whole text when it is not `scheme://…`.
fn secrets_of(url: &str) -> Vec<String> {
    let mut found = Vec::new();
    let rest = match url.split_once("://") {
        Some((_, rest)) => rest,
        None => {
            found.push(url.to_owned());
            url
        }
    };
    if let Some(at) = rest.rfind('@') {
        let userinfo = &rest[..at];
        found.push(userinfo.split_once(':').map_or(userinfo, |(_, password)| password).to_owned());
    }
    if let Some((_, query)) = rest.split_once('?') {
        let mut pairs = query.split('&');
        while let Some(pair) = pairs.next() {
            let Some((key, value)) = pair.split_once('=') else { continue };
            let key = key.to_ascii_lowercase();
            if ["pass", "secret", "token"].iter().any(|w| key.contains(w)) {
                // An unencoded `&` in the value: the rest may belong to it.
                let rest: Vec<&str> = pairs.by_ref().collect();
                found.push(value.to_owned());
                found.extend(rest.into_iter().map(str::to_owned));
                break;
            }
        }
    }
    let decoded: Vec<String> = found.iter().map(|s| percent_decode(s)).collect();
    found.extend(decoded);
    found.retain(|s| !s.is_empty());
    found.sort();
    found.dedup();
    found
}

/// `%XX` escapes decoded (invalid ones and invalid UTF-8 kept as they are).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_debug_are_redacted() {
        let url = SecretUrl::new("redis://alice:pa/ss@127.0.0.1:6379/0");
        assert_eq!(url.to_string(), "redis://alice:***@127.0.0.1:6379/0");
        assert_eq!(format!("{url:?}"), "SecretUrl(\"redis://alice:***@127.0.0.1:6379/0\")");
        assert_eq!(url.expose(), "redis://alice:pa/ss@127.0.0.1:6379/0");
        let pg = SecretUrl::new("postgres://bob:pg%40pw@127.0.0.1:5432/db");
        assert_eq!(pg.to_string(), "postgres://bob:***@127.0.0.1:5432/db");
        assert_eq!(SecretUrl::new("sqlite:/tmp/bench.db").to_string(), "sqlite:/tmp/bench.db");
        assert_eq!(SecretUrl::new("not a url").to_string(), "***");
    }

    #[test]
    fn scrub_hides_every_secret_as_written_and_decoded() {
        let _url = SecretUrl::new("redis://alice:Sc%2Frub1@h:1/0");
        let _unix = SecretUrl::new("unix:///run/r.sock?db=1&pass=Scrub2&Scrub3");
        let _bare = SecretUrl::new("Scrub4@h");
        let text = "a Sc%2Frub1 b Sc/rub1 c Scrub2 d Scrub3 e Scrub4 f alice";
        assert_eq!(scrub(text), "a *** b *** c *** d *** e *** f alice");
    }
}
