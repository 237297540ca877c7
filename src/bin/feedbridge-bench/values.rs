//! The values the writers write: each carries its send time (and, with
//! `--topics`, a topic), so a receiver can tell its latency.

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the epoch (the clock values carry).
pub(crate) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A value of `size` bytes that carries its send time.
pub(crate) fn value(size: usize) -> String {
    value_on(size, None)
}

/// The same naming a topic (the bridge publishes it there).
pub(crate) fn value_on(size: usize, topic: Option<usize>) -> String {
    let topic = topic
        .map(|t| format!("\"topic\":\"t{t}\","))
        .unwrap_or_default();
    let head = format!("{{\"t\":{},{topic}\"pad\":\"", now_nanos());
    let pad = size.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// The send time in a value, if it is one of the writers' values.
pub(crate) fn sent_at(value: &[u8]) -> Option<u64> {
    let rest = value.strip_prefix(b"{\"t\":")?;
    let end = rest.iter().position(|b| *b == b',')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}
