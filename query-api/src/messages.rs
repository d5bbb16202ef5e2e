//! `GET /v1/chats/{chat_id}/messages`: a chat's history, paged by sequence; and
//! `GET /v1/chats/{chat_id}/messages/{message_id}/thread`: one thread's replies.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use parley_platform::Principal;
use parley_platform::extract::{ApiQuery, PathIds};
use parley_schemas::frames::MessageView;
use parley_schemas::{ChatId, MessageId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::QueryConfig;
use crate::access;
use crate::db;
use crate::db::messages::Cursor;
use crate::error::ApiError;
use crate::openapi::{MessageDoc, ProblemDoc};
use crate::state::QueryState;

pub(crate) fn router() -> Router<QueryState> {
    Router::new()
        .route("/v1/chats/{chat_id}/messages", get(history))
        .route(
            "/v1/chats/{chat_id}/messages/{message_id}/thread",
            get(thread),
        )
}

/// A thread: its root and a page of its replies, oldest first.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ThreadPage)]
pub(crate) struct ThreadPageView {
    /// The message that started the thread, with its summary (`thread_reply_count`,
    /// `last_reply_at`).
    #[schema(value_type = MessageDoc)]
    pub root: MessageView,
    #[schema(value_type = Vec<MessageDoc>)]
    pub messages: Vec<MessageView>,
    /// Whether newer replies lie beyond this page (ask again with `after` = the last sequence).
    pub has_more: bool,
}

/// Query parameters of a thread page.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ThreadParams {
    /// The oldest replies with a sequence above this (default 0: from the first reply).
    after: Option<u64>,
    /// Page size, 1 to 200 (default 50); 422 outside.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u64>,
    /// Read your writes: wait (up to 2 s, else 503) until the read model holds the chat at this
    /// sequence or later.
    min_sequence: Option<u64>,
}

/// A page of history, oldest first.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = MessagePage)]
pub(crate) struct MessagePageView {
    #[schema(value_type = Vec<MessageDoc>)]
    pub messages: Vec<MessageView>,
    /// Whether more messages lie beyond this page in the paging direction (older for
    /// `before` or no cursor, newer for `after`).
    pub has_more: bool,
}

/// Query parameters of a history page.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct HistoryParams {
    /// Page backwards: the newest messages with a sequence below this. Without `before` and
    /// `after`, the newest messages of all.
    before: Option<u64>,
    /// Page forwards: the oldest messages with a sequence above this. Not with `before`.
    after: Option<u64>,
    /// Page size, 1 to 200 (default 50); 422 outside.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u64>,
    /// Read your writes: wait (up to 2 s, else 503) until the read model holds the chat at this
    /// sequence or later.
    min_sequence: Option<u64>,
}

impl HistoryParams {
    /// The page asked for: 400 for `before` with `after`, 422 for a size out of range.
    fn page(&self, config: &QueryConfig) -> Result<(Cursor, u32), ApiError> {
        let cursor = match (self.before, self.after) {
            (Some(_), Some(_)) => {
                return Err(ApiError::Malformed(
                    "`before` and `after` cannot be combined; page one way at a time".into(),
                ));
            }
            (Some(before), None) => Cursor::Before(before),
            (None, Some(after)) => Cursor::After(after),
            (None, None) => Cursor::Before(u64::MAX),
        };
        let max = config.max_page.max(1);
        let limit = match self.limit {
            None => config.default_page.clamp(1, max),
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| ApiError::Invalid(format!("limit must be 1 to {max}, not {n}")))?,
        };
        Ok((cursor, limit))
    }
}

/// A page of the chat's messages, oldest first; 404 unless the caller is a current member.
#[utoipa::path(
    get,
    path = "/v1/chats/{chat_id}/messages",
    operation_id = "listMessages",
    tag = "messages",
    security(("bearer" = [])),
    params(("chat_id" = uuid::Uuid, Path, description = "The chat"), HistoryParams),
    responses(
        (status = 200, description = "A page of messages, oldest first", body = MessagePageView),
        (status = 400, description = "Malformed query parameter, or `before` with `after`", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such chat, or the caller is not a member", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "`limit` out of range, or `min_sequence` beyond the chat", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "`min_sequence` not reached in time, or read model unavailable; see Retry-After", body = ProblemDoc, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn history(
    principal: Principal,
    State(state): State<QueryState>,
    PathIds(chat_id): PathIds<ChatId>,
    ApiQuery(params): ApiQuery<HistoryParams>,
) -> Result<Json<MessagePageView>, ApiError> {
    let (cursor, limit) = params.page(&state.config)?;
    let me = principal.user_id;
    // The page query checks membership itself, so the common read is one round trip. The
    // separate check runs first when there is a `min_sequence` to wait for, and after an empty
    // page, which is either "nothing there" or "no access" (404).
    let wait = params.min_sequence.is_some_and(|s| s > 0);
    if wait {
        access::require_member(&state, me, chat_id, params.min_sequence).await?;
    }
    let page = db::messages::page(&state.pg, chat_id, me, cursor, limit).await?;
    if page.messages.is_empty() && !wait {
        access::require_member(&state, me, chat_id, None).await?;
    }
    Ok(Json(MessagePageView {
        messages: page.messages,
        has_more: page.has_more,
    }))
}

/// The replies of a thread, oldest first, keyset-paged like history; 404 unless the caller is
/// a current member and `message_id` starts a thread of this chat (any message in no thread
/// may: a root without replies answers an empty page).
#[utoipa::path(
    get,
    path = "/v1/chats/{chat_id}/messages/{message_id}/thread",
    operation_id = "listThread",
    tag = "messages",
    security(("bearer" = [])),
    params(
        ("chat_id" = uuid::Uuid, Path, description = "The chat"),
        ("message_id" = uuid::Uuid, Path, description = "The thread's root message"),
        ThreadParams
    ),
    responses(
        (status = 200, description = "The root and a page of its replies, oldest first", body = ThreadPageView),
        (status = 400, description = "Malformed query parameter", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such chat or root message, the message is itself a thread reply, or the caller is not a member", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "`limit` out of range, or `min_sequence` beyond the chat", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "`min_sequence` not reached in time, or read model unavailable; see Retry-After", body = ProblemDoc, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn thread(
    principal: Principal,
    State(state): State<QueryState>,
    PathIds((chat_id, root_id)): PathIds<(ChatId, MessageId)>,
    ApiQuery(params): ApiQuery<ThreadParams>,
) -> Result<Json<ThreadPageView>, ApiError> {
    let history = HistoryParams {
        before: None,
        after: params.after,
        limit: params.limit,
        min_sequence: None,
    };
    let (_, limit) = history.page(&state.config)?;
    access::require_member(&state, principal.user_id, chat_id, params.min_sequence).await?;
    let root = db::messages::by_id(&state.pg, chat_id, root_id)
        .await?
        .filter(|m| m.thread_root.is_none())
        .ok_or(ApiError::MessageNotFound)?;
    let page = db::messages::thread_page(
        &state.pg,
        chat_id,
        root_id,
        params.after.unwrap_or(0),
        limit,
    )
    .await?;
    Ok(Json(ThreadPageView {
        root,
        messages: page.messages,
        has_more: page.has_more,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(before: Option<u64>, after: Option<u64>, limit: Option<u64>) -> HistoryParams {
        HistoryParams {
            before,
            after,
            limit,
            min_sequence: None,
        }
    }

    #[test]
    fn no_cursor_pages_back_from_the_newest_with_the_default_size() {
        let page = params(None, None, None).page(&QueryConfig::default());
        assert_eq!(page.ok(), Some((Cursor::Before(u64::MAX), 50)));
    }

    #[test]
    fn limit_outside_one_to_max_is_invalid() {
        for n in [0, 201, u64::from(u32::MAX) + 1] {
            let page = params(None, None, Some(n)).page(&QueryConfig::default());
            assert!(matches!(page, Err(ApiError::Invalid(_))), "limit {n}");
        }
        let page = params(None, Some(3), Some(200)).page(&QueryConfig::default());
        assert_eq!(page.ok(), Some((Cursor::After(3), 200)));
    }

    #[test]
    fn before_with_after_is_malformed() {
        let page = params(Some(9), Some(3), None).page(&QueryConfig::default());
        assert!(matches!(page, Err(ApiError::Malformed(_))));
    }
}
