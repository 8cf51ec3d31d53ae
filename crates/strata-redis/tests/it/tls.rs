//! `rediss://`: the tier and both backplanes over TLS, with a CA made in-process.

use std::time::{Duration, Instant};

use strata::backplane::Backplane;
use strata::error::ErrorKind;
use strata::tier::Tier;
use strata_redis::{RedisPubSubBackplane, RedisStreamBackplane, RedisTier};
use strata_testkit::RedisServer;

use crate::support::{TTL, fresh, hit_value, message_of, msg, next_event, token};

/// A CA and a server certificate for 127.0.0.1, written to `dir`; returns the CA PEM.
fn make_certs(dir: &std::path::Path) -> String {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&server_key, &ca).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    ca.pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_tier_and_backplanes_over_rediss() {
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = make_certs(dir.path());
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let path = |f: &str| dir.path().join(f).display().to_string();
    let server = RedisServer::builder()
        .arg("tls-port", tls_port.to_string())
        .arg("tls-cert-file", path("server.pem"))
        .arg("tls-key-file", path("server.key"))
        .arg("tls-ca-cert-file", path("ca.pem"))
        .arg("tls-auth-clients", "no")
        .start();
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let tls = strata_redis::TlsConfig::with_root_cert(ca_pem.clone());

    // Without the CA the server's certificate is refused.
    let err = RedisTier::builder(&url).op_timeout(Duration::from_secs(2)).build().await.unwrap_err();
    eprintln!("[tls] without the CA: {err}");
    assert!(err.to_string().contains("TlsConfig"), "{err}");

    let started = Instant::now();
    let tier = RedisTier::builder(&url)
        .tls(tls.clone())
        .op_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("tls tier");
    eprintln!("[tls] connected over TLS in {:?}", started.elapsed());
    let t = token(&tier.lookup("ns", "k", None).await.unwrap());
    tier.fill("ns", "k", fresh("over tls", &[]), TTL, &t).await.unwrap();
    assert_eq!(hit_value(&tier.lookup("ns", "k", None).await.unwrap()).as_deref(), Some("over tls"));

    let stream = RedisStreamBackplane::builder(&url).tls(tls.clone()).build().await.expect("tls stream");
    let mut sub = stream.subscribe().await.unwrap();
    stream.publish(&msg(1, 1, "tls")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&msg(1, 1, "tls")));

    let pubsub = RedisPubSubBackplane::builder(&url).tls(tls).build().await.expect("tls pubsub");
    let mut sub = pubsub.subscribe().await.unwrap();
    pubsub.publish(&msg(1, 1, "tls")).await.unwrap();
    assert_eq!(message_of(&next_event(&mut sub, Duration::from_secs(5)).await), Some(&msg(1, 1, "tls")));

    // TLS settings with a plain URL are a configuration error.
    let e = RedisTier::builder(server.url())
        .tls(strata_redis::TlsConfig::with_root_cert(ca_pem))
        .build()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("rediss://"), "{e}");
}
