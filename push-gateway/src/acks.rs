//! Device acks become cumulative delivered watermarks on the `RECEIPTS` stream, batched: per
//! (device, chat) only the highest ack of a flush interval counts, and a flush writes one event
//! per chat (`parley.receipt.delivered_batch.v1`, or `parley.receipt.delivered.v1` when one
//! device moved), so a chat costs one stream write per interval, not one per device or frame.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use parley_schemas::events::{Delivered, DeliveredBatch};
use parley_schemas::{ChatId, DeviceId, ReceiptEvent, UserId};
use tokio_util::sync::CancellationToken;

type Key = (DeviceId, ChatId);

/// Receipts a flush keeps in flight: enough to pipeline, far below the 5,000 publish acks a
/// JetStream context allows pending (`max_ack_inflight`), which every publisher of the process
/// shares.
const IN_FLIGHT: usize = 256;

/// Devices one event carries at most: a 5,000-member channel acked in one interval is ten
/// events of about 50 KB, well inside NATS's 1 MiB message limit.
const PER_EVENT: usize = 500;

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
        let pending: Vec<(Key, (UserId, u64))> = self.lock().drain().collect();
        if pending.is_empty() {
            return;
        }
        // A window of publishes, each awaiting its own ack: pipelined, yet never more than
        // IN_FLIGHT ack permits held. The context's permits are shared by the whole process;
        // a flush that held one per event while asking for the next deadlocked every publish
        // of the process once a flush passed the limit (when every device was an event of its
        // own, a 5,000-member channel did; now 5,000 chats acked in one interval would).
        let mut published = futures::stream::iter(events(pending))
            .map(|(chat, event)| async move {
                let acked = parley_nats::receipts::publish_acked(js, chat, &event).await;
                (chat, event, acked)
            })
            .buffer_unordered(IN_FLIGHT);
        while let Some((chat, event, acked)) = published.next().await {
            if let Err(error) = acked {
                tracing::warn!(%error, "delivered receipts not stored; retrying next flush");
                for d in event.delivered() {
                    self.record(d.user_id, d.device_id, chat, d.up_to);
                }
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

/// A flush's watermarks as events: per chat, at most [`PER_EVENT`] devices each; a lone
/// device is a plain delivered receipt.
fn events(pending: Vec<(Key, (UserId, u64))>) -> Vec<(ChatId, ReceiptEvent)> {
    let mut per_chat: BTreeMap<ChatId, Vec<Delivered>> = BTreeMap::new();
    for ((device_id, chat), (user_id, up_to)) in pending {
        per_chat.entry(chat).or_default().push(Delivered {
            user_id,
            device_id,
            up_to,
        });
    }
    let mut out = Vec::new();
    for (chat, receipts) in per_chat {
        for chunk in receipts.chunks(PER_EVENT) {
            let event = match chunk {
                [one] => ReceiptEvent::Delivered(one.clone()),
                many => ReceiptEvent::DeliveredBatch(DeliveredBatch {
                    receipts: many.to_vec(),
                }),
            };
            out.push((chat, event));
        }
    }
    out
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

    #[test]
    fn a_flush_writes_one_event_per_chat_and_splits_only_what_one_event_cannot_hold() {
        let (group, dm, channel) = (ChatId::new(), ChatId::new(), ChatId::new());
        let mut pending = Vec::new();
        let mut add = |chat: ChatId, n: usize| {
            for i in 0..n {
                pending.push(((DeviceId::new(), chat), (UserId::new(), i as u64 + 1)));
            }
        };
        add(group, 9);
        add(dm, 1);
        add(channel, 2 * PER_EVENT + 1);
        let events = events(pending);
        let of = |chat: ChatId| -> Vec<&ReceiptEvent> {
            events
                .iter()
                .filter(|(c, _)| *c == chat)
                .map(|(_, e)| e)
                .collect()
        };
        let group_events = of(group);
        assert_eq!(group_events.len(), 1);
        assert!(
            matches!(group_events[0], ReceiptEvent::DeliveredBatch(b) if b.receipts.len() == 9)
        );
        assert_eq!(group_events[0].up_to(), 9);
        assert!(matches!(of(dm)[..], [ReceiptEvent::Delivered(_)]));
        let sizes: Vec<usize> = of(channel).iter().map(|e| e.delivered().len()).collect();
        assert_eq!(sizes, [PER_EVENT, PER_EVENT, 1]);
        // Every device of the flush is in exactly one event.
        let devices: std::collections::HashSet<DeviceId> = events
            .iter()
            .flat_map(|(_, e)| e.delivered().iter().map(|d| d.device_id))
            .collect();
        assert_eq!(devices.len(), 9 + 1 + 2 * PER_EVENT + 1);
    }

    /// More chats acked in one interval than the JetStream context lets publishes be in flight
    /// (5,000 acks pending, shared by the whole process). Holding every ack future while
    /// publishing the next once stalled every publish of the process for good: commands,
    /// sign-ups, key writes.
    #[tokio::test]
    async fn a_flush_larger_than_the_in_flight_limit_publishes_everything() {
        let nats = parley_test_support::NatsServer::start().await;
        let js = parley_nats::context(parley_nats::connect(&nats.url()).await.unwrap());
        parley_nats::ensure(&js, &parley_nats::JetStreamSettings::default())
            .await
            .unwrap();
        let b = AckBatcher::default();
        let n = 6_000u64;
        for up_to in 1..=n {
            b.record(UserId::new(), DeviceId::new(), ChatId::new(), up_to);
        }
        tokio::time::timeout(Duration::from_secs(60), b.flush(&js))
            .await
            .expect("a flush of 6,000 chats' receipts finishes within 60 s");
        assert!(b.lock().is_empty(), "no receipt was put back for a retry");
        let mut stream = js.get_stream(parley_nats::streams::RECEIPTS).await.unwrap();
        assert_eq!(stream.info().await.unwrap().state.messages, n);
    }
}
