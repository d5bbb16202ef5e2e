//! The SQL of the query API: one module per read model it reads, each returning the views the
//! HTTP modules serve. Runtime-checked queries (`query_as` + `FromRow`), as there is no database
//! at compile time.

pub(crate) mod chats;
pub(crate) mod messages;
pub(crate) mod search;
pub(crate) mod users;

use sqlx::{PgPool, Postgres, Transaction};

/// Sequences are `bigint` in PostgreSQL and never negative; a negative one would be a projector
/// bug, shown as 0 rather than failing the read.
pub(crate) fn seq(v: i64) -> u64 {
    u64::try_from(v).unwrap_or_default()
}

/// A sequence bound from the API (u64) as PostgreSQL's `bigint`; beyond `i64::MAX` nothing
/// exists, so saturating keeps every comparison right.
pub(crate) fn bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A read-only transaction that sees one snapshot, for answers assembled from several queries
/// (a chat and its members must describe the same moment).
pub(crate) async fn snapshot(pg: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pg.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}
