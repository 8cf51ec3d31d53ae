//! History lines of the consistency checker (JSON lines, one event per line, written by
//! every process of a run). No panic; every non-blank line is an event or counted as
//! malformed; the events written out parse back to themselves with nothing malformed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_testkit::history::History;

fuzz_target!(|data: &[u8]| {
    let h = History::parse(data).expect("reading a slice does not fail");
    let lines = data.split(|&b| b == b'\n').filter(|l| !l.trim_ascii().is_empty()).count();
    assert!(h.events.len() + h.malformed <= lines);
    let mut out = Vec::new();
    h.write_to(&mut out).expect("writes to a Vec");
    let again = History::parse(&out[..]).expect("parses");
    assert_eq!(again.malformed, 0);
    assert_eq!(again.events, h.events);
});
