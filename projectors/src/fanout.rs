//! The fan-out projector: tells gateways, per user, when that user joined or left a chat
//! (`notify.user.<user_id>`), so they start or stop following the chat's live subject. Chat
//! events themselves reach gateways by JetStream republish, one message per event, whatever
//! the number of members.

use parley_nats::subjects;
use parley_schemas::{ChatEvent, UserId};
use serde_json::json;

use crate::runner::{Delivered, Disposition, decode_all};

pub async fn apply(
    nats: &async_nats::Client,
    batch: Vec<Delivered>,
) -> Result<Vec<Disposition>, sqlx::Error> {
    let events = decode_all::<ChatEvent>("fanout", &batch);
    let mut out = Vec::with_capacity(events.len());
    for event in &events {
        let Some(event) = event else {
            out.push(Disposition::Term);
            continue;
        };
        let changes: Vec<(UserId, &str)> = match &event.event {
            ChatEvent::Created(c) => c.members.iter().map(|m| (m.user_id, "added")).collect(),
            ChatEvent::ParticipantsModified(p) => p
                .added
                .iter()
                .map(|u| (*u, "added"))
                .chain(p.removed.iter().map(|u| (*u, "removed")))
                .collect(),
            ChatEvent::MessageSent(_)
            | ChatEvent::MessageSentV2(_)
            | ChatEvent::MessageEdited(_)
            | ChatEvent::MessageDeleted(_)
            | ChatEvent::ReactionAdded(_)
            | ChatEvent::ReactionRemoved(_) => Vec::new(),
        };
        for (user, change) in changes {
            let body = json!({
                "chat_id": event.meta.subject,
                "sequence": event.meta.sequence,
                "change": change,
            });
            // Core NATS is best effort; a gateway that misses this still learns the chat on
            // the user's next connect (membership is read from PostgreSQL then).
            if let Err(e) = nats
                .publish(subjects::notify_user(user), body.to_string().into())
                .await
            {
                tracing::warn!(error = %e, "notify publish failed");
            }
        }
        out.push(Disposition::Ack);
    }
    if let Err(e) = nats.flush().await {
        tracing::warn!(error = %e, "notify flush failed");
    }
    Ok(out)
}
