//! Device acks become cumulative `parley.receipt.delivered.v1` events on the `RECEIPTS` stream,
//! batched: per (device, chat) only the highest ack of a flush interval is published, so a
//! client acking every frame costs one stream write per interval, not one per frame.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use parley_schemas::events::Delivered;
use parley_schemas::{ChatId, DeviceId, ReceiptEvent, UserId};
use tokio_util::sync::CancellationToken;

type Key = (DeviceId, ChatId);

#[derive(Default)]
pub(crate) struct AckBatcher {
    /// (device, chat) → (user, highest ack not yet published).
    pending: Mutex<HashMap<Key, (UserId, u64)>>,
}

impl AckBatcher {
    /// Records an ack; cheap and never waits, so the connection loop is not held up.
    pub(crate) fn record(&self, user: UserId, device: DeviceId, chat: ChatId, up_to: u64) {
        merge(&mut self.lock(), (device, chat), (user, up_to));
    }

    /// Publishes what accumulated every `every`, until `shutdown`, then once more.
    pub(crate) async fn run(
        self: Arc<Self>,
        js: jetstream::Context,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.flush(&js).await,
            }
        }
        self.flush(&js).await;
    }

    async fn flush(&self, js: &jetstream::Context) {
        let batch: Vec<(Key, (UserId, u64))> = self.lock().drain().collect();
        if batch.is_empty() {
            return;
        }
        // Publish the whole batch, then wait for the acks: one round trip per flush.
        let mut in_flight = Vec::with_capacity(batch.len());
        for (key, value) in batch {
            match publish(js, key, value).await {
                Ok(ack) => in_flight.push((key, value, ack)),
                Err(error) => {
                    tracing::warn!(%error, "cannot publish delivered receipt; retrying next flush");
                    self.record(value.0, key.0, key.1, value.1);
                }
            }
        }
        for (key, value, ack) in in_flight {
            if let Err(error) = ack.await {
                tracing::warn!(%error, "delivered receipt not acknowledged; retrying next flush");
                self.record(value.0, key.0, key.1, value.1);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (UserId, u64)>> {
        // Held for a map operation only; poisoned data is still a valid map.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn merge(map: &mut HashMap<Key, (UserId, u64)>, key: Key, value: (UserId, u64)) {
    let entry = map.entry(key).or_insert(value);
    entry.1 = entry.1.max(value.1);
}

async fn publish(
    js: &jetstream::Context,
    (device_id, chat): Key,
    (user_id, up_to): (UserId, u64),
) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
    let event = ReceiptEvent::Delivered(Delivered {
        user_id,
        device_id,
        up_to,
    });
    parley_nats::receipts::publish(js, chat, &event).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_highest_ack_per_device_and_chat_is_kept() {
        let b = AckBatcher::default();
        let (u, d, c) = (UserId::new(), DeviceId::new(), ChatId::new());
        b.record(u, d, c, 5);
        b.record(u, d, c, 3);
        b.record(u, d, c, 7);
        let other = ChatId::new();
        b.record(u, d, other, 1);
        let map = b.lock();
        assert_eq!(map.get(&(d, c)), Some(&(u, 7)));
        assert_eq!(map.get(&(d, other)), Some(&(u, 1)));
    }
}
