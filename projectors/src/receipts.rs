//! The receipts projection: device cursors and per-member delivered/read watermarks from the
//! `RECEIPTS` stream. Watermarks only move up (GREATEST), which makes reapplying harmless.
//!
//! After each commit it announces, per (chat, member) whose watermark moved in the batch, one
//! `live.receipts.<chat_id>` notice (core NATS) for the gateways' `receipt` frames: one message
//! per chat and member, never per recipient. A watermark that did not move (a redelivery, an
//! older ack) announces nothing.

use std::collections::BTreeMap;

use parley_nats::receipts::{WatermarkMoved, announce};
use parley_schemas::{ChatId, ReceiptEvent, UserId};
use sqlx::PgPool;
use uuid::Uuid;

use crate::runner::{Delivered, Disposition, checkpoint, decode_all};

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
    let mut out = Vec::with_capacity(events.len());
    let mut moved = Moved::new();
    for event in &events {
        let Some(event) = event else {
            out.push(Disposition::Term);
            continue;
        };
        let Ok(chat_id) = Uuid::parse_str(&event.meta.subject) else {
            out.push(Disposition::Term);
            continue;
        };
        match &event.event {
            ReceiptEvent::Delivered(d) => {
                sqlx::query(
                    "INSERT INTO device_cursors (device_id, chat_id, acked_up_to) VALUES ($1, $2, $3) \
                     ON CONFLICT (device_id, chat_id) DO UPDATE \
                     SET acked_up_to = GREATEST(device_cursors.acked_up_to, EXCLUDED.acked_up_to)",
                )
                .bind(d.device_id.as_uuid())
                .bind(chat_id)
                .bind(d.up_to as i64)
                .execute(&mut *tx)
                .await?;
                // RETURNING only when it moved: what the receipt frame announces.
                let up: Option<i64> = sqlx::query_scalar(
                    "UPDATE members SET delivered_up_to = $3 \
                     WHERE chat_id = $1 AND user_id = $2 AND delivered_up_to < $3 \
                     RETURNING delivered_up_to",
                )
                .bind(chat_id)
                .bind(d.user_id.as_uuid())
                .bind(d.up_to as i64)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(up) = up {
                    let entry = moved.entry((chat_id, *d.user_id.as_uuid())).or_default();
                    entry.0 = entry.0.max(Some(up.max(0) as u64));
                }
            }
            ReceiptEvent::Read(r) => {
                let up: Option<i64> = sqlx::query_scalar(
                    "UPDATE members SET read_up_to = $3 \
                     WHERE chat_id = $1 AND user_id = $2 AND read_up_to < $3 \
                     RETURNING read_up_to",
                )
                .bind(chat_id)
                .bind(r.user_id.as_uuid())
                .bind(r.up_to as i64)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(up) = up {
                    let entry = moved.entry((chat_id, *r.user_id.as_uuid())).or_default();
                    entry.1 = entry.1.max(Some(up.max(0) as u64));
                }
            }
        }
        out.push(Disposition::Ack);
    }
    checkpoint(&mut tx, "receipts", &batch).await?;
    tx.commit().await?;
    Ok((out, moved))
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
