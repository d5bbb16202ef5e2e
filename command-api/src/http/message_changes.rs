//! `PATCH` / `DELETE /v1/chats/{chat_id}/messages/{message_id}` (edit, delete for everyone) and
//! `PUT` / `DELETE …/reactions/{emoji}`.
//!
//! Each reads the target message's facts from the read model at the chat's current version,
//! then decides and appends only at that version (`execute_at`); if anything else was stored
//! in between, the facts are read again (ADR 7).

use std::collections::BTreeSet;
use std::time::Duration;

use axum::extract::State;
use axum::routing::{patch, put};
use axum::{Json, Router};
use parley_nats::{AppendContext, ExecuteError, Outcome, message_keys};
use parley_platform::{ApiJson, PathIds, Principal};
use parley_schemas::events::SealedBody;
use parley_schemas::{ChatId, Emoji, MessageBody, MessageId, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::messages::require_member;
use crate::domain::chat::{self, ChatCommand};
use crate::domain::message::{MAX_DISTINCT_REACTIONS, MessageChange, MessageFacts};
use crate::error::ApiError;
use crate::state::CommandState;

pub fn router() -> Router<CommandState> {
    Router::new()
        .route(
            "/v1/chats/{chat_id}/messages/{message_id}",
            patch(edit).delete(delete),
        )
        .route(
            "/v1/chats/{chat_id}/messages/{message_id}/reactions/{emoji}",
            put(react).delete(unreact),
        )
}

/// Decide-and-append attempts before answering 409: each failed one means another event of
/// the chat was stored between reading the facts and appending.
const ATTEMPTS: usize = 8;
/// How long a command waits for the read model to reach the chat's version.
const FACTS_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditRequest {
    /// The new body: 1..4000 characters, not only whitespace.
    body: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChangeResponse {
    /// The chat's sequence after the command (its current one when nothing changed).
    sequence: u64,
}

#[utoipa::path(patch, path = "/v1/chats/{chat_id}/messages/{message_id}", request_body = EditRequest,
    params(("chat_id" = String, Path, format = Uuid), ("message_id" = String, Path, format = Uuid)),
    security(("bearer" = [])),
    responses(
        (status = 200, body = ChangeResponse),
        (status = 400, body = parley_platform::Problem),
        (status = 403, body = parley_platform::Problem, description = "not the sender"),
        (status = 404, body = parley_platform::Problem, description = "unknown chat or message, or not a member"),
        (status = 409, body = parley_platform::Problem, description = "the message is deleted"),
        (status = 422, body = parley_platform::Problem, description = "bad body"),
    ))]
pub async fn edit(
    State(state): State<CommandState>,
    me: Principal,
    PathIds((chat_id, message_id)): PathIds<(ChatId, MessageId)>,
    ApiJson(req): ApiJson<EditRequest>,
) -> Result<Json<ChangeResponse>, ApiError> {
    let body = MessageBody::parse(req.body)?;
    let (state, body) = (&state, &body);
    let outcome = change(state, me.user_id, chat_id, message_id, |facts| async move {
        Ok(MessageChange::Edit {
            body: seal_edit(state, me.user_id, chat_id, message_id, facts, body).await?,
        })
    })
    .await?;
    Ok(Json(sequence_of(&outcome)))
}

#[utoipa::path(delete, path = "/v1/chats/{chat_id}/messages/{message_id}",
    params(("chat_id" = String, Path, format = Uuid), ("message_id" = String, Path, format = Uuid)),
    security(("bearer" = [])),
    responses(
        (status = 200, body = ChangeResponse, description = "deleted for everyone; the body is unrecoverable"),
        (status = 403, body = parley_platform::Problem, description = "neither the sender nor an admin"),
        (status = 404, body = parley_platform::Problem, description = "unknown chat or message, or not a member"),
        (status = 409, body = parley_platform::Problem, description = "already deleted"),
    ))]
pub async fn delete(
    State(state): State<CommandState>,
    me: Principal,
    PathIds((chat_id, message_id)): PathIds<(ChatId, MessageId)>,
) -> Result<Json<ChangeResponse>, ApiError> {
    let outcome = change(&state, me.user_id, chat_id, message_id, |_| async {
        Ok(MessageChange::Delete)
    })
    .await?;
    if !outcome.appended.is_empty() {
        // The event is stored: now the key goes. If this fails (or we crash first), the chats
        // projector destroys it when it applies the deletion.
        if let Err(error) = state.keys.destroy(chat_id, message_id).await {
            tracing::warn!(%chat_id, %message_id, %error, "message key not destroyed yet; the projector will");
        }
    }
    Ok(Json(sequence_of(&outcome)))
}

#[utoipa::path(put, path = "/v1/chats/{chat_id}/messages/{message_id}/reactions/{emoji}",
    params(("chat_id" = String, Path, format = Uuid), ("message_id" = String, Path, format = Uuid),
           ("emoji" = String, Path, description = "one percent-encoded emoji, at most 32 bytes")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = ChangeResponse, description = "reacted (already reacting changes nothing)"),
        (status = 404, body = parley_platform::Problem, description = "unknown chat or message, or not a member"),
        (status = 409, body = parley_platform::Problem, description = "the message is deleted"),
        (status = 422, body = parley_platform::Problem, description = "not one emoji, or the message already carries 20 distinct emoji"),
    ))]
pub async fn react(
    State(state): State<CommandState>,
    me: Principal,
    PathIds((chat_id, message_id, emoji)): PathIds<(ChatId, MessageId, String)>,
) -> Result<Json<ChangeResponse>, ApiError> {
    let emoji = Emoji::parse(emoji)?;
    let outcome = change(&state, me.user_id, chat_id, message_id, |_| {
        let emoji = emoji.clone();
        async move {
            Ok(MessageChange::React {
                emoji,
                max_distinct: MAX_DISTINCT_REACTIONS,
            })
        }
    })
    .await?;
    Ok(Json(sequence_of(&outcome)))
}

#[utoipa::path(delete, path = "/v1/chats/{chat_id}/messages/{message_id}/reactions/{emoji}",
    params(("chat_id" = String, Path, format = Uuid), ("message_id" = String, Path, format = Uuid),
           ("emoji" = String, Path, description = "one percent-encoded emoji, at most 32 bytes")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = ChangeResponse, description = "reaction removed (none to remove changes nothing)"),
        (status = 404, body = parley_platform::Problem, description = "unknown chat or message, or not a member"),
        (status = 409, body = parley_platform::Problem, description = "the message is deleted"),
        (status = 422, body = parley_platform::Problem, description = "not one emoji"),
    ))]
pub async fn unreact(
    State(state): State<CommandState>,
    me: Principal,
    PathIds((chat_id, message_id, emoji)): PathIds<(ChatId, MessageId, String)>,
) -> Result<Json<ChangeResponse>, ApiError> {
    let emoji = Emoji::parse(emoji)?;
    let outcome = change(&state, me.user_id, chat_id, message_id, |_| {
        let emoji = emoji.clone();
        async move { Ok(MessageChange::Unreact { emoji }) }
    })
    .await?;
    Ok(Json(sequence_of(&outcome)))
}

fn sequence_of(outcome: &Outcome) -> ChangeResponse {
    ChangeResponse {
        sequence: outcome
            .appended
            .last()
            .map_or(outcome.version, |m| m.sequence),
    }
}

/// Reads the facts, builds the change from them, decides and appends at the facts' version;
/// again on fresh facts when another event got in first.
async fn change<F, Fut>(
    state: &CommandState,
    me: UserId,
    chat_id: ChatId,
    message_id: MessageId,
    make: F,
) -> Result<Outcome, ApiError>
where
    F: Fn(Option<MessageFacts>) -> Fut,
    Fut: Future<Output = Result<MessageChange, ApiError>>,
{
    for _ in 0..ATTEMPTS {
        let (version, target) = facts(state, me, chat_id, message_id).await?;
        let change = make(target.clone()).await?;
        let cmd = ChatCommand::ChangeMessage {
            actor: me,
            message_id,
            target,
            change,
        };
        let ctx = AppendContext::new(me);
        match state
            .chats
            .execute_at(*chat_id.as_uuid(), &ctx, version, |s| chat::decide(s, &cmd))
            .await
        {
            Ok(outcome) => return Ok(outcome),
            Err(ExecuteError::Stale { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Contended)
}

/// The target message's facts, read from the read model once it holds the chat at least at
/// the aggregate's current version, and the exact version they describe. 404 for a non-member.
async fn facts(
    state: &CommandState,
    me: UserId,
    chat_id: ChatId,
    message_id: MessageId,
) -> Result<(u64, Option<MessageFacts>), ApiError> {
    let version = require_member(state, me, chat_id).await?;
    let deadline = tokio::time::Instant::now() + FACTS_WAIT;
    loop {
        // One statement, one snapshot: the facts and the version they belong to agree.
        let row: Option<FactsRow> = sqlx::query_as(
            "SELECT c.last_sequence, m.sender_id, m.deleted, \
                    ARRAY(SELECT DISTINCT r.emoji FROM reactions r WHERE r.message_id = m.message_id) AS emoji, \
                    ARRAY(SELECT r.emoji FROM reactions r WHERE r.message_id = m.message_id AND r.user_id = $3) AS mine \
             FROM chats c LEFT JOIN messages m ON m.chat_id = c.chat_id AND m.message_id = $2 \
             WHERE c.chat_id = $1",
        )
        .bind(chat_id.as_uuid())
        .bind(message_id.as_uuid())
        .bind(me.as_uuid())
        .fetch_optional(&state.pg)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        if let Some(row) = row
            && row.last_sequence >= 0
            && row.last_sequence as u64 >= version
        {
            let facts = row.sender_id.map(|sender| MessageFacts {
                sender_id: UserId::from_uuid(sender),
                deleted: row.deleted.unwrap_or(false),
                emoji: row.emoji.into_iter().collect::<BTreeSet<_>>(),
                mine: row.mine.into_iter().collect::<BTreeSet<_>>(),
            });
            return Ok((row.last_sequence as u64, facts));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::Unavailable(format!(
                "read model of chat {chat_id} has not reached version {version}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(sqlx::FromRow)]
struct FactsRow {
    last_sequence: i64,
    sender_id: Option<uuid::Uuid>,
    deleted: Option<bool>,
    emoji: Vec<String>,
    mine: Vec<String>,
}

/// Seals an edit's body under the message's key. Only for an edit that can succeed (the
/// caller's own live message): anything else gets an empty seal that `decide` refuses before
/// looking at it, so no key is ever made for a message the caller may not edit.
async fn seal_edit(
    state: &CommandState,
    me: UserId,
    chat_id: ChatId,
    message_id: MessageId,
    facts: Option<MessageFacts>,
    body: &MessageBody,
) -> Result<SealedBody, ApiError> {
    match facts {
        Some(f) if f.sender_id == me && !f.deleted => {
            // A v2 message has its key; a v1 (plaintext) message gets one now, create-only.
            let key = state.keys.get_or_create(chat_id, message_id).await?;
            Ok(message_keys::seal(&key, chat_id, message_id, body.as_str()))
        }
        _ => Ok(SealedBody {
            alg: String::new(),
            nonce: String::new(),
            ciphertext: String::new(),
            key: None,
        }),
    }
}
