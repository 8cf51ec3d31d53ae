//! Helpers shared by the test modules: envelopes and lookups, a tier on a test server,
//! raw connections, and waiting for backplane events.

use std::time::Duration;

use bytes::Bytes;
use strata::backplane::{BackplaneEvent, Message, MessageBody, Subscription};
use strata::clock::{Clock, SystemClock, Timestamp};
use strata::tier::{Envelope, FillToken, Lookup};
use strata_redis::RedisTier;
use strata_testkit::RedisServer;

pub fn now() -> Timestamp {
    SystemClock::default().now()
}

pub fn envelope(value: &str, tags: &[&str], soft_in: Duration, hard_in: Duration) -> Envelope {
    let t = now();
    Envelope {
        value: Some(Bytes::copy_from_slice(value.as_bytes())),
        version: Some(7),
        created: t,
        soft_expiry: t.saturating_add(soft_in),
        hard_expiry: t.saturating_add(hard_in),
        stamp: 0,
        tags: tags.iter().map(|s| (*s).to_owned()).collect(),
        load_nanos: 1234,
        schema: 0,
    }
}

pub fn fresh(value: &str, tags: &[&str]) -> Envelope {
    envelope(value, tags, Duration::from_secs(60), Duration::from_secs(120))
}

pub const TTL: Duration = Duration::from_secs(60);
pub const LEASE: Option<Duration> = Some(Duration::from_secs(5));

pub fn token(l: &Lookup) -> FillToken {
    match l {
        Lookup::Miss { token, .. } => token.clone(),
        Lookup::Hit(e) => panic!("expected a miss, got a hit {e:?}"),
    }
}

pub fn hit_value(l: &Lookup) -> Option<String> {
    match l {
        Lookup::Hit(e) => e.value.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
        Lookup::Miss { .. } => None,
    }
}

pub fn is_miss(l: &Lookup) -> bool {
    matches!(l, Lookup::Miss { .. })
}

pub async fn redis_tier(server: &RedisServer, prefix: &str) -> RedisTier {
    RedisTier::builder(server.url())
        .prefix(prefix)
        // Generous: the suite runs on 2 busy cores; timeouts are tested separately.
        .op_timeout(Duration::from_millis(2000))
        .build()
        .await
        .expect("build redis tier")
}

/// The Redis key `kind` of `ns` ("m" the meta hash, "l:k" the lease of key k, "x0" a
/// tombstone generation, ...).
pub fn key_of(tier: &RedisTier, ns: &str, kind: &str) -> String {
    let e = tier.entry_key(ns, "k");
    format!("{}{kind}", e.strip_suffix("e:k").expect("entry keys end in e:<key>"))
}

pub async fn raw_conn(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    // Generous: some tests move tens of megabytes in one command on 2 busy cores.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(20)));
    redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("raw connection")
}

pub async fn next_event(sub: &mut Subscription, within: Duration) -> BackplaneEvent {
    match tokio::time::timeout(within, sub.recv()).await {
        Ok(Some(ev)) => ev,
        Ok(None) => panic!("subscription closed"),
        Err(_) => panic!("no backplane event within {within:?}"),
    }
}

/// Waits for an event matching `pred`, returning it and the events skipped before it.
pub async fn wait_for(
    sub: &mut Subscription,
    within: Duration,
    what: &str,
    pred: impl Fn(&BackplaneEvent) -> bool,
) -> (BackplaneEvent, Vec<BackplaneEvent>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut skipped = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, sub.recv()).await {
            Ok(Some(ev)) if pred(&ev) => return (ev, skipped),
            Ok(Some(ev)) => skipped.push(ev),
            Ok(None) => panic!("subscription closed while waiting for {what}; saw {skipped:?}"),
            Err(_) => panic!("no {what} within {within:?}; saw {skipped:?}"),
        }
    }
}

pub fn msg(origin: u64, seq: u64, key: &str) -> Message {
    Message {
        origin,
        seq,
        namespace: "ns".into(),
        body: MessageBody::Invalidate(strata::Scope::Keys(vec![key.to_owned()])),
        sent_at_ms: 0,
    }
}

pub fn message_of(ev: &BackplaneEvent) -> Option<&Message> {
    match ev {
        BackplaneEvent::Message(m) => Some(m),
        _ => None,
    }
}

/// `(id, name)` of each client in `CLIENT LIST` whose name starts with `prefix`.
pub fn clients_named(server: &RedisServer, prefix: &str) -> Vec<(String, String)> {
    let list = server.command(&["CLIENT", "LIST"]).expect("CLIENT LIST");
    let mut out = Vec::new();
    for line in list.lines() {
        let mut id = None;
        let mut name = None;
        for field in line.split_whitespace() {
            if let Some(v) = field.strip_prefix("id=") {
                id = Some(v.trim_start_matches(|c: char| !c.is_ascii_digit()).to_owned());
            }
            if let Some(v) = field.strip_prefix("name=") {
                name = Some(v.to_owned());
            }
        }
        if let (Some(id), Some(name)) = (id, name)
            && name.starts_with(prefix)
        {
            out.push((id, name));
        }
    }
    out
}

/// The fields of a stored entry string (`<s>,<f>,<h>,<v>,<tags len>,<mac len>;` then
/// tags, MAC, envelope): `s f h v t [m] e`, as a test reads and rewrites them.
pub fn entry_fields(raw: &[u8]) -> Vec<(String, Vec<u8>)> {
    let semi = raw.iter().position(|b| *b == b';').expect("an entry head");
    let head = std::str::from_utf8(&raw[..semi]).expect("an ASCII head");
    let p: Vec<&str> = head.split(',').collect();
    assert_eq!(p.len(), 6, "entry head {head:?}");
    let (tl, ml): (usize, usize) = (p[4].parse().expect("tags len"), p[5].parse().expect("mac len"));
    let rest = &raw[semi + 1..];
    let mut out: Vec<(String, Vec<u8>)> =
        ["s", "f", "h", "v"].iter().zip(&p).map(|(f, v)| ((*f).to_owned(), v.as_bytes().to_vec())).collect();
    out.push(("t".into(), rest[..tl].to_vec()));
    if ml > 0 {
        out.push(("m".into(), rest[tl..tl + ml].to_vec()));
    }
    out.push(("e".into(), rest[tl + ml..].to_vec()));
    out
}

/// The entry string of `fields` (a field left out is written empty).
pub fn entry_bytes(fields: &[(String, Vec<u8>)]) -> Vec<u8> {
    let get = |name: &str| fields.iter().find(|(f, _)| f == name).map(|(_, v)| v.clone()).unwrap_or_default();
    let (t, m) = (get("t"), get("m"));
    let mut out = Vec::new();
    for f in ["s", "f", "h", "v"] {
        out.extend_from_slice(&get(f));
        out.push(b',');
    }
    out.extend_from_slice(format!("{},{};", t.len(), m.len()).as_bytes());
    out.extend_from_slice(&t);
    out.extend_from_slice(&m);
    out.extend_from_slice(&get("e"));
    out
}

/// Reads the entry at `key` as fields.
pub async fn read_entry(raw: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<(String, Vec<u8>)> {
    let bytes: Vec<u8> = redis::cmd("GET").arg(key).query_async(raw).await.expect("GET entry");
    entry_fields(&bytes)
}

/// Writes `fields` as the entry at `key` (expiring in a minute).
pub async fn write_entry(
    raw: &mut redis::aio::MultiplexedConnection,
    key: &str,
    fields: &[(String, Vec<u8>)],
) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(entry_bytes(fields))
        .arg("PX")
        .arg(60_000)
        .query_async(raw)
        .await
        .expect("SET");
}

/// Rewrites one field of the entry at `key`.
pub async fn set_entry_field(
    raw: &mut redis::aio::MultiplexedConnection,
    key: &str,
    field: &str,
    value: &[u8],
) {
    let mut fields = read_entry(raw, key).await;
    match fields.iter_mut().find(|(f, _)| f == field) {
        Some((_, v)) => *v = value.to_vec(),
        None => fields.push((field.to_owned(), value.to_vec())),
    }
    write_entry(raw, key, &fields).await;
}
