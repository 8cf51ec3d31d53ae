//! The check `build` makes before handing out a tier: the server (on a Redis Cluster,
//! every master: `PING` goes to each) answers and accepts the credentials.

use std::time::Duration;

use redis::Value;
use strata::error::{Error, ErrorKind, Result};

use super::RedisTier;

impl RedisTier {
    pub(crate) async fn check_server(&self, timeout: Duration) -> Result<()> {
        let shown = self.inner.conn.shown_url();
        let mut c = self.inner.conn.get();
        let ping =
            tokio::time::timeout(timeout, async { redis::cmd("PING").query_async::<Value>(&mut c).await })
                .await;
        match ping {
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "redis tier: no answer from `{shown}` within {timeout:?}; check that \
                         the server runs and the host/port are right, or build with .lazy(true) \
                         to start without it"
                    ),
                ));
            }
            Ok(Err(e)) => {
                let hint = if e.kind() == redis::ErrorKind::AuthenticationFailed
                    || e.code() == Some("NOAUTH")
                    || e.code() == Some("WRONGPASS")
                {
                    "check the ACL user and password in the URL \
                     (redis://user:password@host:port, percent-encoded)"
                } else if e.to_string().contains("certificate") {
                    "the server's TLS certificate is not trusted: give its CA with \
                     .tls(TlsConfig::with_root_cert(pem)), or check the host name in the URL"
                } else if e.code() == Some("NOPERM") {
                    "the ACL user lacks permissions: it needs +@read +@write +@scripting \
                     and the keys under the prefix"
                } else {
                    "check that the server runs and the URL's host/port/db are right, or \
                     build with .lazy(true) to start without it"
                };
                return Err(Error::new(
                    ErrorKind::Tier,
                    format!("redis tier: cannot use `{shown}`: {e}; {hint}"),
                )
                .with_source(e));
            }
            Ok(Ok(_)) => {}
        }
        Ok(())
    }
}
