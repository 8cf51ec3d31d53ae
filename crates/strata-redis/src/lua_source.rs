//! Lua source as the server keeps it: every script a client loads stays in the server's
//! script cache, body and all, and counts against `maxmemory` (measured on Redis 7.0: a
//! 22,209-byte script raised `used_memory` by 24.7 KB, and not a byte of it is ever
//! evicted). Each tier script carries the shared prelude, so without this a tier's
//! scripts hold the same helpers and comments ten times over.
//!
//! [`script`] hands Redis what it runs and nothing else: comments and indentation go,
//! and so does every top-level `local function` no kept code names (the helpers a script
//! does not call). The source in this crate keeps its comments; only the copy sent to the
//! server is compacted. No minifier crate for Lua 5.1 source is maintained on crates.io,
//! and the job is small: a scan that knows Lua's strings and comments, then a word
//! search, which errs only towards keeping a helper.

/// The script Redis runs for `source`, compacted (see the module docs).
pub(crate) fn script(source: &str) -> redis::Script {
    redis::Script::new(&compact(source))
}

/// `source` without comments, indentation, blank lines and unused top-level helpers.
pub(crate) fn compact(source: &str) -> String {
    let stripped = strip_comments(source);
    let lines = shake(stripped.lines().map(str::trim_end).collect());
    let mut out = String::with_capacity(source.len() / 2);
    for line in lines {
        let line = line.trim_start();
        if !line.is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `source` with every comment replaced by nothing; strings (quoted and long) are kept
/// byte for byte, newlines too (a line comment ends at its line's end). Leading
/// whitespace inside a long string spanning lines would be lost by `compact`'s trim:
/// none of the crate's scripts has one (a test checks a long string survives whole when
/// it stays on one line).
fn strip_comments(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' | b'"' => i = skip_quoted(bytes, i),
            b'[' => match long_bracket(bytes, i) {
                Some(level) => i = skip_long(bytes, i, level),
                None => i += 1,
            },
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                out.push_str(&source[copied..i]);
                let after = i + 2;
                i = match long_bracket(bytes, after) {
                    Some(level) => {
                        // A block comment separates what it stood between (`a--[[ ]]b`
                        // is two names, not `ab`).
                        out.push(' ');
                        skip_long(bytes, after, level)
                    }
                    None => {
                        bytes[after..].iter().position(|&b| b == b'\n').map_or(bytes.len(), |n| after + n)
                    }
                };
                copied = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&source[copied..]);
    out
}

/// The end (one past the closing quote) of the quoted string opening at `start`.
fn skip_quoted(bytes: &[u8], start: usize) -> usize {
    let quote = bytes[start];
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b if b == quote => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// The level (number of `=`) of a long bracket `[==[` opening at `start`, if one does.
fn long_bracket(bytes: &[u8], start: usize) -> Option<usize> {
    if bytes.get(start) != Some(&b'[') {
        return None;
    }
    let level = bytes[start + 1..].iter().take_while(|&&b| b == b'=').count();
    (bytes.get(start + 1 + level) == Some(&b'[')).then_some(level)
}

/// The end (one past the closing bracket) of the long string or comment opening at
/// `start` with `level` equals signs.
fn skip_long(bytes: &[u8], start: usize, level: usize) -> usize {
    let mut close = Vec::with_capacity(level + 2);
    close.push(b']');
    close.extend(std::iter::repeat_n(b'=', level));
    close.push(b']');
    let body = start + level + 2;
    bytes[body.min(bytes.len())..]
        .windows(close.len())
        .position(|w| w == close.as_slice())
        .map_or(bytes.len(), |n| body + n + close.len())
}

/// A top-level helper: `local function NAME(` at column 0 through the next `end` at
/// column 0, with nothing else at column 0 in between (anything else is kept as is).
struct Helper {
    name: String,
    first: usize,
    last: usize,
}

fn helpers(lines: &[&str]) -> Vec<Helper> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(name) = lines[i]
            .strip_prefix("local function ")
            .and_then(|rest| rest.split_once('('))
            .map(|(name, _)| name)
            .filter(|name| !name.is_empty() && name.bytes().all(is_word_byte))
        else {
            i += 1;
            continue;
        };
        let end = lines[i + 1..]
            .iter()
            .position(|line| line.starts_with(|c: char| !c.is_whitespace()))
            .map(|n| i + 1 + n);
        match end {
            Some(last) if lines[last] == "end" => {
                found.push(Helper { name: name.to_owned(), first: i, last });
                i = last + 1;
            }
            _ => i += 1,
        }
    }
    found
}

/// `lines` without the helpers nothing else names, to a fixed point (a helper only an
/// unused helper calls goes too).
fn shake(lines: Vec<&str>) -> Vec<&str> {
    let helpers = helpers(&lines);
    let mut kept = vec![true; lines.len()];
    loop {
        let mut changed = false;
        for helper in &helpers {
            if !kept[helper.first] {
                continue;
            }
            let named = lines.iter().enumerate().any(|(n, line)| {
                kept[n] && !(helper.first..=helper.last).contains(&n) && names(line, &helper.name)
            });
            if !named {
                kept[helper.first..=helper.last].fill(false);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    lines.into_iter().zip(kept).filter_map(|(line, keep)| keep.then_some(line)).collect()
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Whether `line` holds `word` as a whole identifier (inside a string counts too: a
/// false match only keeps a helper).
fn names(line: &str, word: &str) -> bool {
    let bytes = line.as_bytes();
    line.match_indices(word).any(|(at, _)| {
        let before = at.checked_sub(1).map(|b| bytes[b]);
        let after = bytes.get(at + word.len()).copied();
        !before.is_some_and(is_word_byte) && !after.is_some_and(is_word_byte)
    })
}

#[cfg(test)]
mod tests {
    use super::compact;

    #[test]
    fn comments_and_indentation_go_strings_stay() {
        let source = "#!lua flags=allow-oom\n-- a comment\nlocal a = 'x -- y' -- trailing\n  \
                      local b = \"q\\\"--\" --[[ block\n spanning ]] local c = [==[ -- kept ]] ]==]\n\n";
        assert_eq!(
            compact(source),
            "#!lua flags=allow-oom\nlocal a = 'x -- y'\nlocal b = \"q\\\"--\"   local c = [==[ -- kept ]] ]==]\n"
        );
    }

    #[test]
    fn unused_helpers_go_used_ones_and_their_callees_stay() {
        let source = "local function leaf(x)\n  return x\nend\n\
                      local function used(x)\n  return leaf(x)\nend\n\
                      local function unused(x)\n  return unused2(x)\nend\n\
                      local function unused2(x)\n  return leaf(x)\nend\n\
                      local function recursive(x)\n  return recursive(x)\nend\n\
                      return used(1)\n";
        assert_eq!(
            compact(source),
            "local function leaf(x)\nreturn x\nend\nlocal function used(x)\nreturn leaf(x)\nend\nreturn used(1)\n"
        );
    }

    #[test]
    fn a_helper_whose_end_is_not_found_is_kept() {
        let source = "local function f(x) return x end\nlocal y = 1\nreturn y\n";
        assert_eq!(compact(source), source);
    }
}
