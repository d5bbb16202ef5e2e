//! Who may read a chat, and read your writes: a chat query first waits until the read model
//! holds the chat at the caller's `min_sequence`, then requires a current membership.
//!
//! The wait comes first on purpose: a user just added to a chat at sequence S asks with
//! `min_sequence=S`, and must not get a 404 because the projector has not written the
//! membership yet. Membership is not cached, so a removal counts from the very read that shows
//! it (a `min_sequence` at the removal's sequence sees the 404).

use std::time::Duration;

use parley_schemas::{ChatId, UserId};
use tokio::time::Instant;

use crate::db::chats::{self, ChatHead};
use crate::error::ApiError;
use crate::state::QueryState;

/// How often a waiting query looks at the read model again. Projectors do not notify, and a
/// primary-key lookup every 15 ms per waiting request is cheap.
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(15);

/// Succeeds when `user` is a current member of `chat` in a read model at `min_sequence` or later.
/// Unknown chats and chats the user is not in fail alike, with `ChatNotFound`.
pub(crate) async fn require_member(
    state: &QueryState,
    user: UserId,
    chat: ChatId,
    min_sequence: Option<u64>,
) -> Result<(), ApiError> {
    match fresh_head(state, user, chat, min_sequence).await? {
        Some(head) if head.is_member => Ok(()),
        _ => Err(ApiError::ChatNotFound),
    }
}

/// Succeeds when `user` is a current admin of `chat` (after the `min_sequence` wait): 403 for
/// other members, and the same 404 as `require_member` for everyone else.
pub(crate) async fn require_admin(
    state: &QueryState,
    user: UserId,
    chat: ChatId,
    min_sequence: Option<u64>,
) -> Result<(), ApiError> {
    require_member(state, user, chat, min_sequence).await?;
    match chats::role(&state.pg, chat, user).await?.as_deref() {
        Some("admin") => Ok(()),
        Some(_) => Err(ApiError::NotAdmin),
        // Left between the two reads: no longer a member.
        None => Err(ApiError::ChatNotFound),
    }
}

/// The chat's head once the read model holds it at `min_sequence` or later (at once without
/// one); `Behind` when the configured wait runs out first.
pub(crate) async fn fresh_head(
    state: &QueryState,
    user: UserId,
    chat: ChatId,
    min_sequence: Option<u64>,
) -> Result<Option<ChatHead>, ApiError> {
    // A chat starts at sequence 1, so 0 asks for nothing.
    let Some(want) = min_sequence.filter(|&s| s > 0) else {
        return Ok(chats::head(&state.pg, chat, user).await?);
    };
    if want > MAX_SEQUENCE {
        return Err(ApiError::Invalid(format!(
            "min_sequence must be at most {MAX_SEQUENCE}"
        )));
    }
    let deadline = Instant::now() + state.config.min_sequence_wait;
    loop {
        let head = chats::head(&state.pg, chat, user).await?;
        let have = head.map(|h| h.last_sequence());
        if have.is_some_and(|have| have >= want) {
            return Ok(head);
        }
        let now = Instant::now();
        if now >= deadline {
            // Waiting longer cannot help when the chat's stored version is below the ask: a
            // member made a mistake (422, not "retry"), and for anyone else the chat does not
            // exist at that sequence (the usual 404). Only a real lag answers 503.
            if let Stored::Below = stored_version(state, chat, want).await {
                return match head {
                    Some(h) => Err(ApiError::Invalid(format!(
                        "min_sequence {want} is beyond this chat's last sequence ({} here)",
                        h.last_sequence()
                    ))),
                    None => Ok(None),
                };
            }
            return Err(ApiError::Behind {
                chat_id: chat,
                have,
                want,
            });
        }
        // The last look happens at the deadline itself, never past it.
        tokio::time::sleep(POLL_EVERY.min(deadline - now)).await;
    }
}

/// Sequences are PostgreSQL `bigint`s.
const MAX_SEQUENCE: u64 = i64::MAX as u64;

/// Where the chat's stored version (its last event's `sequence` in `CHATS`) is against an ask.
enum Stored {
    /// Below it, or the chat has no events at all.
    Below,
    /// At or above it, or it could not be read (so the answer stays "retry").
    NotBelow,
}

async fn stored_version(state: &QueryState, chat: ChatId, want: u64) -> Stored {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    let Ok(stream) = state.js.get_stream(parley_nats::streams::CHATS).await else {
        return Stored::NotBelow;
    };
    match stream
        .direct_get_last_for_subject(format!("chats.{chat}"))
        .await
    {
        Ok(msg) => {
            match parley_schemas::cloudevent::decode::<parley_schemas::ChatEvent>(&msg.payload) {
                Ok(event) if event.meta.sequence < want => Stored::Below,
                _ => Stored::NotBelow,
            }
        }
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Stored::Below,
        Err(_) => Stored::NotBelow,
    }
}

/// The read-your-writes parameter every chat route accepts.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct MinSequence {
    /// Read your writes: wait (up to 2 s, else 503) until the read model holds the chat at this
    /// sequence or later; 422 when the chat never reached it.
    pub min_sequence: Option<u64>,
}
