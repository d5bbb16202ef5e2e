//! Appending receipts (cumulative delivered and read watermarks) to the `RECEIPTS` stream. The
//! gateway (device acks) and command-api (read receipts) both append through here.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishError};
use chrono::Utc;
use parley_schemas::cloudevent::{CONTENT_TYPE, encode};
use parley_schemas::events::Delivered;
use parley_schemas::{ChatId, DeviceId, EventId, EventMeta, ReceiptEvent};

use crate::setup::subjects;

/// Publishes one receipt and waits until JetStream has stored it: what an HTTP call answers
/// after, and what each publish of the gateway's flush window awaits.
pub async fn publish_acked(
    js: &jetstream::Context,
    chat: ChatId,
    event: &ReceiptEvent,
) -> Result<(), PublishError> {
    publish(js, chat, event).await?.await.map(|_| ())
}

/// Publishes one receipt; await the returned future for JetStream's ack. The CloudEvent's
/// `sequence` is the highest chat sequence a watermark of it reaches; the same watermarks
/// published twice (a retry after a lost ack) are stored once.
async fn publish(
    js: &jetstream::Context,
    chat: ChatId,
    event: &ReceiptEvent,
) -> Result<PublishAckFuture, PublishError> {
    let msg_id = match event {
        ReceiptEvent::Delivered(d) => format!("{}:{chat}:{}", d.device_id, d.up_to),
        ReceiptEvent::DeliveredBatch(b) => batch_msg_id(chat, &b.receipts),
        ReceiptEvent::Read(r) => format!("read:{}:{chat}:{}", r.user_id, r.up_to),
    };
    let meta = EventMeta {
        id: EventId::new(),
        subject: chat.to_string(),
        time: Utc::now(),
        sequence: event.up_to(),
        actor: event.actor(),
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

/// A batch's deduplication id: a digest of its (device, watermark) pairs in device order, so
/// the same watermarks published again are one message whatever order they were collected in.
fn batch_msg_id(chat: ChatId, receipts: &[Delivered]) -> String {
    use sha2::{Digest, Sha256};
    let mut pairs: Vec<(DeviceId, u64)> = receipts.iter().map(|d| (d.device_id, d.up_to)).collect();
    pairs.sort_unstable();
    let mut digest = Sha256::new();
    for (device, up_to) in pairs {
        digest.update(device.as_uuid().as_bytes());
        digest.update(up_to.to_be_bytes());
    }
    format!("batch:{chat}:{}", hex::encode(&digest.finalize()[..16]))
}

/// `live.receipts.<chat_id>` (core NATS): a member's watermark moved in the read model. The
/// receipts projector publishes one per advanced (chat, member) after its commit (in a busy
/// chat, merged over an interval: `parley_projectors::receipts::Announcer`);
/// gateways turn it into `receipt` frames for the chat's other members connected to them.
/// Best effort, like every core NATS notice: the watermarks themselves are in the read model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatermarkMoved {
    pub chat_id: ChatId,
    pub user_id: parley_schemas::UserId,
    /// The member's new delivered watermark, when it moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_up_to: Option<u64>,
    /// The member's new read watermark, when it moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_up_to: Option<u64>,
}

/// Publishes a [`WatermarkMoved`] on its chat's subject (not flushed: the caller flushes once
/// for a whole batch).
pub async fn announce(
    nats: &async_nats::Client,
    moved: &WatermarkMoved,
) -> Result<(), async_nats::PublishError> {
    let payload = serde_json::to_vec(moved).unwrap_or_default();
    nats.publish(subjects::live_receipts(moved.chat_id), payload.into())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_schemas::UserId;

    #[test]
    fn a_batch_has_the_same_dedup_id_in_any_order_and_another_for_other_watermarks() {
        let chat = ChatId::new();
        let entry = |up_to| Delivered {
            user_id: UserId::new(),
            device_id: DeviceId::new(),
            up_to,
        };
        let (a, b) = (entry(3), entry(4));
        let id = batch_msg_id(chat, &[a.clone(), b.clone()]);
        assert_eq!(id, batch_msg_id(chat, &[b.clone(), a.clone()]));
        assert!(id.starts_with(&format!("batch:{chat}:")));
        let moved = Delivered {
            up_to: 5,
            ..b.clone()
        };
        assert_ne!(id, batch_msg_id(chat, &[a.clone(), moved]));
        assert_ne!(id, batch_msg_id(ChatId::new(), &[a, b]));
    }
}
