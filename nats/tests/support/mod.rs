//! What the event-store tests share: a minimal aggregate and a reader of a chat's stored events.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use parley_nats::{Aggregate, streams};
use parley_schemas::cloudevent::{self, StoredEvent};
use parley_schemas::events::TitleChanged;
use parley_schemas::{ChatEvent, ChatId, EventId};
use serde::{Deserialize, Serialize};

/// A minimal aggregate: counts a chat's events.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Counter {
    pub messages: u64,
}

impl Aggregate for Counter {
    type Event = ChatEvent;
    const PREFIX: &'static str = "chats";
    const STREAM: &'static str = streams::CHATS;
    const SNAPSHOT_VERSION: u32 = 1;
    fn evolve(mut self, _event: &ChatEvent) -> Self {
        self.messages += 1;
        self
    }
}

/// Any chat event does: `Counter` only counts them.
pub fn any_event() -> ChatEvent {
    ChatEvent::TitleChanged(TitleChanged { title: "t".into() })
}

/// Every stored event of `chat`, in order: (its `sequence`, its id).
pub async fn stored(js: &jetstream::Context, chat: ChatId) -> Vec<(u64, EventId)> {
    let stream = js.get_stream(streams::CHATS).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("chats.{chat}"),
            ..Default::default()
        })
        .await
        .unwrap();
    let pending = consumer.cached_info().num_pending;
    let mut msgs = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < pending {
        let msg = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .expect("stream read timed out")
            .unwrap()
            .unwrap();
        let ev: StoredEvent<ChatEvent> = cloudevent::decode(&msg.payload).unwrap();
        out.push((ev.meta.sequence, ev.meta.id));
    }
    out
}

/// Every stored event of the `CHATS` stream, per chat and in order, read one message at a time
/// from the stream *leader* (not a consumer or a direct get, which a follower may serve from a
/// replica that is still catching up): what a replicated stream really holds.
pub async fn stored_by_leader(
    js: &jetstream::Context,
) -> std::collections::HashMap<ChatId, Vec<(u64, EventId)>> {
    let mut stream = js.get_stream(streams::CHATS).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out: std::collections::HashMap<ChatId, Vec<(u64, EventId)>> = Default::default();
    for seq in state.first_sequence..=state.last_sequence {
        let msg = match stream.get_raw_message(seq).await {
            Ok(msg) => msg,
            // A deleted message leaves a hole in stream sequences; chats' own sequences are
            // checked by the caller.
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                continue;
            }
            Err(e) => panic!("stream message {seq}: {e}"),
        };
        let ev: StoredEvent<ChatEvent> = cloudevent::decode(&msg.payload).unwrap();
        let chat = ChatId::from_uuid(uuid::Uuid::parse_str(&ev.meta.subject).unwrap());
        out.entry(chat)
            .or_default()
            .push((ev.meta.sequence, ev.meta.id));
    }
    out
}
