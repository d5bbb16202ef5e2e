//! Appending receipts (cumulative delivered and read watermarks) to the `RECEIPTS` stream. The
//! gateway (device acks) and command-api (read receipts) both append through here.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishError};
use chrono::Utc;
use parley_schemas::cloudevent::{CONTENT_TYPE, encode};
use parley_schemas::{ChatId, EventId, EventMeta, ReceiptEvent};

use crate::setup::subjects;

/// Publishes one receipt; await the returned future for JetStream's ack. The CloudEvent's
/// `sequence` is the chat sequence the watermark reaches; the same watermark published twice
/// (a retry after a lost ack) is stored once.
pub async fn publish(
    js: &jetstream::Context,
    chat: ChatId,
    event: &ReceiptEvent,
) -> Result<PublishAckFuture, PublishError> {
    let (actor, up_to, msg_id) = match event {
        ReceiptEvent::Delivered(d) => (
            d.user_id,
            d.up_to,
            format!("{}:{chat}:{}", d.device_id, d.up_to),
        ),
        ReceiptEvent::Read(r) => (
            r.user_id,
            r.up_to,
            format!("read:{}:{chat}:{}", r.user_id, r.up_to),
        ),
    };
    let meta = EventMeta {
        id: EventId::new(),
        subject: chat.to_string(),
        time: Utc::now(),
        sequence: up_to,
        actor,
    };
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id.as_str());
    headers.insert("Content-Type", CONTENT_TYPE);
    js.publish_with_headers(
        subjects::receipts(chat),
        headers,
        encode(&meta, event).into(),
    )
    .await
}
