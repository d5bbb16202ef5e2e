//! The activity projection (analysts' rollups): `activity_messages` (one row per message sent,
//! with when it first reached someone other than its sender), `activity_watermarks` and the
//! per-chat checkpoint `activity_chats`, from `CHATS` and `RECEIPTS`. Hourly counts, distinct
//! senders and median latency are aggregated from `activity_messages` when read
//! (`GET /v1/chats/{id}/stats`, `parley stats`).
//!
//! `CHATS` reaches it through the chats projector's consumer: [`record_chats`] runs inside that
//! projector's batch transaction, with versions of its own, so one delivery, one decode and one
//! transaction serve both projections (ADR 9, addendum).
//! `RECEIPTS` has a durable consumer of its own (`proj-activity-receipts`). A rebuild replays
//! `CHATS` through [`apply_chats`], the same recording in a transaction of its own.
//!
//! A message's `delivered_at` is the earliest `time` of a delivered receipt, from a user other
//! than the sender, whose `up_to` covers the message. Both writers lock the chat's
//! `activity_chats` row, so whichever of message and receipt is applied second sees the first:
//! the result does not depend on which stream is read further.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use parley_platform::seq;
use parley_schemas::{ChatEvent, ReceiptEvent, StoredEvent};
use sqlx::PgPool;
use uuid::Uuid;

use crate::runner::{Delivered, Disposition, Versions, checkpoint, decode_all};

/// The checkpoint name of a rebuild's `CHATS` feed (`projector_checkpoints`; until the chats
/// projector recorded the rollup itself, also the durable `proj-activity-chats`).
pub const CHATS_READER: &str = "activity-chats";
/// Checkpoint and durable name (`proj-activity-receipts`) of the `RECEIPTS` reader.
pub const RECEIPTS_READER: &str = "activity-receipts";

/// Applies a batch of `CHATS` events in a transaction of its own, with its checkpoint: how a
/// rebuild replays the rollup (the live projector records it through [`record_chats`]).
pub async fn apply_chats(
    pg: &PgPool,
    batch: Vec<Delivered>,
    out_of_order_delay: Duration,
) -> Result<Vec<Disposition>, sqlx::Error> {
    let events = decode_all::<ChatEvent>(CHATS_READER, &batch);
    let mut tx = pg.begin().await?;
    let out = record_chats(&mut tx, &events, out_of_order_delay).await?;
    checkpoint(&mut tx, CHATS_READER, &batch).await?;
    tx.commit().await?;
    Ok(out)
}

/// Records a batch of decoded `CHATS` events in the caller's transaction: messages, and each
/// chat's version. An event applies only when it is exactly the chat's next version here,
/// whatever the caller's own projection made of it, so the rollup neither doubles nor skips
/// an event when it and the chats projection stand at different versions (after either was
/// rebuilt). One disposition per event, in order.
pub async fn record_chats(
    tx: &mut sqlx::PgConnection,
    events: &[Option<StoredEvent<ChatEvent>>],
    out_of_order_delay: Duration,
) -> Result<Vec<Disposition>, sqlx::Error> {
    let mut versions = Versions::lock(
        &mut *tx,
        "SELECT chat_id, last_sequence FROM activity_chats WHERE chat_id = ANY($1) \
         ORDER BY chat_id FOR UPDATE",
        events,
        out_of_order_delay,
    )
    .await?;
    let mut msgs: (Vec<Uuid>, Vec<i64>, Vec<Uuid>, Vec<DateTime<Utc>>) = Default::default();
    let mut progress: BTreeMap<Uuid, i64> = BTreeMap::new();
    let mut out = Vec::with_capacity(events.len());
    for event in events {
        let (chat_id, event) = match versions.admit(event) {
            Ok(admitted) => admitted,
            Err(d) => {
                out.push(d);
                continue;
            }
        };
        let seq = event.meta.sequence as i64;
        // Both versions of a sent message count; the body is never needed here.
        let sender = match &event.event {
            ChatEvent::MessageSent(m) => Some(m.sender_id),
            ChatEvent::MessageSentV2(m) => Some(m.sender_id),
            _ => None,
        };
        if let Some(sender) = sender {
            msgs.0.push(chat_id);
            msgs.1.push(seq);
            msgs.2.push(*sender.as_uuid());
            msgs.3.push(event.meta.time);
        }
        versions.advance(chat_id, seq);
        progress.insert(chat_id, seq);
        out.push(Disposition::Ack);
    }
    if !msgs.0.is_empty() {
        // A receipt applied before the message (the RECEIPTS reader ahead) left a watermark.
        sqlx::query(
            "INSERT INTO activity_messages (chat_id, sequence, sender_id, sent_at, delivered_at) \
             SELECT v.chat_id, v.seq, v.sender, v.at, \
                    (SELECT min(w.at) FROM activity_watermarks w \
                     WHERE w.chat_id = v.chat_id AND w.user_id <> v.sender \
                       AND w.delivered_up_to >= v.seq) \
             FROM UNNEST($1::uuid[], $2::bigint[], $3::uuid[], $4::timestamptz[]) \
                  AS v(chat_id, seq, sender, at) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&msgs.0)
        .bind(&msgs.1)
        .bind(&msgs.2)
        .bind(&msgs.3)
        .execute(&mut *tx)
        .await?;
    }
    let (ids, seqs): (Vec<Uuid>, Vec<i64>) = progress.into_iter().unzip();
    if !ids.is_empty() {
        sqlx::query(
            "INSERT INTO activity_chats (chat_id, last_sequence) \
             SELECT * FROM UNNEST($1::uuid[], $2::bigint[]) \
             ON CONFLICT (chat_id) DO UPDATE SET last_sequence = EXCLUDED.last_sequence",
        )
        .bind(&ids)
        .bind(&seqs)
        .execute(&mut *tx)
        .await?;
    }
    Ok(out)
}

/// Applies a batch of `RECEIPTS` events: a delivered receipt stamps the messages between the
/// user's previous watermark and its `up_to` that others sent. Read receipts are not used.
pub async fn apply_receipts(
    pg: &PgPool,
    batch: Vec<Delivered>,
) -> Result<Vec<Disposition>, sqlx::Error> {
    let events = decode_all::<ReceiptEvent>(RECEIPTS_READER, &batch);
    let mut tx = pg.begin().await?;
    let chats: BTreeSet<Uuid> = events
        .iter()
        .flatten()
        .filter(|e| !e.event.delivered().is_empty())
        .filter_map(|e| Uuid::parse_str(&e.meta.subject).ok())
        .collect();
    let chats: Vec<Uuid> = chats.into_iter().collect();
    if !chats.is_empty() {
        // The chat's row is the lock both readers take (created here if receipts come first),
        // in id order so that concurrent batches never deadlock.
        sqlx::query(
            "INSERT INTO activity_chats (chat_id, last_sequence) \
             SELECT c, 0 FROM UNNEST($1::uuid[]) AS t(c) ORDER BY c ON CONFLICT DO NOTHING",
        )
        .bind(&chats)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "SELECT chat_id FROM activity_chats WHERE chat_id = ANY($1) ORDER BY chat_id FOR UPDATE",
        )
        .bind(&chats)
        .execute(&mut *tx)
        .await?;
    }
    let mut out = Vec::with_capacity(events.len());
    let mut receipts: (Vec<Uuid>, Vec<Uuid>, Vec<i64>, Vec<DateTime<Utc>>) = Default::default();
    for event in &events {
        let Some(event) = event else {
            out.push(Disposition::Term);
            continue;
        };
        let Ok(chat_id) = Uuid::parse_str(&event.meta.subject) else {
            out.push(Disposition::Term);
            continue;
        };
        for d in event.event.delivered() {
            receipts.0.push(chat_id);
            receipts.1.push(*d.user_id.as_uuid());
            receipts.2.push(seq::to_db(d.up_to));
            receipts.3.push(event.meta.time);
        }
        out.push(Disposition::Ack);
    }
    if !receipts.0.is_empty() {
        // Each receipt stamps the messages between its user's watermark before the batch and
        // its `up_to` that others sent; where a batch's receipts overlap, the earliest time
        // wins, as the definition above says. Only messages whose stamp changes are returned:
        // not yet delivered, or delivered later than a receipt here says.
        //
        // Two statements, not one, so that no plan depends on how many messages the ranges
        // cover, which the planner cannot estimate. As one statement it often guessed
        // thousands and then hashed the whole `activity_messages` table, every chat's history,
        // for a batch that stamped one message (docs/benchmarks.md, "Session 20"). Here each
        // receipt is one index range scan (`OFFSET 0` keeps the lateral subquery a probe per
        // receipt), and the update is planned for the exact list of stamps.
        let stamps: Vec<(Uuid, i64, DateTime<Utc>)> = sqlx::query_as(
            "SELECT r.chat_id, a.sequence, min(r.at) \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[], $4::timestamptz[]) \
                 AS r(chat_id, user_id, up_to, at) \
             LEFT JOIN activity_watermarks w ON w.chat_id = r.chat_id AND w.user_id = r.user_id \
             CROSS JOIN LATERAL ( \
                 SELECT a.sequence FROM activity_messages a \
                 WHERE a.chat_id = r.chat_id \
                   AND a.sequence > COALESCE(w.delivered_up_to, 0) AND a.sequence <= r.up_to \
                   AND a.sender_id <> r.user_id \
                   AND (a.delivered_at IS NULL OR a.delivered_at > r.at) \
                 OFFSET 0) a \
             GROUP BY r.chat_id, a.sequence",
        )
        .bind(&receipts.0)
        .bind(&receipts.1)
        .bind(&receipts.2)
        .bind(&receipts.3)
        .fetch_all(&mut *tx)
        .await?;
        let mut stamped: (Vec<Uuid>, Vec<i64>, Vec<DateTime<Utc>>) = Default::default();
        for (chat_id, sequence, at) in stamps {
            stamped.0.push(chat_id);
            stamped.1.push(sequence);
            stamped.2.push(at);
        }
        // Then each (chat, user) keeps its highest `up_to` (the earliest time among equals).
        // A data-modifying WITH runs once, whether or not the main statement reads it.
        sqlx::query(
            "WITH stamped AS ( \
                 UPDATE activity_messages m SET delivered_at = s.at \
                 FROM UNNEST($5::uuid[], $6::bigint[], $7::timestamptz[]) AS s(chat_id, sequence, at) \
                 WHERE m.chat_id = s.chat_id AND m.sequence = s.sequence \
                   AND (m.delivered_at IS NULL OR m.delivered_at > s.at)) \
             INSERT INTO activity_watermarks (chat_id, user_id, delivered_up_to, at) \
             SELECT DISTINCT ON (chat_id, user_id) chat_id, user_id, up_to, at \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[], $4::timestamptz[]) \
                 AS r(chat_id, user_id, up_to, at) \
             ORDER BY chat_id, user_id, up_to DESC, at \
             ON CONFLICT (chat_id, user_id) DO UPDATE \
             SET delivered_up_to = EXCLUDED.delivered_up_to, at = EXCLUDED.at \
             WHERE activity_watermarks.delivered_up_to < EXCLUDED.delivered_up_to",
        )
        .bind(&receipts.0)
        .bind(&receipts.1)
        .bind(&receipts.2)
        .bind(&receipts.3)
        .bind(&stamped.0)
        .bind(&stamped.1)
        .bind(&stamped.2)
        .execute(&mut *tx)
        .await?;
    }
    checkpoint(&mut tx, RECEIPTS_READER, &batch).await?;
    tx.commit().await?;
    Ok(out)
}
