//! `strata stats`: what Redis tells about a namespace, read-only: the meta hash (clock,
//! epochs, tag epochs), the number of entries (a bounded `SCAN`), the backplane
//! stream's length and last id, and the backplane subscribers connected.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use clap::Args;
use redis::aio::MultiplexedConnection;
use serde::Serialize;

use super::{Target, namespace_base};

/// Arguments of `strata stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Where the namespace lives.
    #[command(flatten)]
    pub target: Target,
    /// Stop counting entries after this many (the count is a `SCAN` of the namespace).
    #[arg(long, default_value_t = 1_000_000)]
    pub scan_cap: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `strata stats` reports (`--json` prints it as is).
#[derive(Debug, Serialize)]
pub struct NamespaceStats {
    /// The namespace.
    pub namespace: String,
    /// Whether the namespace's meta hash exists (it is created by the first write).
    pub meta_present: bool,
    /// The namespace's invalidation clock (`c`).
    pub clock: Option<u64>,
    /// The namespace epoch (`n`): the clock value of the last namespace invalidation.
    pub namespace_epoch: Option<u64>,
    /// Tags invalidated since the last namespace invalidation (`t:<tag>` fields).
    pub tag_epochs: u64,
    /// Entry keys found (live or not yet expired; at most `scan_cap`).
    pub entries: u64,
    /// True when the count stopped at `scan_cap`.
    pub entries_capped: bool,
    /// The backplane stream (shared by every namespace under the prefix).
    pub stream: String,
    /// Messages the stream holds.
    pub stream_length: u64,
    /// Id of the newest message, if any.
    pub stream_last_id: Option<String>,
    /// Instances with a live backplane subscription on this Redis (distinct
    /// `strata-bp-<id>` client names; every prefix and namespace counted).
    pub backplane_subscribers: u64,
}

/// One `XREVRANGE` entry: its id and field/value pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Runs `strata stats`.
pub async fn run(args: StatsArgs) -> Result<()> {
    let stats = collect(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print_text(&stats);
    }
    Ok(())
}

async fn collect(args: &StatsArgs) -> Result<NamespaceStats> {
    let redis = &args.target.redis;
    let base = namespace_base(redis, &args.target.prefix, &args.target.namespace).await?;
    let client = redis::Client::open(redis.expose()).with_context(|| format!("bad Redis URL {redis}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("cannot connect to Redis at {redis}"))?;
    let meta: Vec<(String, String)> =
        redis::cmd("HGETALL").arg(format!("{base}m")).query_async(&mut conn).await.context("HGETALL meta")?;
    let field = |name: &str| meta.iter().find(|(f, _)| f == name).and_then(|(_, v)| v.parse().ok());
    let (entries, entries_capped) = count_entries(&mut conn, &base, args.scan_cap).await?;
    let stream = format!("{}:{{bp}}", args.target.prefix);
    let stream_length: u64 = redis::cmd("XLEN").arg(&stream).query_async(&mut conn).await.context("XLEN")?;
    let last: Vec<StreamEntry> = redis::cmd("XREVRANGE")
        .arg(&stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .context("XREVRANGE")?;
    let clients: String =
        redis::cmd("CLIENT").arg("LIST").query_async(&mut conn).await.context("CLIENT LIST")?;
    Ok(NamespaceStats {
        namespace: args.target.namespace.clone(),
        meta_present: !meta.is_empty(),
        clock: field("c"),
        namespace_epoch: field("n"),
        tag_epochs: meta.iter().filter(|(f, _)| f.starts_with("t:")).count() as u64,
        entries,
        entries_capped,
        stream,
        stream_length,
        stream_last_id: last.into_iter().next().map(|(id, _)| id),
        backplane_subscribers: subscribers(&clients),
    })
}

/// Counts `…e:*` keys with `SCAN`, stopping at `cap`.
async fn count_entries(conn: &mut MultiplexedConnection, base: &str, cap: u64) -> Result<(u64, bool)> {
    let pattern = format!("{}e:*", glob_escape(base));
    let (mut cursor, mut n) = (0u64, 0u64);
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .context("SCAN")?;
        n += keys.len() as u64;
        if n >= cap {
            return Ok((cap, true));
        }
        if next == 0 {
            return Ok((n, false));
        }
        cursor = next;
    }
}

/// Escapes the characters `SCAN MATCH` gives a meaning to.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Distinct backplane instances among `CLIENT LIST`'s connection names
/// (`strata-bp-<8 hex digits>-<k>`, one per subscription).
fn subscribers(client_list: &str) -> u64 {
    let ids: BTreeSet<&str> = client_list
        .lines()
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("name=")))
        .filter_map(|name| name.strip_prefix("strata-bp-"))
        .map(|rest| rest.split('-').next().unwrap_or(rest))
        .collect();
    ids.len() as u64
}

fn print_text(s: &NamespaceStats) {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    println!("namespace {:?}", s.namespace);
    if s.meta_present {
        println!("  clock            {}", opt(s.clock));
        println!("  namespace epoch  {}", opt(s.namespace_epoch));
        println!("  tag epochs       {}", s.tag_epochs);
    } else {
        println!("  meta hash        absent (nothing written or invalidated yet)");
    }
    let capped = if s.entries_capped { " (capped: at least)" } else { "" };
    println!("  entries          {}{capped}", s.entries);
    println!(
        "  stream           {} ({} messages, last id {})",
        s.stream,
        s.stream_length,
        s.stream_last_id.as_deref().unwrap_or("-")
    );
    println!("  subscribers      {} backplane instance(s) connected", s.backplane_subscribers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_are_counted_once_per_instance() {
        let list = "id=1 addr=x name=strata-bp-0000abcd-0 db=0\nid=2 name=strata-bp-0000abcd-1 db=0\n\
                    id=3 name=strata-bp-12345678-0 db=0\nid=4 name= db=0\nid=5 name=other db=0\n";
        assert_eq!(subscribers(list), 2);
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("strata:{a*b}:"), "strata:{a\\*b}:");
    }
}
