//! Writes the seed corpus, `corpus/<target>/seed-<name>`, from the real encoders:
//! `cargo run --example seeds` in `fuzz/` (see README.md). The seeds are committed;
//! run this again when a format changes.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use redis::Value;
use strata::Scope;
use strata::backplane::{Message, MessageBody};
use strata::clock::Timestamp;
use strata::codec::{Codec, PostcardCodec};
use strata::tier::Envelope;
use strata_fuzz::{Kind, Row, to_resp};
use strata_redis::fuzzing::{
    Answer, encode_envelope, encode_tags, entry_mac, lookup_reply, open_backplane_message,
    seal_backplane_message, xread,
};
use strata_testkit::history::{Event, History, Tier};

const ENTRY_KEY: &str = "strata:{ns}:e:k";
const CHANNEL: &str = "strata:{bp}";

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed written");
}

fn bulk(b: impl AsRef<[u8]>) -> Value {
    Value::BulkString(b.as_ref().to_vec())
}

fn envelopes() -> Vec<Envelope> {
    let base = Envelope {
        value: Some(Bytes::from_static(b"{\"id\":7,\"name\":\"seven\"}")),
        version: Some(3),
        created: Timestamp(1_796_000_000_000_000_000),
        soft_expiry: Timestamp(1_796_000_060_000_000_000),
        hard_expiry: Timestamp(1_796_000_600_000_000_000),
        stamp: 42,
        tags: vec!["user:7".into(), "team:3".into()],
        load_nanos: 1_500_000,
        schema: 0x1234_5678_9abc_def0,
    };
    let negative = Envelope { value: None, version: None, tags: vec![], stamp: 0, ..base.clone() };
    let empty =
        Envelope { value: Some(Bytes::new()), tags: vec![String::new(), "1:2".into()], ..base.clone() };
    vec![base, negative, empty]
}

fn messages() -> Vec<Message> {
    let m = |seq, body| Message {
        origin: 0xdead_beef,
        seq,
        namespace: "users".into(),
        body,
        sent_at_ms: 1_796_000_000_123,
    };
    vec![
        m(1, MessageBody::Invalidate(Scope::Keys(vec!["7".into(), "8".into()]))),
        m(2, MessageBody::Invalidate(Scope::tag("team:3"))),
        m(3, MessageBody::Invalidate(Scope::All)),
        m(3, MessageBody::Heartbeat),
        m(4, MessageBody::Bypass),
        m(4, MessageBody::Ack { to: 9, seq: 17 }),
        Message { sent_at_ms: 0, ..m(5, MessageBody::Invalidate(Scope::Keys(vec![]))) },
        m(
            5,
            MessageBody::Reload {
                key: "7".into(),
                after: (0xfeed, 12),
                entry: Box::new(envelopes()[0].clone()),
            },
        ),
    ]
}

/// One stored entry as the lookup script returns it: envelope, s, f, h, t, m.
fn stored(env: &Envelope, signed: bool) -> Vec<Value> {
    let bytes = encode_envelope(env).expect("encodes");
    let tags = encode_tags(&env.tags);
    let mut out = vec![
        bulk(&bytes),
        bulk(env.stamp.to_string()),
        bulk(env.soft_expiry.0.to_string()),
        bulk(env.hard_expiry.0.to_string()),
        bulk(&tags),
    ];
    if signed {
        out.push(bulk(entry_mac(ENTRY_KEY, &bytes, &tags)));
    }
    out
}

fn main() {
    for (i, env) in envelopes().iter().enumerate() {
        write("envelope", &format!("{i}"), &encode_envelope(env).expect("encodes"));
        write("tags", &format!("{i}"), encode_tags(&env.tags).as_bytes());
    }

    let codec = PostcardCodec::<Row>::default();
    let row = Row {
        id: 7,
        amount: -1250,
        name: "seven".into(),
        blob: Bytes::from_static(&[0, 1, 2, 255]),
        labels: vec!["a".into(), "b".into()],
        parent: Some(3),
        attrs: BTreeMap::from([("k".into(), 1), ("l".into(), 65535)]),
        kind: Kind::Named { label: "x".into() },
        children: vec![(1, None), (2, Some("two".into()))],
    };
    write("codec", "row", &codec.encode(&row).expect("encodes"));
    let plain =
        Row { kind: Kind::Plain, labels: vec![], attrs: BTreeMap::new(), children: vec![], ..row.clone() };
    write("codec", "plain", &codec.encode(&plain).expect("encodes"));
    write("codec", "counted", &codec.encode(&Row { kind: Kind::Counted(9), ..plain }).expect("encodes"));

    // Lookup replies: the first byte is the number of answers.
    let envs = envelopes();
    let hit = |env: &Envelope, signed: bool| {
        let mut a = vec![Value::Int(1)];
        a.extend(stored(env, signed));
        Value::Array(a)
    };
    let miss = |stale: Option<&Envelope>| {
        let mut a = vec![Value::Int(0), Value::Int(43), Value::Int(5), Value::Int(1), Value::Int(0)];
        if let Some(env) = stale {
            a.extend(stored(env, false));
        }
        Value::Array(a)
    };
    let replies = [
        ("hit", vec![hit(&envs[0], false)]),
        ("hit-signed", vec![hit(&envs[0], true)]),
        ("miss", vec![miss(None)]),
        ("miss-stale", vec![miss(Some(&envs[1]))]),
        ("many", vec![hit(&envs[2], true), miss(None), hit(&envs[1], false)]),
    ];
    for (name, answers) in replies {
        let n = u8::try_from(answers.len()).expect("few answers");
        let mut items = answers;
        items.push(Value::Int(2));
        let mut seed = vec![n];
        seed.extend(to_resp(&Value::Array(items)));
        // Each seed reads back as the tier reads a good reply: every entry decodes, and
        // the signed ones verify.
        let v = redis::parse_redis_value(&seed[1..]).expect("the RESP written parses");
        let (answers, _) = lookup_reply(&v, usize::from(n), ENTRY_KEY).expect("a lookup reply");
        for a in answers {
            match a {
                Answer::Hit(env, signed) => assert!(env.is_some() && (signed || !name.contains("signed"))),
                Answer::Miss(stale) => assert!(stale.is_none_or(|(env, _)| env.is_some())),
            }
        }
        write("lookup_reply", name, &seed);
    }
    let mut script = vec![0];
    script.extend(to_resp(&Value::Array(vec![Value::Int(1), Value::Int(0), Value::Int(1)])));
    write("lookup_reply", "script", &script);

    // Backplane messages, plain and sealed; stream replies holding them.
    let mut entries = Vec::new();
    for (i, m) in messages().iter().enumerate() {
        write("backplane_message", &format!("{i}"), &m.encode().expect("encodes"));
        let sealed = seal_backplane_message(true, CHANNEL, m).expect("seals");
        write("backplane_message", &format!("{i}-sealed"), &sealed);
        let fields = vec![bulk("m"), bulk(&sealed), bulk("n"), bulk((i + 1).to_string())];
        entries.push(Value::Array(vec![bulk(format!("1796000000123-{i}")), Value::Array(fields)]));
    }
    let read =
        |v: &Value| xread(&redis::parse_redis_value(&to_resp(v)).expect("parses")).expect("an XREAD reply");
    let resp2 = Value::Array(vec![Value::Array(vec![bulk("strata:{bp}"), Value::Array(entries.clone())])]);
    let resp3 = Value::Map(vec![(bulk("strata:{bp}"), Value::Array(entries.clone()))]);
    for v in [&resp2, &resp3] {
        let read = read(v);
        assert_eq!(read.len(), messages().len());
        for ((_, m, _), want) in read.iter().zip(messages()) {
            let m = m.as_deref().expect("an m field");
            assert_eq!(open_backplane_message(true, CHANNEL, m), Some(want));
        }
    }
    let stream_seed = |mode: u8, v: &Value| {
        let mut s = vec![mode];
        s.extend(to_resp(v));
        s
    };
    write("stream_reply", "xread-resp2", &stream_seed(4, &resp2));
    write("stream_reply", "xread-resp3", &stream_seed(4, &resp3));
    write("stream_reply", "xread-nil", &stream_seed(0, &Value::Nil));
    write("stream_reply", "entries", &stream_seed(5, &Value::Array(entries)));
    write(
        "stream_reply",
        "repairs",
        &stream_seed(2, &Value::Array(vec![Value::Int(7), Value::Int(1), bulk("string")])),
    );
    write("stream_reply", "id", b"\x0318446744073709551615-0");

    // pg_notify payloads (mode 0) and snapshots (mode 1).
    write("pg_notify", "wake", b"\x00748");
    write("pg_notify", "ping", b"\x00{\"op\":\"PING\",\"listener\":\"l-1\",\"nonce\":17}");
    write("pg_notify", "snapshot", b"\x01100:105:101,103");
    write("pg_notify", "snapshot-empty", b"\x01100:100:");

    // Admin invalidation bodies: each accepted scope, and refusals.
    write("admin_invalidate_body", "keys", br#"{"keys":["1","2"]}"#);
    write("admin_invalidate_body", "tag", br#"{"tag":"tenant:7"}"#);
    write("admin_invalidate_body", "all", br#"{"all":true}"#);
    write("admin_invalidate_body", "all_false", br#"{"all":false}"#);
    write("admin_invalidate_body", "empty", br#"{"keys":[]}"#);
    write("admin_invalidate_body", "two", br#"{"keys":["a"],"tag":"t"}"#);
    write("admin_invalidate_body", "unknown", br#"{"keys":["\u00e9"],"extra":1}"#);

    // A history as the checker's processes write it.
    let history = History {
        events: vec![
            Event::write("writer", 7, 100, 200, Some(4), true),
            Event::read("reader-1", 7, 150, 260, 4, Tier::L2),
            Event::write("writer", 8, 300, 400, None, false).with_detail("commit: connection reset"),
            Event::write_rolled_back("writer", 9, 500, 600),
            Event::fault("nemesis", 100, 900, "redis: kill"),
        ],
        malformed: 0,
    };
    let mut out = Vec::new();
    history.write_to(&mut out).expect("writes");
    write("history", "run", &out);
}
