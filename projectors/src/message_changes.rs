//! The chats projection's effects of changes to an existing message: edits (with their
//! history), deletion for everyone (which leaves no body anywhere in the read models), and
//! reactions. Each runs inside the batch transaction of `chats::apply`.

use chrono::{DateTime, Utc};
use parley_schemas::MessageId;
use parley_schemas::events::{MessageDeleted, MessageEdited, Reaction};
use uuid::Uuid;

/// The new body (`None`: unreadable, its key is destroyed) replaces the current one, which
/// goes to the history; the generated search column reindexes with the row.
pub(crate) async fn edited(
    tx: &mut sqlx::PgConnection,
    chat_id: Uuid,
    seq: i64,
    e: &MessageEdited,
    body: Option<&str>,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO message_edits (chat_id, sequence, message_id, previous_body, edited_at) \
         SELECT chat_id, $3, message_id, body, $4 FROM messages \
         WHERE chat_id = $1 AND message_id = $2 AND NOT deleted \
         ON CONFLICT DO NOTHING",
    )
    .bind(chat_id)
    .bind(e.message_id.as_uuid())
    .bind(seq)
    .bind(at)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE messages SET body = $3, edited_at = $4 \
         WHERE chat_id = $1 AND message_id = $2 AND NOT deleted",
    )
    .bind(chat_id)
    .bind(e.message_id.as_uuid())
    .bind(body)
    .bind(at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Deleted for everyone: the body, the edit history, the bodies that edits left in the inbox
/// replay (`chat_updates`) and the reactions all go; the row stays, with `deleted`.
pub(crate) async fn deleted(
    tx: &mut sqlx::PgConnection,
    chat_id: Uuid,
    d: &MessageDeleted,
) -> Result<(), sqlx::Error> {
    let message_id = d.message_id.as_uuid();
    sqlx::query(
        "UPDATE chat_updates SET \"update\" = jsonb_set(\"update\", '{body}', 'null'::jsonb) \
         WHERE chat_id = $1 AND \"update\"->>'kind' = 'message_edited' \
           AND \"update\"->>'message_id' = $2::text",
    )
    .bind(chat_id)
    .bind(message_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM message_edits WHERE chat_id = $1 AND message_id = $2")
        .bind(chat_id)
        .bind(message_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM reactions WHERE message_id = $1")
        .bind(message_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE messages SET body = NULL, deleted = true, attachments = '[]', reactions = NULL \
         WHERE chat_id = $1 AND message_id = $2",
    )
    .bind(chat_id)
    .bind(message_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

pub(crate) async fn reaction_added(
    tx: &mut sqlx::PgConnection,
    chat_id: Uuid,
    seq: i64,
    r: &Reaction,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO reactions (message_id, emoji, user_id, chat_id, sequence) \
         SELECT message_id, $3, $4, chat_id, $5 FROM messages \
         WHERE chat_id = $1 AND message_id = $2 AND NOT deleted \
         ON CONFLICT DO NOTHING",
    )
    .bind(chat_id)
    .bind(r.message_id.as_uuid())
    .bind(&r.emoji)
    .bind(r.user_id.as_uuid())
    .bind(seq)
    .execute(&mut *tx)
    .await?;
    summarize_reactions(tx, chat_id, r.message_id).await
}

pub(crate) async fn reaction_removed(
    tx: &mut sqlx::PgConnection,
    chat_id: Uuid,
    r: &Reaction,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM reactions WHERE message_id = $1 AND emoji = $2 AND user_id = $3")
        .bind(r.message_id.as_uuid())
        .bind(&r.emoji)
        .bind(r.user_id.as_uuid())
        .execute(&mut *tx)
        .await?;
    summarize_reactions(tx, chat_id, r.message_id).await
}

/// Rewrites the message's `reactions` summary from its `reactions` rows, which stay the
/// record (decisions read them): reactions are rare next to reads of history, so the
/// aggregation runs once per change here instead of once per message on every page.
async fn summarize_reactions(
    tx: &mut sqlx::PgConnection,
    chat_id: Uuid,
    message_id: MessageId,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE messages SET reactions = \
           (SELECT jsonb_object_agg(emoji, users) FROM \
              (SELECT emoji, jsonb_agg(user_id ORDER BY sequence) AS users FROM reactions \
               WHERE message_id = $2 GROUP BY emoji) per_emoji) \
         WHERE chat_id = $1 AND message_id = $2 AND NOT deleted",
    )
    .bind(chat_id)
    .bind(message_id.as_uuid())
    .execute(&mut *tx)
    .await?;
    Ok(())
}
