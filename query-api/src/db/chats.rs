//! Reads of `chats` and `members`: a chat's head (for access and freshness), the caller's chat
//! list, and a chat's detail.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use parley_schemas::{ChatId, UserId};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use super::{messages, seq, snapshot};
use crate::chats::{ChannelView, ChatDetailView, ChatSummaryView, MemberView};

/// What access checks need: how far the read model is in the chat, and whether the caller is
/// a current member there.
#[derive(Debug, Clone, Copy, FromRow)]
pub(crate) struct ChatHead {
    last_sequence: i64,
    pub is_member: bool,
}

impl ChatHead {
    pub fn last_sequence(&self) -> u64 {
        seq(self.last_sequence)
    }
}

/// The chat's head as seen by `user`; `None` if the read model does not hold the chat.
pub(crate) async fn head(
    pg: &PgPool,
    chat: ChatId,
    user: UserId,
) -> Result<Option<ChatHead>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.last_sequence, EXISTS (\
             SELECT 1 FROM members m \
             WHERE m.chat_id = c.chat_id AND m.user_id = $2 AND m.left_seq IS NULL\
         ) AS is_member \
         FROM chats c WHERE c.chat_id = $1",
    )
    .bind(chat.as_uuid())
    .bind(user.as_uuid())
    .fetch_optional(pg)
    .await
}

/// The role of `user` in `chat` while a current member.
pub(crate) async fn role(
    pg: &PgPool,
    chat: ChatId,
    user: UserId,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT role FROM members WHERE chat_id = $1 AND user_id = $2 AND left_seq IS NULL",
    )
    .bind(chat.as_uuid())
    .bind(user.as_uuid())
    .fetch_optional(pg)
    .await
}

#[derive(FromRow)]
struct SummaryRow {
    chat_id: Uuid,
    kind: String,
    title: Option<String>,
    last_sequence: i64,
    last_message_seq: Option<i64>,
    unread_count: i64,
    muted: bool,
    notify: String,
}

/// The chats `user` is a current member of, most recent activity first, each with its last
/// message and the count of others' live messages above the user's read watermark. Mute and
/// notify come from `member_settings` (the user's own events), else the `members` defaults.
pub(crate) async fn list(pg: &PgPool, user: UserId) -> Result<Vec<ChatSummaryView>, sqlx::Error> {
    let mut tx = snapshot(pg).await?;
    let rows: Vec<SummaryRow> = sqlx::query_as(
        "SELECT c.chat_id, c.kind, c.title, c.last_sequence, c.last_message_seq, \
                COALESCE(s.muted, m.muted) AS muted, COALESCE(s.notify, m.notify) AS notify, \
                (SELECT count(*) FROM messages x \
                 WHERE x.chat_id = c.chat_id AND x.sequence > m.read_up_to \
                   AND x.sender_id <> m.user_id AND NOT x.deleted) AS unread_count \
         FROM members m JOIN chats c ON c.chat_id = m.chat_id \
         LEFT JOIN member_settings s ON s.user_id = m.user_id AND s.chat_id = m.chat_id \
         WHERE m.user_id = $1 AND m.left_seq IS NULL \
         ORDER BY c.last_activity_at DESC, c.chat_id DESC",
    )
    .bind(user.as_uuid())
    .fetch_all(&mut *tx)
    .await?;
    let positions: Vec<(ChatId, i64)> = rows
        .iter()
        .filter_map(|r| Some((ChatId::from_uuid(r.chat_id), r.last_message_seq?)))
        .collect();
    let mut last: HashMap<ChatId, _> = messages::at_positions(&mut *tx, &positions)
        .await?
        .into_iter()
        .collect();
    tx.commit().await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let chat_id = ChatId::from_uuid(r.chat_id);
            ChatSummaryView {
                chat_id,
                kind: r.kind,
                title: r.title,
                last_sequence: seq(r.last_sequence),
                last_message: last.remove(&chat_id),
                unread_count: seq(r.unread_count),
                muted: r.muted,
                notify: r.notify,
            }
        })
        .collect())
}

#[derive(FromRow)]
struct ChatRow {
    chat_id: Uuid,
    kind: String,
    title: Option<String>,
    created_at: DateTime<Utc>,
    last_sequence: i64,
    visibility: String,
}

#[derive(FromRow)]
struct MemberRow {
    user_id: Uuid,
    handle: Option<String>,
    display_name: Option<String>,
    role: String,
}

/// The chat with its current members in joining order; `None` if the read model lacks it.
pub(crate) async fn detail(
    pg: &PgPool,
    chat: ChatId,
) -> Result<Option<ChatDetailView>, sqlx::Error> {
    let mut tx = snapshot(pg).await?;
    let row: Option<ChatRow> = sqlx::query_as(
        "SELECT chat_id, kind, title, created_at, last_sequence, visibility FROM chats \
         WHERE chat_id = $1",
    )
    .bind(chat.as_uuid())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    // A LEFT JOIN: a member whose user is not projected yet is still a member.
    let members: Vec<MemberRow> = sqlx::query_as(
        "SELECT m.user_id, u.handle, u.display_name, m.role \
         FROM members m LEFT JOIN users u ON u.user_id = m.user_id \
         WHERE m.chat_id = $1 AND m.left_seq IS NULL \
         ORDER BY m.joined_seq, m.user_id",
    )
    .bind(chat.as_uuid())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(ChatDetailView {
        chat_id: ChatId::from_uuid(row.chat_id),
        kind: row.kind,
        title: row.title,
        created_at: row.created_at,
        last_sequence: seq(row.last_sequence),
        visibility: row.visibility,
        members: members
            .into_iter()
            .map(|m| MemberView {
                user_id: UserId::from_uuid(m.user_id),
                handle: m.handle,
                display_name: m.display_name,
                role: m.role,
            })
            .collect(),
    }))
}

#[derive(FromRow)]
struct ChannelRow {
    chat_id: Uuid,
    title: Option<String>,
    created_at: DateTime<Utc>,
    member_count: i64,
    is_member: bool,
}

/// Public channels whose title contains `q` (case-insensitive; every one without `q`), most
/// recent activity first, at most `limit`.
pub(crate) async fn public_channels(
    pg: &PgPool,
    user: UserId,
    q: Option<&str>,
    limit: u32,
) -> Result<Vec<ChannelView>, sqlx::Error> {
    // LIKE metacharacters in the query are taken literally.
    let pattern = q.map(|q| {
        let escaped = q
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        format!("%{escaped}%")
    });
    let rows: Vec<ChannelRow> = sqlx::query_as(
        "SELECT c.chat_id, c.title, c.created_at, \
                (SELECT count(*) FROM members m WHERE m.chat_id = c.chat_id AND m.left_seq IS NULL) \
                    AS member_count, \
                EXISTS (SELECT 1 FROM members m WHERE m.chat_id = c.chat_id AND m.user_id = $1 \
                        AND m.left_seq IS NULL) AS is_member \
         FROM chats c \
         WHERE c.visibility = 'public' AND ($2::text IS NULL OR c.title ILIKE $2) \
         ORDER BY c.last_activity_at DESC, c.chat_id DESC LIMIT $3",
    )
    .bind(user.as_uuid())
    .bind(pattern)
    .bind(i64::from(limit))
    .fetch_all(pg)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ChannelView {
            chat_id: ChatId::from_uuid(r.chat_id),
            title: r.title,
            created_at: r.created_at,
            member_count: seq(r.member_count),
            is_member: r.is_member,
        })
        .collect())
}
