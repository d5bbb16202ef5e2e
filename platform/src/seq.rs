//! Chat sequences between the API's `u64` and PostgreSQL's `bigint`.

/// A sequence as `bigint`. Beyond `i64::MAX` nothing exists, so saturating keeps every
/// comparison right.
pub fn to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored sequence as `u64`. Sequences are never negative; a negative one would be a
/// projector bug, shown as 0 rather than failing the read.
pub fn from_db(v: i64) -> u64 {
    u64::try_from(v).unwrap_or_default()
}
