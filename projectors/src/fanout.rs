//! The fan-out projector: tells gateways, per user, when that user joined or left a chat
//! (`notify.user.<user_id>`), so they start or stop following the chat's live subject. Chat
//! events themselves reach gateways by JetStream republish, one message per event, whatever
//! the number of members.
//!
//! A notice goes out only once the chats projection holds the event: a gateway reads a
//! connecting device's chats from PostgreSQL after subscribing to its notices, so a notice sent
//! earlier could reach neither that read nor the subscription, and the device would miss the
//! chat until its next membership resync.

use std::collections::HashSet;
use std::time::Duration;

use parley_nats::subjects;
use parley_schemas::{ChatEvent, UserId};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::runner::{Delivered, Disposition, decode_all};

pub async fn apply(
    pg: &PgPool,
    nats: &async_nats::Client,
    batch: Vec<Delivered>,
    not_projected_yet: Duration,
) -> Result<Vec<Disposition>, sqlx::Error> {
    let events = decode_all::<ChatEvent>("fanout", &batch);
    let projected = projected_versions(pg, &events).await?;
    // Chats with a deferred notice: their later notices wait too, so they keep their order.
    let mut deferred: HashSet<Uuid> = HashSet::new();
    let mut out = Vec::with_capacity(events.len());
    for event in &events {
        let Some(event) = event else {
            out.push(Disposition::Term);
            continue;
        };
        if changes_membership(&event.event)
            && let Ok(chat) = Uuid::parse_str(&event.meta.subject)
        {
            let version = projected.iter().find(|(c, _)| *c == chat).map(|(_, v)| *v);
            if deferred.contains(&chat) || version.unwrap_or(0) < event.meta.sequence as i64 {
                deferred.insert(chat);
                out.push(Disposition::Retry(not_projected_yet));
                continue;
            }
        }
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
            | ChatEvent::ReactionRemoved(_)
            | ChatEvent::TitleChanged(_)
            | ChatEvent::RoleChanged(_) => Vec::new(),
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

fn changes_membership(event: &ChatEvent) -> bool {
    matches!(
        event,
        ChatEvent::Created(_) | ChatEvent::ParticipantsModified(_)
    )
}

/// The chats projection's version of every chat whose membership the batch changes.
async fn projected_versions(
    pg: &PgPool,
    events: &[Option<parley_schemas::StoredEvent<ChatEvent>>],
) -> Result<Vec<(Uuid, i64)>, sqlx::Error> {
    let chats: Vec<Uuid> = events
        .iter()
        .flatten()
        .filter(|e| changes_membership(&e.event))
        .filter_map(|e| Uuid::parse_str(&e.meta.subject).ok())
        .collect();
    if chats.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as("SELECT chat_id, last_sequence FROM chats WHERE chat_id = ANY($1)")
        .bind(&chats)
        .fetch_all(pg)
        .await
}
