//! The Lua scripts of the stream backplane: numbering and appending an entry, and the
//! reads that must see the stream and its counter at the same instant.

/// Stream backplane publish: number the entry, append it, cap the stream.
///
/// KEYS: stream, counter. ARGV: max len, message bytes. Returns the entry's number.
pub(crate) const STREAM_PUBLISH: &str = r#"
local n = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'm', ARGV[2], 'n', n)
return n
"#;

/// Where a new subscriber starts: the last entry's id and the counter, atomically.
///
/// KEYS: stream, counter. Returns {last id or '0-0', counter}.
pub(crate) const STREAM_START: &str = r#"
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local id = '0-0'
if #last > 0 then id = last[1][1] end
return {id, redis.call('GET', KEYS[2]) or '0'}
"#;

/// Catch-up read after a reconnect: entries after the last id seen, and the counter,
/// atomically (so a trailing loss is told apart from a publish racing the read).
///
/// KEYS: stream, counter. ARGV: last id, count. Returns {counter, entries}.
pub(crate) const STREAM_CATCH_UP: &str = r#"
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
return {redis.call('GET', KEYS[2]) or '0', entries}
"#;
