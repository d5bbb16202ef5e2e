//! The receipts projection: device cursors and per-member delivered/read watermarks from the
//! `RECEIPTS` stream. Watermarks only move up (GREATEST), which makes reapplying harmless.
//!
//! After each commit it announces, per (chat, member) whose watermark moved in the batch, one
//! `live.receipts.<chat_id>` notice (core NATS) for the gateways' `receipt` frames: one message
//! per chat and member, never per recipient. A watermark that did not move (a redelivery, an
//! older ack) announces nothing.
//!
//! Channels announce nothing: every member's move shown to every member is N² frames (a
//! 5,000-member channel whose sockets ack one message makes 25 million), which starved the
//! whole process in the channel benchmark. Their watermarks are still kept, for the receipts
//! query. Presence draws the same line (channels make no contacts).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use parley_nats::receipts::{WatermarkMoved, announce};
use parley_platform::seq;
use parley_schemas::{ChatId, ReceiptEvent, StoredEvent, UserId};
use sqlx::PgPool;
use uuid::Uuid;

use crate::runner::{Delivered, Disposition, checkpoint, decode_all};

/// How long a receipt whose membership is not projected yet waits before it is tried again.
const MEMBER_NOT_YET_PROJECTED: Duration = Duration::from_millis(100);

/// Watermarks that moved in a batch, per (chat, member): the highest of each.
type Moved = BTreeMap<(Uuid, Uuid), (Option<u64>, Option<u64>)>;

pub async fn apply(
    pg: &PgPool,
    nats: &async_nats::Client,
    batch: Vec<Delivered>,
) -> Result<Vec<Disposition>, sqlx::Error> {
    let (out, moved) = apply_batch(pg, batch).await?;
    announce_all(nats, moved).await;
    Ok(out)
}

/// As `apply`, announcing nothing: a rebuild replays history, which is no news to anyone.
pub async fn apply_quietly(
    pg: &PgPool,
    batch: Vec<Delivered>,
) -> Result<Vec<Disposition>, sqlx::Error> {
    Ok(apply_batch(pg, batch).await?.0)
}

async fn apply_batch(
    pg: &PgPool,
    batch: Vec<Delivered>,
) -> Result<(Vec<Disposition>, Moved), sqlx::Error> {
    let events = decode_all::<ReceiptEvent>("receipts", &batch);
    let mut tx = pg.begin().await?;
    // A receipt can be here before the chats projection has the membership it moves (the two
    // projections run independently): applied now it would change nothing, and be lost. It
    // waits instead, as an event ahead of its predecessor does, so the read model ends as a
    // rebuild (which applies the streams in stored order) leaves it.
    let unknown = unknown_members(&mut tx, &events).await?;
    let mut out = Vec::with_capacity(events.len());
    // Watermarks only move up, so the highest of a batch per key is all that applying its
    // events one by one would leave: one statement per table instead of one per event.
    let mut cursors = Highest::new();
    let mut delivered = Highest::new();
    let mut read = Highest::new();
    for event in &events {
        let Some(event) = event else {
            out.push(Disposition::Term);
            continue;
        };
        let Ok(chat_id) = Uuid::parse_str(&event.meta.subject) else {
            out.push(Disposition::Term);
            continue;
        };
        // A batch waits whole while one of its members is unknown: reapplying the others
        // then is harmless, as watermarks only move up.
        if members_of(&event.event).any(|m| unknown.contains(&(chat_id, m))) {
            out.push(Disposition::Retry(MEMBER_NOT_YET_PROJECTED));
            continue;
        }
        for d in event.event.delivered() {
            raise(&mut cursors, (*d.device_id.as_uuid(), chat_id), d.up_to);
            raise(&mut delivered, (chat_id, *d.user_id.as_uuid()), d.up_to);
        }
        if let ReceiptEvent::Read(r) = &event.event {
            raise(&mut read, (chat_id, *r.user_id.as_uuid()), r.up_to);
        }
        out.push(Disposition::Ack);
    }
    if !cursors.is_empty() {
        let (devices, chats, ups) = columns(&cursors);
        sqlx::query(
            "INSERT INTO device_cursors (device_id, chat_id, acked_up_to) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[]) \
             ON CONFLICT (device_id, chat_id) DO UPDATE \
             SET acked_up_to = GREATEST(device_cursors.acked_up_to, EXCLUDED.acked_up_to)",
        )
        .bind(devices)
        .bind(chats)
        .bind(ups)
        .execute(&mut *tx)
        .await?;
    }
    let mut moved = Moved::new();
    for (chat, user, up) in raise_members(&mut tx, Watermark::Delivered, &delivered).await? {
        moved.entry((chat, user)).or_default().0 = Some(seq::from_db(up));
    }
    for (chat, user, up) in raise_members(&mut tx, Watermark::Read, &read).await? {
        moved.entry((chat, user)).or_default().1 = Some(seq::from_db(up));
    }
    checkpoint(&mut tx, "receipts", &batch).await?;
    tx.commit().await?;
    Ok((out, moved))
}

/// The members a receipt moves.
fn members_of(event: &ReceiptEvent) -> impl Iterator<Item = Uuid> + '_ {
    let read = match event {
        ReceiptEvent::Read(r) => Some(*r.user_id.as_uuid()),
        _ => None,
    };
    event
        .delivered()
        .iter()
        .map(|d| *d.user_id.as_uuid())
        .chain(read)
}

/// The (chat, member) pairs of the batch that `members` does not hold yet.
async fn unknown_members(
    tx: &mut sqlx::PgConnection,
    events: &[Option<StoredEvent<ReceiptEvent>>],
) -> Result<BTreeSet<(Uuid, Uuid)>, sqlx::Error> {
    let keys: BTreeSet<(Uuid, Uuid)> = events
        .iter()
        .flatten()
        .filter_map(|e| Some((Uuid::parse_str(&e.meta.subject).ok()?, &e.event)))
        .flat_map(|(chat, event)| members_of(event).map(move |m| (chat, m)))
        .collect();
    if keys.is_empty() {
        return Ok(BTreeSet::new());
    }
    let (chats, users): (Vec<Uuid>, Vec<Uuid>) = keys.into_iter().unzip();
    let missing: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT v.chat_id, v.user_id FROM UNNEST($1::uuid[], $2::uuid[]) AS v(chat_id, user_id) \
         WHERE NOT EXISTS (SELECT 1 FROM members m \
                           WHERE m.chat_id = v.chat_id AND m.user_id = v.user_id)",
    )
    .bind(&chats)
    .bind(&users)
    .fetch_all(&mut *tx)
    .await?;
    Ok(missing.into_iter().collect())
}

/// The highest `up_to` of a batch per key, in key order (the order rows are locked in).
type Highest = BTreeMap<(Uuid, Uuid), i64>;

fn raise(map: &mut Highest, key: (Uuid, Uuid), up_to: u64) {
    let up_to = seq::to_db(up_to);
    let entry = map.entry(key).or_insert(up_to);
    *entry = (*entry).max(up_to);
}

fn columns(map: &Highest) -> (Vec<Uuid>, Vec<Uuid>, Vec<i64>) {
    let mut cols = (
        Vec::with_capacity(map.len()),
        Vec::with_capacity(map.len()),
        Vec::with_capacity(map.len()),
    );
    for (&(a, b), &up) in map {
        cols.0.push(a);
        cols.1.push(b);
        cols.2.push(up);
    }
    cols
}

#[derive(Clone, Copy)]
enum Watermark {
    Delivered,
    Read,
}

/// Raises members' watermarks to the batch's highest; returns the moves to announce: those
/// that moved (not those already at or above it), outside channels.
async fn raise_members(
    tx: &mut sqlx::PgConnection,
    which: Watermark,
    ups: &Highest,
) -> Result<Vec<(Uuid, Uuid, i64)>, sqlx::Error> {
    if ups.is_empty() {
        return Ok(Vec::new());
    }
    let column = match which {
        Watermark::Delivered => "delivered_up_to",
        Watermark::Read => "read_up_to",
    };
    let sql = format!(
        "WITH moved AS (\
           UPDATE members m SET {column} = v.up \
           FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[]) AS v(chat_id, user_id, up) \
           WHERE m.chat_id = v.chat_id AND m.user_id = v.user_id AND m.{column} < v.up \
           RETURNING m.chat_id, m.user_id, m.{column}) \
         SELECT * FROM moved WHERE NOT EXISTS \
           (SELECT 1 FROM chats c WHERE c.chat_id = moved.chat_id AND c.kind = 'channel')"
    );
    let (chats, users, up) = columns(ups);
    sqlx::query_as(&sql)
        .bind(chats)
        .bind(users)
        .bind(up)
        .fetch_all(tx)
        .await
}

/// Announces what moved. Only after the commit, so no frame ever shows a watermark the read
/// model does not hold; a crash in between loses the frames, not the watermarks (clients read
/// them with the receipts query).
async fn announce_all(nats: &async_nats::Client, moved: Moved) {
    if moved.is_empty() {
        return;
    }
    for ((chat, user), (delivered_up_to, read_up_to)) in moved {
        let notice = WatermarkMoved {
            chat_id: ChatId::from_uuid(chat),
            user_id: UserId::from_uuid(user),
            delivered_up_to,
            read_up_to,
        };
        if let Err(error) = announce(nats, &notice).await {
            tracing::warn!(%error, "receipt notice not published");
        }
    }
    if let Err(error) = nats.flush().await {
        tracing::warn!(%error, "receipt notices not flushed");
    }
}
