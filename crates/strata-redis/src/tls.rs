//! TLS settings for `rediss://` URLs.

/// Certificates for `rediss://` connections, for servers whose certificate is not
/// signed by a root the system trusts, or that require client certificates (mTLS).
///
/// Without it, `rediss://` URLs verify the server against the system's root
/// certificates. Honoured only with the `tls` feature (on by default); building with
/// TLS settings but without the feature is a configuration error.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate(s) of the CA that signed the server's certificate; replaces the
    /// system's roots.
    pub root_cert_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and private key, for servers that authenticate
    /// clients (`tls-auth-clients yes`).
    pub client_auth_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("root_cert_pem", &self.root_cert_pem.as_ref().map(|c| c.len()))
            .field("client_auth_pem", &self.client_auth_pem.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl TlsConfig {
    /// Trusts the CA in `pem` (instead of the system's roots).
    pub fn with_root_cert(pem: impl Into<Vec<u8>>) -> Self {
        TlsConfig { root_cert_pem: Some(pem.into()), client_auth_pem: None }
    }

    /// Also presents a client certificate (`cert_pem`, with its private key `key_pem`).
    #[must_use]
    pub fn client_auth(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.client_auth_pem = Some((cert_pem.into(), key_pem.into()));
        self
    }
}

/// Installs ring as the process-wide rustls provider unless one is installed already
/// (redis-rs builds its TLS config from the process default).
#[cfg(feature = "tls")]
pub(crate) fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: some provider is then installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
