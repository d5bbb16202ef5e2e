//! The device's inbox in PostgreSQL: which chats it follows from which cursor, and the events
//! above a cursor (`messages` ∪ `chat_updates`) rendered as the frames live delivery sends.
//! The socket's catch-up and the HTTP inbox (`GET /v1/inbox`) both read it through here.

use std::collections::BTreeMap;

use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, Utc};
use parley_nats::subjects;
use parley_platform::seq::{from_db as seq, to_db as db_seq};
use parley_schemas::frames::{AttachmentView, Change, ChatUpdate, MessageView, ServerFrame};
use parley_schemas::{ChatId, DeviceId, MessageId, UserId};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::wire::SequenceOnly;

/// Rows per catch-up query.
pub(crate) const BATCH: usize = 500;

/// A chat the device must follow, and from where.
#[derive(Debug, Clone)]
pub(crate) struct Membership {
    pub chat: ChatId,
    pub joined_seq: u64,
    pub left_seq: Option<u64>,
    /// The device's effective cursor: its ack, or just before the user joined.
    pub cursor: u64,
    /// The read model's version of the chat: events up to here are known to exist.
    pub last_sequence: u64,
}

/// The user's current chats, plus chats it left whose removal the device has not acked yet
/// (so that removal is still delivered).
pub(crate) async fn memberships(
    pg: &PgPool,
    user: UserId,
    device: DeviceId,
) -> Result<Vec<Membership>, sqlx::Error> {
    let rows = sqlx::query(
        r#"
        SELECT m.chat_id, m.joined_seq, m.left_seq,
               GREATEST(COALESCE(d.acked_up_to, 0), m.joined_seq - 1) AS cursor,
               COALESCE(c.last_sequence, 0) AS last_sequence
        FROM members m
        LEFT JOIN device_cursors d ON d.device_id = $2 AND d.chat_id = m.chat_id
        LEFT JOIN chats c ON c.chat_id = m.chat_id
        WHERE m.user_id = $1
          AND (m.left_seq IS NULL
               OR m.left_seq > GREATEST(COALESCE(d.acked_up_to, 0), m.joined_seq - 1))
        "#,
    )
    .bind(user.as_uuid())
    .bind(device.as_uuid())
    .fetch_all(pg)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Membership {
                chat: ChatId::from_uuid(row.try_get("chat_id")?),
                joined_seq: seq(row.try_get("joined_seq")?),
                left_seq: row.try_get::<Option<i64>, _>("left_seq")?.map(seq),
                cursor: seq(row.try_get("cursor")?),
                last_sequence: seq(row.try_get("last_sequence")?),
            })
        })
        .collect()
}

/// The device's ack in one chat (0 when it never acked).
pub(crate) async fn acked_up_to(
    pg: &PgPool,
    device: DeviceId,
    chat: ChatId,
) -> Result<u64, sqlx::Error> {
    let acked: Option<i64> = sqlx::query_scalar(
        "SELECT acked_up_to FROM device_cursors WHERE device_id = $1 AND chat_id = $2",
    )
    .bind(device.as_uuid())
    .bind(chat.as_uuid())
    .fetch_optional(pg)
    .await?;
    Ok(acked.map_or(0, seq))
}

/// Where a page of the HTTP inbox ends: the next page starts after this event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub chat: ChatId,
    pub sequence: u64,
}

/// A page of the device's inbox, chat by chat (in chat id order), each chat in sequence order.
#[derive(Debug)]
pub(crate) struct Page {
    pub events: Vec<Replayed>,
    /// Set when more events wait after the last one of this page.
    pub next: Option<Position>,
}

/// Up to `limit` (at most [`BATCH`]) events the device has not acked, after `after` when
/// paging: exactly what a socket would replay, a chat's events contiguous from its cursor
/// and ending at the user's removal.
pub(crate) async fn page(
    pg: &PgPool,
    user: UserId,
    device: DeviceId,
    after: Option<Position>,
    limit: usize,
) -> Result<Page, sqlx::Error> {
    let limit = limit.clamp(1, BATCH);
    let mut chats = memberships(pg, user, device).await?;
    chats.sort_by_key(|m| *m.chat.as_uuid());
    let mut events = Vec::new();
    let mut more = false;
    for m in chats {
        let mut from = m.cursor.saturating_add(1);
        if let Some(after) = after {
            if m.chat.as_uuid() < after.chat.as_uuid() {
                continue;
            }
            if m.chat == after.chat {
                from = from.max(after.sequence.saturating_add(1));
            }
        }
        let last = m.left_seq.unwrap_or(m.last_sequence);
        if from > last {
            continue;
        }
        if events.len() == limit {
            more = true;
            break;
        }
        let rows = self::events(pg, m.chat, from, m.left_seq, limit - events.len()).await?;
        let mut expected = from;
        for row in rows {
            // Only the contiguous run: a hole (never expected from the projector) stops the
            // chat here rather than skip an event.
            if row.sequence != expected {
                break;
            }
            expected += 1;
            events.push((m.chat, row));
        }
        if events.len() == limit && expected <= last {
            more = true;
            break;
        }
    }
    let next = if more {
        events.last().map(|(chat, r)| Position {
            chat: *chat,
            sequence: r.sequence,
        })
    } else {
        None
    };
    Ok(Page {
        events: events.into_iter().map(|(_, r)| r).collect(),
        next,
    })
}

/// The user's membership of a chat, current or past: `(joined_seq, left_seq)`.
pub(crate) async fn membership(
    pg: &PgPool,
    user: UserId,
    chat: ChatId,
) -> Result<Option<(u64, Option<u64>)>, sqlx::Error> {
    let row: Option<(i64, Option<i64>)> = sqlx::query_as(
        "SELECT joined_seq, left_seq FROM members WHERE chat_id = $1 AND user_id = $2",
    )
    .bind(chat.as_uuid())
    .bind(user.as_uuid())
    .fetch_optional(pg)
    .await?;
    Ok(row.map(|(j, l)| (seq(j), l.map(seq))))
}

/// The chat's latest stored sequence, read from the stream (the read model may lag it).
pub(crate) async fn stream_head(
    stream: &Stream<()>,
    chat: ChatId,
) -> Result<u64, async_nats::jetstream::stream::LastRawMessageError> {
    match stream
        .get_last_raw_message_by_subject(&subjects::chat(chat))
        .await
    {
        Ok(msg) => Ok(serde_json::from_slice::<SequenceOnly>(&msg.payload)
            .map(|s| s.sequence)
            .unwrap_or(0)),
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(0),
        Err(e) => Err(e),
    }
}

/// One event read back from the read model, ready to send.
#[derive(Debug, Clone)]
pub(crate) struct Replayed {
    pub sequence: u64,
    pub frame: Utf8Bytes,
    pub removed: Vec<UserId>,
}

/// Up to `limit` events of `chat` with `from <= sequence <= to`, in sequence order. Missing
/// sequences are simply absent: the caller sends only the contiguous run it expects.
pub(crate) async fn events(
    pg: &PgPool,
    chat: ChatId,
    from: u64,
    to: Option<u64>,
    limit: usize,
) -> Result<Vec<Replayed>, sqlx::Error> {
    let rows = sqlx::query(
        r#"
        SELECT * FROM (
            (SELECT sequence, message_id, sender_id, body, reply_to, attachments,
                    sent_at, edited_at, deleted, thread_root, thread_reply_count,
                    last_reply_at, mentions, NULL::jsonb AS "update", reactions
             FROM messages
             WHERE chat_id = $1 AND sequence BETWEEN $2 AND $3
             ORDER BY sequence LIMIT $4)
            UNION ALL
            (SELECT sequence, NULL::uuid, NULL::uuid, NULL::text, NULL::uuid, NULL::jsonb,
                    NULL::timestamptz, NULL::timestamptz, NULL::boolean, NULL::uuid,
                    NULL::bigint, NULL::timestamptz, NULL::uuid[], "update", NULL::jsonb
             FROM chat_updates
             WHERE chat_id = $1 AND sequence BETWEEN $2 AND $3
             ORDER BY sequence LIMIT $4)
        ) e
        ORDER BY sequence
        LIMIT $4
        "#,
    )
    .bind(chat.as_uuid())
    .bind(db_seq(from))
    .bind(to.map_or(i64::MAX, db_seq))
    .bind(limit.clamp(1, BATCH) as i64)
    .fetch_all(pg)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let sequence = seq(row.try_get("sequence")?);
        let update: Option<serde_json::Value> = row.try_get("update")?;
        out.push(match update {
            Some(update) => update_frame(chat, sequence, update),
            None => message_frame(chat, sequence, row)?,
        });
    }
    Ok(out)
}

fn message_frame(
    chat: ChatId,
    sequence: u64,
    row: &sqlx::postgres::PgRow,
) -> Result<Replayed, sqlx::Error> {
    let attachments: Option<serde_json::Value> = row.try_get("attachments")?;
    let message = MessageView {
        message_id: MessageId::from_uuid(row.try_get::<Uuid, _>("message_id")?),
        sequence,
        sender_id: UserId::from_uuid(row.try_get::<Uuid, _>("sender_id")?),
        body: row.try_get("body")?,
        reply_to: row
            .try_get::<Option<Uuid>, _>("reply_to")?
            .map(MessageId::from_uuid),
        // The projector owns this column's shape; anything that is not a list of attachment
        // views renders as none rather than failing the whole replay.
        attachments: attachments
            .and_then(|a| serde_json::from_value::<Vec<AttachmentView>>(a).ok())
            .unwrap_or_default(),
        sent_at: row.try_get::<DateTime<Utc>, _>("sent_at")?,
        edited_at: row.try_get("edited_at")?,
        deleted: row.try_get::<Option<bool>, _>("deleted")?.unwrap_or(false),
        // `{emoji: [user_id]}`, reactors in the order they reacted; anything else (never
        // written by the projector) renders as no reactions rather than failing the replay.
        reactions: row
            .try_get::<Option<serde_json::Value>, _>("reactions")?
            .and_then(|r| serde_json::from_value::<BTreeMap<String, Vec<UserId>>>(r).ok())
            .unwrap_or_default(),
        thread_root: row
            .try_get::<Option<Uuid>, _>("thread_root")?
            .map(MessageId::from_uuid),
        thread_reply_count: row
            .try_get::<Option<i64>, _>("thread_reply_count")?
            .map_or(0, seq),
        last_reply_at: row.try_get("last_reply_at")?,
        mentions: row
            .try_get::<Option<Vec<Uuid>>, _>("mentions")?
            .unwrap_or_default()
            .into_iter()
            .map(UserId::from_uuid)
            .collect(),
    };
    let frame = ServerFrame::NewMessage {
        chat_id: chat,
        sequence,
        message: &message,
    }
    .to_json();
    Ok(Replayed {
        sequence,
        frame: frame.into(),
        removed: Vec::new(),
    })
}

/// Just enough of an update to know whom it removes, for kinds this build cannot parse fully.
#[derive(Deserialize)]
struct RemovalOnly {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    removed: Vec<UserId>,
}

#[derive(Serialize)]
struct RawChatUpdateFrame<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    chat_id: ChatId,
    sequence: u64,
    update: &'a serde_json::Value,
}

fn update_frame(chat: ChatId, sequence: u64, update: serde_json::Value) -> Replayed {
    match ChatUpdate::deserialize(&update) {
        Ok(parsed) => {
            let removed = match &parsed.change {
                Change::ParticipantsModified { removed, .. } => removed.clone(),
                _ => Vec::new(),
            };
            let frame = ServerFrame::ChatUpdate {
                chat_id: chat,
                sequence,
                update: &parsed,
            }
            .to_json();
            Replayed {
                sequence,
                frame: frame.into(),
                removed,
            }
        }
        Err(_) => {
            // A kind added after this build (a newer projector wrote it): pass it through as the
            // projector rendered it rather than hold up the chat.
            let removed = serde_json::from_value::<RemovalOnly>(update.clone())
                .ok()
                .filter(|r| r.kind == "participants_modified")
                .map(|r| r.removed)
                .unwrap_or_default();
            let frame = serde_json::to_string(&RawChatUpdateFrame {
                ty: "chatUpdate",
                chat_id: chat,
                sequence,
                update: &update,
            })
            .unwrap_or_default();
            Replayed {
                sequence,
                frame: frame.into(),
                removed,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_update_kind_passes_through_and_still_reports_removals() {
        let user = UserId::new();
        let chat = ChatId::new();
        let update = serde_json::json!({"kind": "title_changed", "title": "x", "actor": user, "at": "2026-01-01T00:00:00Z"});
        let r = update_frame(chat, 4, update.clone());
        let v: serde_json::Value = serde_json::from_str(&r.frame).unwrap();
        assert_eq!(v["type"], "chatUpdate");
        assert_eq!(v["update"], update);
        assert!(r.removed.is_empty());
    }

    #[test]
    fn a_participants_update_reports_whom_it_removes() {
        let user = UserId::new();
        let update = serde_json::json!({"kind": "participants_modified", "added": [], "removed": [user], "promoted": [], "actor": user, "at": "2026-01-01T00:00:00Z"});
        let r = update_frame(ChatId::new(), 9, update);
        assert_eq!(r.removed, vec![user]);
        let v: serde_json::Value = serde_json::from_str(&r.frame).unwrap();
        assert_eq!(v["sequence"], 9);
        assert_eq!(v["update"]["kind"], "participants_modified");
    }
}
