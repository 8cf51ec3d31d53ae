//! TLS support (`rediss://`): rustls with the ring crypto provider.

/// Installs ring as the process-wide rustls provider unless one is installed already
/// (redis-rs builds its TLS config from the process default).
pub(crate) fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: some provider is then installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
