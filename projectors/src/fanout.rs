//! Membership notices: tells gateways, per user, when that user joined or left a chat
//! (`notify.user.<user_id>`), so they start or stop following the chat's live subject. Chat
//! events themselves reach gateways by JetStream republish, one message per event, whatever
//! the number of members.
//!
//! The chats projector publishes them right after the commit of the batch that holds their
//! events, and before it acks that batch. A gateway reads a connecting device's chats from
//! PostgreSQL after subscribing to its notices, so a notice sent before the read model held its
//! event could reach neither that read nor the subscription; after the commit it reaches one of
//! them. A crash between the commit and the acks redelivers the batch, whose events are then
//! already applied (`Disposition::Ack` without a change) and announced again: at least once,
//! and a repeated notice only makes a gateway follow a chat it already follows.
//!
//! It used to be a projector of its own (`proj-fanout`): a third consumer of every chat event,
//! acting on few of them and waiting for the chats projection before each (ADR 3, addendum).

use parley_nats::subjects;
use parley_schemas::{ChatEvent, StoredEvent, UserId};
use serde_json::json;

use crate::runner::Disposition;

/// One user's membership change, at the position of its event in the batch.
pub struct Notice {
    at: usize,
    user: UserId,
    chat_id: String,
    sequence: u64,
    change: &'static str,
}

/// The notices a batch's events would announce, each with its event's index in the batch.
pub fn notices(events: &[Option<StoredEvent<ChatEvent>>]) -> Vec<Notice> {
    let mut out = Vec::new();
    for (at, event) in events.iter().enumerate() {
        let Some(event) = event else { continue };
        let changes: Vec<(UserId, &'static str)> = match &event.event {
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
            | ChatEvent::ReactionRemoved(_)
            | ChatEvent::TitleChanged(_)
            | ChatEvent::RoleChanged(_) => continue,
        };
        out.extend(changes.into_iter().map(|(user, change)| Notice {
            at,
            user,
            chat_id: event.meta.subject.clone(),
            sequence: event.meta.sequence,
            change,
        }));
    }
    out
}

/// Publishes the notices whose events the committed batch holds: those acked (applied now or
/// before). An event left to retry or terminated announces nothing.
pub async fn publish(nats: &async_nats::Client, notices: Vec<Notice>, applied: &[Disposition]) {
    let mut sent = false;
    for n in notices {
        if applied.get(n.at) != Some(&Disposition::Ack) {
            continue;
        }
        let body = json!({
            "chat_id": n.chat_id,
            "sequence": n.sequence,
            "change": n.change,
        });
        // Core NATS is best effort; a gateway that misses this still learns the chat on the
        // user's next connect or its 30 s membership resync (read from PostgreSQL then).
        if let Err(e) = nats
            .publish(subjects::notify_user(n.user), body.to_string().into())
            .await
        {
            tracing::warn!(error = %e, "notify publish failed");
        }
        sent = true;
    }
    if sent && let Err(e) = nats.flush().await {
        tracing::warn!(error = %e, "notify flush failed");
    }
}
