//! The SQL of the query API: one module per read model it reads, each returning the views the
//! HTTP modules serve. Runtime-checked queries (`query_as` + `FromRow`), as there is no database
//! at compile time.

pub(crate) mod chats;
pub(crate) mod messages;
pub(crate) mod search;
pub(crate) mod users;

use sqlx::{PgPool, Postgres, Transaction};

pub(crate) use parley_platform::seq::{from_db as seq, to_db as bound};

/// A read-only transaction that sees one snapshot, for answers assembled from several queries
/// (a chat and its members must describe the same moment).
pub(crate) async fn snapshot(pg: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pg.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}
