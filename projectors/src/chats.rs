//! The chats projection: `chats`, `members`, `messages`, `message_edits`, `reactions` and
//! `chat_updates` from the `CHATS` stream. `chats.last_sequence` is the per-chat checkpoint: an
//! event applies only when it is exactly the next one, so redelivery changes nothing and a gap
//! is never papered over.
//!
//! Sealed bodies (ADR 7) are opened with their message keys before the batch's transaction; a
//! key already destroyed opens nothing, so a rebuilt projection never shows a deleted body.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use parley_nats::{KeyError, MessageKeys};
use parley_schemas::frames::{self, AttachmentView, ChatItem};
use parley_schemas::{ChatEvent, ChatId, StoredEvent};
use sqlx::PgPool;
use uuid::Uuid;

use crate::activity;
use crate::runner::{Delivered, Disposition, Versions, checkpoint, decode_all};

/// Why a batch could not be applied (it is redelivered).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Keys(#[from] KeyError),
}

/// Message keys fetched at once per batch (each is one KV read unless cached).
const KEY_FETCHES_IN_FLIGHT: usize = 16;

struct MessageRow {
    chat_id: Uuid,
    sequence: i64,
    message_id: Uuid,
    sender_id: Uuid,
    body: Option<String>,
    reply_to: Option<Uuid>,
    sent_at: DateTime<Utc>,
    thread_root: Option<Uuid>,
    mentions: Vec<Uuid>,
    /// As history shows them (`AttachmentView`s).
    attachments: Vec<AttachmentView>,
}

struct ChatProgress {
    sequence: i64,
    at: DateTime<Utc>,
    last_message_seq: Option<i64>,
}

/// A batch ready for its transaction: decoded, its sealed bodies opened, its deleted messages'
/// keys destroyed.
pub struct Prepared {
    batch: Vec<Delivered>,
    events: Vec<Option<StoredEvent<ChatEvent>>>,
    opened: Vec<Option<String>>,
}

/// Whether a batch's transaction also records the activity rollup ([`activity::record_chats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollup {
    /// The live projector: one delivery and one transaction serve both projections.
    Record,
    /// A rebuild of the read models: its scratch schema holds their tables only, and the
    /// activity tables rebuild on their own (`projections rebuild activity`).
    Skip,
}

/// Prepares and applies one batch, without the activity rollup (as a rebuild does).
pub async fn apply(
    pg: &PgPool,
    keys: &MessageKeys,
    batch: Vec<Delivered>,
    out_of_order_delay: Duration,
) -> Result<Vec<Disposition>, ApplyError> {
    let prepared = prepare(keys, batch).await?;
    apply_prepared(pg, prepared, out_of_order_delay, Rollup::Skip).await
}

/// The key reads of a batch, which need no transaction: the runner does them for the next
/// batches, concurrently, while the current one is applied (`Runner::run_staged`). Preparing
/// twice (a redelivery) is harmless: opening reads, destroying is idempotent, and a body whose
/// key a later batch destroyed meanwhile is stored as deleted, which its deletion event makes
/// it.
pub async fn prepare(keys: &MessageKeys, batch: Vec<Delivered>) -> Result<Prepared, KeyError> {
    let events = decode_all::<ChatEvent>("chats", &batch);
    let opened = open_bodies(keys, &events).await?;
    destroy_deleted_keys(keys, &events).await?;
    Ok(Prepared {
        batch,
        events,
        opened,
    })
}

/// The live projector's apply: the batch's transaction, with the activity rollup, then the
/// membership notices of the events it holds (`fanout`), before the runner acks the batch. A
/// rebuild applies without either (`apply`): history is no news to a gateway.
pub async fn apply_and_announce(
    pg: &PgPool,
    nats: &async_nats::Client,
    prepared: Prepared,
    out_of_order_delay: Duration,
) -> Result<Vec<Disposition>, ApplyError> {
    let notices = crate::fanout::notices(&prepared.events);
    let applied = apply_prepared(pg, prepared, out_of_order_delay, Rollup::Record).await?;
    crate::fanout::publish(nats, notices, &applied).await;
    Ok(applied)
}

/// The batch's transaction: its effects and its checkpoints, all or nothing. With
/// [`Rollup::Record`] an event is acked only once both projections hold it.
pub async fn apply_prepared(
    pg: &PgPool,
    prepared: Prepared,
    out_of_order_delay: Duration,
    rollup: Rollup,
) -> Result<Vec<Disposition>, ApplyError> {
    let Prepared {
        batch,
        events,
        opened,
    } = prepared;
    let mut tx = pg.begin().await?;
    // Lock the chats of this batch so two projector instances never interleave on one chat.
    let mut versions = Versions::lock(
        &mut tx,
        "SELECT chat_id, last_sequence FROM chats WHERE chat_id = ANY($1) ORDER BY chat_id FOR UPDATE",
        &events,
        out_of_order_delay,
    )
    .await?;
    let mut progress: HashMap<Uuid, ChatProgress> = HashMap::new();
    let mut messages: Vec<MessageRow> = Vec::new();
    let mut out = Vec::with_capacity(events.len());
    for (event, opened) in events.iter().zip(&opened) {
        let (chat_id, event) = match versions.admit(event) {
            Ok(admitted) => admitted,
            Err(d) => {
                out.push(d);
                continue;
            }
        };
        let seq = event.meta.sequence as i64;
        let is_message =
            apply_one(&mut tx, chat_id, event, opened.as_deref(), &mut messages).await?;
        versions.advance(chat_id, seq);
        let p = progress.entry(chat_id).or_insert(ChatProgress {
            sequence: seq,
            at: event.meta.time,
            last_message_seq: None,
        });
        p.sequence = seq;
        p.at = event.meta.time;
        if is_message {
            p.last_message_seq = Some(seq);
        }
        out.push(Disposition::Ack);
    }
    insert_messages(&mut tx, &messages).await?;
    update_chats(&mut tx, &progress).await?;
    if rollup == Rollup::Record {
        let recorded = activity::record_chats(&mut tx, &events, out_of_order_delay).await?;
        for (mine, theirs) in out.iter_mut().zip(recorded) {
            *mine = mine.and(theirs);
        }
    }
    checkpoint(&mut tx, "chats", &batch).await?;
    tx.commit().await?;
    Ok(out)
}

/// The plaintext of every sealed body in the batch (`None` where there is none, or its key is
/// destroyed), fetched concurrently before the transaction.
async fn open_bodies(
    keys: &MessageKeys,
    events: &[Option<StoredEvent<ChatEvent>>],
) -> Result<Vec<Option<String>>, KeyError> {
    // The keys of the batch's new messages first, all at once: every key block they name, and
    // for a backlog of keys of their own one scan. What that misses and edits' keys (made when
    // their message was sent) are read one by one below, from the cache where possible.
    let wanted: Vec<_> = events
        .iter()
        .flatten()
        .filter_map(|e| match &e.event {
            ChatEvent::MessageSentV2(m) => Some((chat_of(e)?, m.message_id, m.sealed_body.key)),
            _ => None,
        })
        .collect();
    keys.prefetch(&wanted).await;
    // Futures built up front (not in a `map` closure held across awaits), which keeps the
    // batch future `Send` for the runner's task.
    let fetches: Vec<_> = events.iter().map(|e| open_one(keys, e)).collect();
    futures::stream::iter(fetches)
        .buffered(KEY_FETCHES_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

async fn open_one(
    keys: &MessageKeys,
    event: &Option<StoredEvent<ChatEvent>>,
) -> Result<Option<String>, KeyError> {
    match event {
        Some(e) if e.event.sealed_body().is_some() => match chat_of(e) {
            Some(chat) => keys.open_event(chat, &e.event).await,
            None => Ok(None),
        },
        _ => Ok(None),
    }
}

/// The command-api destroys a deleted message's key right after appending the deletion; doing
/// it again here (idempotent) covers a crash in between. Before the transaction, so a failure
/// redelivers the batch instead of recording the deletion without it.
async fn destroy_deleted_keys(
    keys: &MessageKeys,
    events: &[Option<StoredEvent<ChatEvent>>],
) -> Result<(), KeyError> {
    for e in events.iter().flatten() {
        if let (ChatEvent::MessageDeleted(d), Some(chat)) = (&e.event, chat_of(e)) {
            keys.destroy(chat, d.message_id).await?;
        }
    }
    Ok(())
}

fn chat_of(e: &StoredEvent<ChatEvent>) -> Option<ChatId> {
    Uuid::parse_str(&e.meta.subject).ok().map(ChatId::from_uuid)
}

/// Applies one event; messages are only collected, to be inserted in bulk (and flushed before
/// any event that changes a message). True for a message.
async fn apply_one(
    tx: &mut sqlx::PgConnection,
    chat_id: Uuid,
    event: &StoredEvent<ChatEvent>,
    opened: Option<&str>,
    messages: &mut Vec<MessageRow>,
) -> Result<bool, sqlx::Error> {
    let seq = event.meta.sequence as i64;
    match &event.event {
        ChatEvent::MessageSent(m) => {
            messages.push(MessageRow {
                chat_id,
                sequence: seq,
                message_id: *m.message_id.as_uuid(),
                sender_id: *m.sender_id.as_uuid(),
                body: Some(m.body.clone()),
                reply_to: m.reply_to.map(|r| *r.as_uuid()),
                sent_at: event.meta.time,
                thread_root: m.thread_root.map(|r| *r.as_uuid()),
                mentions: m.mentions.iter().map(|u| *u.as_uuid()).collect(),
                attachments: Vec::new(),
            });
            return Ok(true);
        }
        ChatEvent::MessageSentV2(m) => {
            messages.push(MessageRow {
                chat_id,
                sequence: seq,
                message_id: *m.message_id.as_uuid(),
                sender_id: *m.sender_id.as_uuid(),
                // No key: the message is deleted; its deletion event follows and marks it.
                body: opened.map(str::to_owned),
                reply_to: m.reply_to.map(|r| *r.as_uuid()),
                sent_at: event.meta.time,
                thread_root: m.thread_root.map(|r| *r.as_uuid()),
                mentions: m.mentions.iter().map(|u| *u.as_uuid()).collect(),
                attachments: m
                    .attachment_details
                    .iter()
                    .map(AttachmentView::from)
                    .collect(),
            });
            return Ok(true);
        }
        ChatEvent::MessageEdited(e) => {
            flush_messages(tx, messages).await?;
            crate::message_changes::edited(tx, chat_id, seq, e, opened, event.meta.time).await?;
        }
        ChatEvent::MessageDeleted(d) => {
            flush_messages(tx, messages).await?;
            crate::message_changes::deleted(tx, chat_id, d).await?;
        }
        ChatEvent::ReactionAdded(r) => {
            flush_messages(tx, messages).await?;
            crate::message_changes::reaction_added(tx, chat_id, seq, r).await?;
        }
        ChatEvent::ReactionRemoved(r) => {
            flush_messages(tx, messages).await?;
            crate::message_changes::reaction_removed(tx, chat_id, r).await?;
        }
        ChatEvent::Created(c) => {
            sqlx::query(
                "INSERT INTO chats (chat_id, kind, title, created_at, last_sequence, last_activity_at, visibility) \
                 VALUES ($1, $2, $3, $4, $5, $4, $6) ON CONFLICT (chat_id) DO NOTHING",
            )
            .bind(chat_id)
            .bind(c.kind.as_str())
            .bind(&c.title)
            .bind(event.meta.time)
            .bind(seq)
            .bind(c.visibility.as_str())
            .execute(&mut *tx)
            .await?;
            let users: Vec<Uuid> = c.members.iter().map(|m| *m.user_id.as_uuid()).collect();
            let roles: Vec<&str> = c.members.iter().map(|m| m.role.as_str()).collect();
            sqlx::query(
                "INSERT INTO members (chat_id, user_id, role, joined_seq) \
                 SELECT $1, u, r, $4 FROM UNNEST($2::uuid[], $3::text[]) AS t(u, r) \
                 ON CONFLICT (chat_id, user_id) DO NOTHING",
            )
            .bind(chat_id)
            .bind(&users)
            .bind(&roles)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        }
        ChatEvent::ParticipantsModified(p) => {
            let added: Vec<Uuid> = p.added.iter().map(|u| *u.as_uuid()).collect();
            let removed: Vec<Uuid> = p.removed.iter().map(|u| *u.as_uuid()).collect();
            let promoted: Vec<Uuid> = p.promoted.iter().map(|u| *u.as_uuid()).collect();
            sqlx::query(
                "INSERT INTO members (chat_id, user_id, role, joined_seq) \
                 SELECT $1, u, 'member', $3 FROM UNNEST($2::uuid[]) AS t(u) \
                 ON CONFLICT (chat_id, user_id) DO UPDATE \
                 SET role = 'member', joined_seq = EXCLUDED.joined_seq, left_seq = NULL, \
                     read_up_to = 0, delivered_up_to = 0",
            )
            .bind(chat_id)
            .bind(&added)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE members SET left_seq = $3 WHERE chat_id = $1 AND user_id = ANY($2)",
            )
            .bind(chat_id)
            .bind(&removed)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE members SET role = 'admin' WHERE chat_id = $1 AND user_id = ANY($2)",
            )
            .bind(chat_id)
            .bind(&promoted)
            .execute(&mut *tx)
            .await?;
        }
        ChatEvent::TitleChanged(t) => {
            sqlx::query("UPDATE chats SET title = $2 WHERE chat_id = $1")
                .bind(chat_id)
                .bind(&t.title)
                .execute(&mut *tx)
                .await?;
        }
        ChatEvent::RoleChanged(r) => {
            sqlx::query("UPDATE members SET role = $3 WHERE chat_id = $1 AND user_id = $2")
                .bind(chat_id)
                .bind(r.user_id.as_uuid())
                .bind(r.role.as_str())
                .execute(&mut *tx)
                .await?;
        }
    }
    if let ChatItem::Update(update) = frames::render_opened(event, opened) {
        sqlx::query(
            "INSERT INTO chat_updates (chat_id, sequence, \"update\", at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(chat_id)
        .bind(seq)
        .bind(sqlx::types::Json(&update))
        .bind(event.meta.time)
        .execute(&mut *tx)
        .await?;
    }
    Ok(false)
}

/// Inserts the messages collected so far, so that a later event of the batch finds them.
async fn flush_messages(
    tx: &mut sqlx::PgConnection,
    rows: &mut Vec<MessageRow>,
) -> Result<(), sqlx::Error> {
    insert_messages(tx, rows).await?;
    rows.clear();
    Ok(())
}

async fn insert_messages(
    tx: &mut sqlx::PgConnection,
    rows: &[MessageRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut chat = Vec::with_capacity(rows.len());
    let mut seq = Vec::with_capacity(rows.len());
    let mut id = Vec::with_capacity(rows.len());
    let mut sender = Vec::with_capacity(rows.len());
    let mut body = Vec::with_capacity(rows.len());
    let mut reply = Vec::with_capacity(rows.len());
    let mut at = Vec::with_capacity(rows.len());
    let mut root = Vec::with_capacity(rows.len());
    // uuid[][] cannot be unnested row by row, so mentions travel as JSON arrays.
    let mut mentions = Vec::with_capacity(rows.len());
    let mut attachments = Vec::with_capacity(rows.len());
    for r in rows {
        chat.push(r.chat_id);
        seq.push(r.sequence);
        id.push(r.message_id);
        sender.push(r.sender_id);
        body.push(r.body.as_deref());
        reply.push(r.reply_to);
        at.push(r.sent_at);
        root.push(r.thread_root);
        mentions.push(sqlx::types::Json(&r.mentions));
        attachments.push(sqlx::types::Json(&r.attachments));
    }
    sqlx::query(
        "INSERT INTO messages (chat_id, sequence, message_id, sender_id, body, reply_to, sent_at, thread_root, mentions, attachments) \
         SELECT c, s, i, u, b, r, a, t, \
                ARRAY(SELECT jsonb_array_elements_text(m)::uuid), f \
         FROM UNNEST($1::uuid[], $2::bigint[], $3::uuid[], $4::uuid[], $5::text[], $6::uuid[], $7::timestamptz[], $8::uuid[], $9::jsonb[], $10::jsonb[]) \
              AS v(c, s, i, u, b, r, a, t, m, f) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&chat)
    .bind(&seq)
    .bind(&id)
    .bind(&sender)
    .bind(&body)
    .bind(&reply)
    .bind(&at)
    .bind(&root)
    .bind(&mentions)
    .bind(&attachments)
    .execute(&mut *tx)
    .await?;
    // Thread summaries on the roots. The roots are inserted before their replies (a root is
    // checked to exist before a reply is accepted, and the statement above already inserted
    // this batch), and each reply is applied exactly once (per-chat checkpoint), so counting
    // here is exact. Most batches hold no reply: they skip the statement and its round trip.
    if root.iter().all(Option::is_none) {
        return Ok(());
    }
    sqlx::query(
        "UPDATE messages m SET thread_reply_count = m.thread_reply_count + v.n, \
                last_reply_at = GREATEST(m.last_reply_at, v.at) \
         FROM (SELECT c, t, count(*) AS n, max(a) AS at \
               FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[]) AS x(c, t, a) \
               WHERE t IS NOT NULL GROUP BY c, t) v \
         WHERE m.chat_id = v.c AND m.message_id = v.t",
    )
    .bind(&chat)
    .bind(&root)
    .bind(&at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn update_chats(
    tx: &mut sqlx::PgConnection,
    progress: &HashMap<Uuid, ChatProgress>,
) -> Result<(), sqlx::Error> {
    if progress.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = progress.keys().copied().collect();
    let seqs: Vec<i64> = ids.iter().map(|i| progress[i].sequence).collect();
    let ats: Vec<DateTime<Utc>> = ids.iter().map(|i| progress[i].at).collect();
    let msgs: Vec<Option<i64>> = ids.iter().map(|i| progress[i].last_message_seq).collect();
    sqlx::query(
        "UPDATE chats c SET last_sequence = v.seq, last_activity_at = v.at, \
                last_message_seq = COALESCE(v.msg, c.last_message_seq) \
         FROM UNNEST($1::uuid[], $2::bigint[], $3::timestamptz[], $4::bigint[]) AS v(chat_id, seq, at, msg) \
         WHERE c.chat_id = v.chat_id",
    )
    .bind(&ids)
    .bind(&seqs)
    .bind(&ats)
    .bind(&msgs)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
