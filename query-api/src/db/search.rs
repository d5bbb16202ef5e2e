//! Full-text search over the messages of the caller's current chats (`messages.search`, a
//! generated `tsvector` with a GIN index).

use chrono::{DateTime, Utc};
use parley_schemas::{ChatId, MessageId, UserId};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use super::seq;

/// One hit: where it is and a plain-text snippet with matches between `**`.
pub(crate) struct Hit {
    pub chat_id: ChatId,
    pub message_id: MessageId,
    pub sequence: u64,
    pub snippet: String,
    pub sent_at: DateTime<Utc>,
}

#[derive(FromRow)]
struct HitRow {
    chat_id: Uuid,
    message_id: Uuid,
    sequence: i64,
    snippet: Option<String>,
    sent_at: DateTime<Utc>,
}

/// The best `limit` matches of `q`, best first. `q` is user text parsed by
/// `websearch_to_tsquery`, which accepts any input (quotes, `or`, `-`, stray tsquery or SQL
/// syntax) without raising, and is always a bound parameter. The snippets are made in the
/// outer query, so `ts_headline` (which re-parses the body) runs on the page only.
pub(crate) async fn search(
    pg: &PgPool,
    user: UserId,
    q: &str,
    chat: Option<ChatId>,
    limit: u32,
) -> Result<Vec<Hit>, sqlx::Error> {
    let rows: Vec<HitRow> = sqlx::query_as(
        r#"
        SELECT h.chat_id, h.message_id, h.sequence, h.sent_at,
               ts_headline('simple', h.body, h.query,
                           'StartSel="**", StopSel="**", MaxWords=24, MinWords=8, MaxFragments=2, FragmentDelimiter=" … "') AS snippet
        FROM (
            SELECT m.chat_id, m.message_id, m.sequence, m.sent_at, m.body, q.query,
                   ts_rank(m.search, q.query) AS rank
            FROM websearch_to_tsquery('simple', $2) AS q(query)
            JOIN messages m ON m.search @@ q.query
            JOIN members mb ON mb.chat_id = m.chat_id AND mb.user_id = $1 AND mb.left_seq IS NULL
            WHERE NOT m.deleted AND m.body IS NOT NULL
              AND ($3::uuid IS NULL OR m.chat_id = $3)
            ORDER BY rank DESC, m.sent_at DESC, m.message_id
            LIMIT $4
        ) h
        ORDER BY h.rank DESC, h.sent_at DESC, h.message_id
        "#,
    )
    .bind(user.as_uuid())
    .bind(q)
    .bind(chat.map(|c| *c.as_uuid()))
    .bind(i64::from(limit))
    .fetch_all(pg)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Hit {
            chat_id: ChatId::from_uuid(r.chat_id),
            message_id: MessageId::from_uuid(r.message_id),
            sequence: seq(r.sequence),
            snippet: r.snippet.unwrap_or_default(),
            sent_at: r.sent_at,
        })
        .collect())
}
