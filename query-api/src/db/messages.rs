//! Reads of `messages`: history pages and single messages, as `MessageView`s.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use parley_schemas::frames::{AttachmentView, MessageView};
use parley_schemas::{ChatId, MessageId, UserId};
use sqlx::types::Json;
use sqlx::{FromRow, PgExecutor, PgPool};
use uuid::Uuid;

use super::{bound, seq};

/// The columns every message read selects, in `MessageRow` order. `reactions` is the
/// projection's summary, `{emoji: [user_id]}` with reactors in the order they reacted (NULL
/// when none).
pub(crate) const MESSAGE_COLUMNS: &str = "message_id, sequence, sender_id, body, reply_to, \
     attachments, sent_at, edited_at, deleted, thread_root, thread_reply_count, last_reply_at, \
     mentions, reactions";

#[derive(FromRow)]
pub(crate) struct MessageRow {
    message_id: Uuid,
    sequence: i64,
    sender_id: Uuid,
    body: Option<String>,
    reply_to: Option<Uuid>,
    attachments: Json<serde_json::Value>,
    sent_at: DateTime<Utc>,
    edited_at: Option<DateTime<Utc>>,
    deleted: bool,
    thread_root: Option<Uuid>,
    thread_reply_count: i64,
    last_reply_at: Option<DateTime<Utc>>,
    mentions: Vec<Uuid>,
    reactions: Option<Json<BTreeMap<String, Vec<UserId>>>>,
}

impl MessageRow {
    pub(crate) fn into_view(self) -> MessageView {
        let message_id = MessageId::from_uuid(self.message_id);
        MessageView {
            message_id,
            sequence: seq(self.sequence),
            sender_id: UserId::from_uuid(self.sender_id),
            // The projector clears the body on deletion; this makes sure no read can show one.
            body: if self.deleted { None } else { self.body },
            reply_to: self.reply_to.map(MessageId::from_uuid),
            attachments: attachments(message_id, self.attachments.0),
            sent_at: self.sent_at,
            edited_at: self.edited_at,
            deleted: self.deleted,
            // The projector drops a deleted message's reactions; never show any on one.
            reactions: match (self.deleted, self.reactions) {
                (false, Some(Json(r))) => r,
                _ => BTreeMap::new(),
            },
            thread_root: self.thread_root.map(MessageId::from_uuid),
            thread_reply_count: seq(self.thread_reply_count),
            last_reply_at: self.last_reply_at,
            mentions: self.mentions.into_iter().map(UserId::from_uuid).collect(),
        }
    }
}

/// The `attachments` column is a JSON array of `AttachmentView`s. One malformed value must not
/// make a whole history page fail, so it is logged and shown as no attachments.
fn attachments(message_id: MessageId, value: serde_json::Value) -> Vec<AttachmentView> {
    match serde_json::from_value(value) {
        Ok(list) => list,
        Err(error) => {
            tracing::warn!(%message_id, %error, "unreadable attachments in the read model");
            Vec::new()
        }
    }
}

/// `$4` is a current member of chat `$1`: uncorrelated, so PostgreSQL evaluates it once per
/// statement (an InitPlan), not per row.
const READER_IS_MEMBER: &str = "EXISTS (SELECT 1 FROM members WHERE chat_id = $1 AND user_id = $4 \
     AND left_seq IS NULL)";

/// Where a history page starts and which way it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cursor {
    /// The newest messages with a sequence below the bound (`u64::MAX`: the newest of all).
    Before(u64),
    /// The oldest messages with a sequence above the bound.
    After(u64),
}

/// One page of history, oldest first; `has_more` says whether the page's direction goes on.
pub(crate) struct Page {
    pub messages: Vec<MessageView>,
    pub has_more: bool,
}

/// Keyset pagination over the primary key `(chat_id, sequence)`: one index range scan, the
/// page size plus one row to learn `has_more`. Rows come only while `reader` is a current
/// member (checked once, in the same statement): a non-empty page is also the access check,
/// and only an empty one leaves "no access" and "no messages there" for the caller to tell
/// apart.
pub(crate) async fn page(
    pg: &PgPool,
    chat: ChatId,
    reader: UserId,
    cursor: Cursor,
    limit: u32,
) -> Result<Page, sqlx::Error> {
    let (sql, bound_seq) = match cursor {
        Cursor::Before(s) => (
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = $1 AND sequence < $2 \
                 AND {READER_IS_MEMBER} ORDER BY sequence DESC LIMIT $3"
            ),
            bound(s),
        ),
        Cursor::After(s) => (
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = $1 AND sequence > $2 \
                 AND {READER_IS_MEMBER} ORDER BY sequence ASC LIMIT $3"
            ),
            bound(s),
        ),
    };
    let mut rows: Vec<MessageRow> = sqlx::query_as(&sql)
        .bind(chat.as_uuid())
        .bind(bound_seq)
        .bind(i64::from(limit) + 1)
        .bind(reader.as_uuid())
        .fetch_all(pg)
        .await?;
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    if matches!(cursor, Cursor::Before(_)) {
        rows.reverse();
    }
    Ok(Page {
        messages: rows.into_iter().map(MessageRow::into_view).collect(),
        has_more,
    })
}

/// One message of the chat by id, if the read model holds it.
pub(crate) async fn by_id(
    pg: &PgPool,
    chat: ChatId,
    message: MessageId,
) -> Result<Option<MessageView>, sqlx::Error> {
    let row: Option<MessageRow> = sqlx::query_as(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = $1 AND message_id = $2"
    ))
    .bind(chat.as_uuid())
    .bind(message.as_uuid())
    .fetch_optional(pg)
    .await?;
    Ok(row.map(MessageRow::into_view))
}

/// The replies of the thread started by `root`, oldest first, with a sequence above `after`:
/// keyset paging over `messages_by_thread`, the page size plus one row to learn `has_more`.
pub(crate) async fn thread_page(
    pg: &PgPool,
    chat: ChatId,
    root: MessageId,
    after: u64,
    limit: u32,
) -> Result<Page, sqlx::Error> {
    let mut rows: Vec<MessageRow> = sqlx::query_as(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages \
         WHERE chat_id = $1 AND thread_root = $2 AND sequence > $3 \
         ORDER BY sequence ASC LIMIT $4"
    ))
    .bind(chat.as_uuid())
    .bind(root.as_uuid())
    .bind(bound(after))
    .bind(i64::from(limit) + 1)
    .fetch_all(pg)
    .await?;
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    Ok(Page {
        messages: rows.into_iter().map(MessageRow::into_view).collect(),
        has_more,
    })
}

/// The messages at the given `(chat, sequence)` positions, in no particular order.
pub(crate) async fn at_positions<'e>(
    db: impl PgExecutor<'e>,
    positions: &[(ChatId, i64)],
) -> Result<Vec<(ChatId, MessageView)>, sqlx::Error> {
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    let chats: Vec<Uuid> = positions.iter().map(|(c, _)| *c.as_uuid()).collect();
    let seqs: Vec<i64> = positions.iter().map(|(_, s)| *s).collect();
    #[derive(FromRow)]
    struct Located {
        chat_id: Uuid,
        #[sqlx(flatten)]
        message: MessageRow,
    }
    let rows: Vec<Located> = sqlx::query_as(&format!(
        "SELECT chat_id, {MESSAGE_COLUMNS} FROM messages \
         WHERE (chat_id, sequence) IN (SELECT * FROM unnest($1::uuid[], $2::bigint[]))"
    ))
    .bind(chats)
    .bind(seqs)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (ChatId::from_uuid(r.chat_id), r.message.into_view()))
        .collect())
}
