//! The receipts projection: device cursors and per-member delivered/read watermarks from the
//! `RECEIPTS` stream. Watermarks only move up (GREATEST), which makes reapplying harmless.

use parley_schemas::ReceiptEvent;
use sqlx::PgPool;
use uuid::Uuid;

use crate::runner::{Delivered, Disposition, checkpoint, decode_all};

pub async fn apply(pg: &PgPool, batch: Vec<Delivered>) -> Result<Vec<Disposition>, sqlx::Error> {
    let events = decode_all::<ReceiptEvent>("receipts", &batch);
    let mut tx = pg.begin().await?;
    let mut out = Vec::with_capacity(events.len());
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
                sqlx::query(
                    "UPDATE members SET delivered_up_to = GREATEST(delivered_up_to, $3) \
                     WHERE chat_id = $1 AND user_id = $2",
                )
                .bind(chat_id)
                .bind(d.user_id.as_uuid())
                .bind(d.up_to as i64)
                .execute(&mut *tx)
                .await?;
            }
            ReceiptEvent::Read(r) => {
                sqlx::query(
                    "UPDATE members SET read_up_to = GREATEST(read_up_to, $3) \
                     WHERE chat_id = $1 AND user_id = $2",
                )
                .bind(chat_id)
                .bind(r.user_id.as_uuid())
                .bind(r.up_to as i64)
                .execute(&mut *tx)
                .await?;
            }
        }
        out.push(Disposition::Ack);
    }
    checkpoint(&mut tx, "receipts", &batch).await?;
    tx.commit().await?;
    Ok(out)
}
