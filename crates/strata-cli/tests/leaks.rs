//! Runs `strata bench` and `strata check` with passwords in their `--redis` and
//! `--database` URLs, against a Redis that requires them, and scans everything the
//! runs show for the passwords: stdout, stderr, the JSON reports, the history, the
//! chart, and the command lines of the worker processes (`/proc/<pid>/cmdline`, which
//! every user of the machine can read).

// Helpers outside #[test] functions are test code too.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use strata_testkit::{PostgresServer, RedisServer};

/// The ACL user `alice`'s password: every character a URL gives a meaning to.
const ALICE_PASSWORD: &str = "Rs3cret/pa?ss#w@rd:xQz";
/// `ALICE_PASSWORD` percent-encoded, as a correct URL holds it.
const ALICE_ENCODED: &str = "Rs3cret%2Fpa%3Fss%23w%40rd%3AxQz";
/// The default user's password (`requirepass`).
const DEFAULT_PASSWORD: &str = "Ds3cret-default";
/// A password in the Postgres URLs (the testkit's server trusts every local login, so
/// any password connects).
const PG_PASSWORD: &str = "Ps3cret/pg";
/// Fragments of the passwords: none may appear anywhere (a part of a password is a leak
/// too).
const FRAGMENTS: [&str; 6] = ["Rs3cret", "rd:xQz", "xQz", "Ds3cret", "Ps3cret", "s3cret"];

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata")).args(args).output().expect("the strata binary runs")
}

/// A Redis whose default user needs `DEFAULT_PASSWORD` and with an ACL user `alice`.
fn redis_with_passwords() -> RedisServer {
    let redis = RedisServer::start();
    let alice = format!(">{ALICE_PASSWORD}");
    let reply = redis.command(&["ACL", "SETUSER", "alice", "on", &alice, "~*", "&*", "+@all"]).unwrap();
    assert!(reply.starts_with("+OK"), "{reply}");
    let reply = redis.command(&["CONFIG", "SET", "requirepass", DEFAULT_PASSWORD]).unwrap();
    assert!(reply.starts_with("+OK"), "{reply}");
    // From here on the server refuses commands without AUTH.
    let refused = redis.command(&["SET", "k", "v"]);
    assert!(refused.is_err_and(|e| e.to_string().contains("NOAUTH")), "requirepass is in force");
    redis
}

fn alice_url(redis: &RedisServer) -> String {
    format!("redis://alice:{ALICE_ENCODED}@127.0.0.1:{}/0", redis.port())
}

fn postgres_url(postgres: &PostgresServer) -> String {
    let encoded = PG_PASSWORD.replace('/', "%2F");
    format!("postgres://postgres:{encoded}@127.0.0.1:{}/postgres", postgres.port())
}

fn assert_no_password(what: &str, text: &str) {
    for fragment in FRAGMENTS {
        assert!(!text.contains(fragment), "{what} shows the password ({fragment}):\n{text}");
    }
}

fn assert_output_has_no_password(what: &str, out: &Output) {
    assert_no_password(&format!("{what}: stdout"), &String::from_utf8_lossy(&out.stdout));
    assert_no_password(&format!("{what}: stderr"), &String::from_utf8_lossy(&out.stderr));
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A short bench on a Redis and a Postgres that take passwords: the run works, and the
/// header, the table, the JSON (which keeps the redacted URL) and the chart hide them.
#[test]
fn bench_with_passwords_shows_none() {
    let redis = redis_with_passwords();
    let postgres = PostgresServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (json, svg) = (dir.path().join("bench.json"), dir.path().join("bench.svg"));
    let (redis_url, pg_url) = (alice_url(&redis), postgres_url(&postgres));
    let out = strata(&[
        "bench",
        "--duration",
        "1",
        "--instances",
        "2",
        "--rate",
        "100",
        "--keys",
        "50",
        "--redis",
        &redis_url,
        "--database",
        &pg_url,
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "strata bench failed:\n{stderr}");
    assert_output_has_no_password("bench", &out);
    let shown = format!("redis://alice:***@127.0.0.1:{}/0", redis.port());
    assert!(stderr.contains(&format!("redis: {shown}")), "the header names the redacted URL:\n{stderr}");
    let report = read(&json);
    assert_no_password("the JSON report", &report);
    assert_no_password("the chart", &read(&svg));
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["redis"], shown.as_str());
    let strategies = report["strategies"].as_array().unwrap();
    for s in strategies {
        assert_eq!(s["errors"], 0, "the run authenticated: {s:#}");
    }
    let redis_global = strategies.iter().find(|s| s["name"] == "redis-global").unwrap();
    assert!(redis_global["redis_ops"].as_u64().unwrap() > 0, "{redis_global:#}");
}

/// Benches that fail on bad, wrong or unreachable URLs, with each Redis strategy and
/// the database: every error hides the password.
#[test]
fn bench_errors_show_no_password() {
    let redis = redis_with_passwords();
    let port = redis.port();
    let short = ["--duration", "1", "--instances", "2", "--rate", "100", "--keys", "50"];
    let cases = [
        // An unencoded password: the URL does not parse.
        (format!("redis://alice:{ALICE_PASSWORD}@127.0.0.1:{port}/0"), "redis-global"),
        (format!("redis://alice:{ALICE_PASSWORD}@127.0.0.1:{port}/0"), "strata"),
        (format!("redis://alice:{ALICE_PASSWORD}@127.0.0.1:{port}/0"), "near-pubsub"),
        (format!("redis://alice:{ALICE_PASSWORD}@127.0.0.1:{port}/0"), "multi-tier"),
        // A wrong password (the right one with a suffix): AUTH fails.
        (format!("redis://alice:{ALICE_ENCODED}x@127.0.0.1:{port}/0"), "redis-global"),
        (format!("redis://alice:{ALICE_ENCODED}x@127.0.0.1:{port}/0"), "strata"),
        (format!("redis://:{DEFAULT_PASSWORD}x@127.0.0.1:{port}/0"), "near-pubsub"),
        (format!("redis://alice:{ALICE_ENCODED}x@127.0.0.1:{port}/0"), "multi-tier"),
        // Nothing listens.
        (format!("redis://:{DEFAULT_PASSWORD}@127.0.0.1:1/0"), "strata"),
        (format!("redis://:{DEFAULT_PASSWORD}@127.0.0.1:1/0"), "multi-tier"),
        // Not a URL.
        (format!("{DEFAULT_PASSWORD}@127.0.0.1:{port}"), "redis-global"),
    ];
    for (url, strategy) in &cases {
        let mut args = vec!["bench", "--strategies", strategy, "--redis", url];
        args.extend(short);
        let out = strata(&args);
        assert!(!out.status.success(), "{strategy} on {url} should fail");
        assert_output_has_no_password(&format!("bench {strategy} on a bad URL"), &out);
    }
    // A live server with no such database fails at once (nothing listening would make
    // sqlx retry until its acquire timeout).
    let postgres = PostgresServer::start();
    let pg_port = postgres.port();
    for url in [
        format!("postgres://u:{PG_PASSWORD}@127.0.0.1:{pg_port}/db"),
        format!("postgres://u:{}@127.0.0.1:{pg_port}/nodb", PG_PASSWORD.replace('/', "%2F")),
        format!("postgresql://postgres@127.0.0.1:{pg_port}/nodb?password={PG_PASSWORD}"),
        format!("mysql://u:{PG_PASSWORD}@127.0.0.1:1/db"),
    ] {
        let mut args = vec!["bench", "--strategies", "none", "--database", &url];
        args.extend(short);
        let out = strata(&args);
        assert!(!out.status.success(), "{url} should fail");
        assert_output_has_no_password("bench on a bad --database", &out);
    }
}

/// `strata invalidate` and `strata stats` with passwords: their output, success or
/// failure, never shows one.
#[test]
fn ops_commands_show_no_password() {
    let redis = redis_with_passwords();
    let port = redis.port();
    let good = alice_url(&redis);
    let ok = strata(&["invalidate", "--redis", &good, "--namespace", "ns", "--key", "1"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("***"), "the URL is shown redacted");
    assert_output_has_no_password("invalidate", &ok);
    let stats = strata(&["stats", "--redis", &good, "--namespace", "ns", "--json"]);
    assert!(stats.status.success(), "{}", String::from_utf8_lossy(&stats.stderr));
    assert_output_has_no_password("stats", &stats);
    for url in [
        format!("redis://alice:{ALICE_PASSWORD}@127.0.0.1:{port}/0"),
        format!("redis://alice:{ALICE_ENCODED}x@127.0.0.1:{port}/0"),
        format!("redis://:{DEFAULT_PASSWORD}@127.0.0.1:1/0"),
    ] {
        let out =
            strata(&["invalidate", "--redis", &url, "--namespace", "ns", "--all", "--ready-timeout", "3"]);
        assert!(!out.status.success(), "invalidate on {url} should fail");
        assert_output_has_no_password("invalidate on a bad URL", &out);
        let out = strata(&["stats", "--redis", &url, "--namespace", "ns"]);
        assert!(!out.status.success(), "stats on {url} should fail");
        assert_output_has_no_password("stats on a bad URL", &out);
    }
}

/// `strata check` with URLs that are bad or lead nowhere, before and after its workers
/// start: every error hides the passwords.
#[test]
fn check_errors_show_no_password() {
    let postgres = PostgresServer::start();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("check.json");
    let history = dir.path().join("history.jsonl");
    let base = ["check", "--level", "invalidated", "--duration", "1", "--instances", "2"];
    let files = ["--json", json.to_str().unwrap(), "--history", history.to_str().unwrap()];
    let bad_redis = format!("redis://alice:{ALICE_PASSWORD}@127.0.0.1:1/0");
    let unreachable_redis = format!("redis://alice:{ALICE_ENCODED}@127.0.0.1:1/0");
    let bad_database = format!("postgres://u:{PG_PASSWORD}@127.0.0.1:1/db");
    let good_database = postgres_url(&postgres);
    for (redis, database) in [
        (&bad_redis, &bad_database),
        // The workers start, and fail on Redis: their errors reach the coordinator's.
        (&bad_redis, &good_database),
        (&unreachable_redis, &good_database),
    ] {
        let mut args = base.to_vec();
        args.extend(["--redis", redis, "--database", database]);
        args.extend(files);
        let out = strata(&args);
        assert!(!out.status.success(), "check on {redis} and {database} should fail");
        assert_output_has_no_password("check on bad URLs", &out);
        for file in [&json, &history] {
            if file.exists() {
                assert_no_password(&file.display().to_string(), &read(file));
            }
        }
    }
}

/// The parent pid of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The command lines of `parent`'s children, NUL separators made spaces.
fn children_command_lines(parent: u32) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| parent_of(pid) == Some(parent))
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " ").trim().to_owned())
        .filter(|line| !line.is_empty())
        .collect()
}

/// A full `strata check` against a Redis that needs a password (the nemesis's
/// `CLIENT` commands included) with a password in the database URL: it passes, the
/// workers' command lines (read while they run) hold no URL, and nothing it prints or
/// writes shows a password.
#[test]
fn check_with_passwords_keeps_them_off_command_lines_and_reports() {
    let redis = redis_with_passwords();
    let postgres = PostgresServer::start();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("check.json");
    let history = dir.path().join("history.jsonl");
    let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let redis_url = format!("redis://:{DEFAULT_PASSWORD}@127.0.0.1:{}/", redis.port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["check", "--level", "invalidated", "--fault", "subscriber-kill", "--duration", "3"])
        .args(["--instances", "2", "--redis", &redis_url, "--database", &postgres_url(&postgres)])
        .arg("--json")
        .arg(&json)
        .arg("--history")
        .arg(&history)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut command_lines = BTreeSet::new();
    let status = loop {
        command_lines.extend(children_command_lines(child.id()));
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("strata check did not finish in 120 s:\n{}", read(&stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "strata check failed:\n{}\n{}", read(&stdout), read(&stderr));
    let workers: Vec<&String> = command_lines.iter().filter(|l| l.contains("check-worker")).collect();
    assert!(workers.len() >= 2, "both workers were seen running: {command_lines:?}");
    for line in &command_lines {
        assert_no_password("a worker's command line", line);
        assert!(!line.contains("redis://") && !line.contains("postgres://"), "a URL in {line}");
    }
    for file in [&stdout, &stderr, &json, &history] {
        assert_no_password(&file.display().to_string(), &read(file));
    }
    let report: serde_json::Value = serde_json::from_str(&read(&json)).unwrap();
    assert_eq!(report["passed"], true, "{report:#}");
    assert!(report["faults"][0].as_str().unwrap().starts_with("subscriber-kill ("), "{report:#}");
}
