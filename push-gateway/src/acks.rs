//! Device acks become cumulative `parley.receipt.delivered.v1` events on the `RECEIPTS` stream,
//! batched: per (device, chat) only the highest ack of a flush interval is published, so a
//! client acking every frame costs one stream write per interval, not one per frame.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use parley_schemas::events::Delivered;
use parley_schemas::{ChatId, DeviceId, ReceiptEvent, UserId};
use tokio_util::sync::CancellationToken;

type Key = (DeviceId, ChatId);

/// Receipts a flush keeps in flight: enough to pipeline, far below the 5,000 publish acks a
/// JetStream context allows pending (`max_ack_inflight`), which every publisher of the process
/// shares.
const IN_FLIGHT: usize = 256;

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
        // A window of publishes, each awaiting its own ack: pipelined, yet never more than
        // IN_FLIGHT ack permits held. The context's permits are shared by the whole process;
        // a flush that held one per receipt while asking for the next deadlocked every
        // publish of the process once a flush passed the limit (a 5,000-member channel).
        let mut published = futures::stream::iter(batch)
            .map(|(key, value)| async move {
                let acked = async { publish(js, key, value).await?.await }.await;
                (key, value, acked)
            })
            .buffer_unordered(IN_FLIGHT);
        while let Some((key, value, acked)) = published.next().await {
            if let Err(error) = acked {
                tracing::warn!(%error, "delivered receipt not stored; retrying next flush");
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
#[allow(clippy::unwrap_used)]
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

    /// A 5,000-member channel acked in one interval: one flush holds more receipts than the
    /// JetStream context lets be in flight (5,000 acks pending, shared by the whole process).
    /// Holding every ack future while publishing the next once stalled every publish of the
    /// process for good: commands, sign-ups, key writes.
    #[tokio::test]
    async fn a_flush_larger_than_the_in_flight_limit_publishes_everything() {
        let nats = parley_test_support::NatsServer::start().await;
        let js = parley_nats::context(parley_nats::connect(&nats.url()).await.unwrap());
        parley_nats::ensure(&js, &parley_nats::JetStreamSettings::default())
            .await
            .unwrap();
        let b = AckBatcher::default();
        let (chat, n) = (ChatId::new(), 6_000u64);
        for up_to in 1..=n {
            b.record(UserId::new(), DeviceId::new(), chat, up_to);
        }
        tokio::time::timeout(Duration::from_secs(60), b.flush(&js))
            .await
            .expect("a flush of 6,000 receipts finishes within 60 s");
        assert!(b.lock().is_empty(), "no receipt was put back for a retry");
        let mut stream = js.get_stream(parley_nats::streams::RECEIPTS).await.unwrap();
        assert_eq!(stream.info().await.unwrap().state.messages, n);
    }
}
