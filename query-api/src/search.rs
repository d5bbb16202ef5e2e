//! `GET /v1/search`: full-text search over the messages of the caller's current chats, ranked,
//! with snippets; deleted messages are never found and edits are found by their new body.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use parley_platform::Principal;
use parley_platform::extract::ApiQuery;
use parley_schemas::{ChatId, MessageId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::access;
use crate::db;
use crate::error::ApiError;
use crate::openapi::ProblemDoc;
use crate::state::QueryState;

pub(crate) fn router() -> Router<QueryState> {
    Router::new().route("/v1/search", get(search))
}

/// Longest query, in characters.
const MAX_QUERY_CHARS: usize = 256;
/// Largest and default page of results.
const MAX_RESULTS: u32 = 50;
const DEFAULT_RESULTS: u32 = 20;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct SearchParams {
    /// What to look for, 1..256 characters, web-search syntax: words, `"a phrase"`, `or`,
    /// `-word`. Anything else is treated as words; it is never an error.
    q: String,
    /// Only this chat (404 unless the caller is a member).
    #[param(value_type = Option<uuid::Uuid>)]
    chat_id: Option<ChatId>,
    /// Results, 1 to 50 (default 20); 422 outside.
    #[param(minimum = 1, maximum = 50)]
    limit: Option<u64>,
}

impl SearchParams {
    /// The validated query and page size: 422 for an empty, too long or control-character
    /// query, or a size out of range.
    fn checked(&self) -> Result<(&str, u32), ApiError> {
        let n = self.q.chars().count();
        if n == 0 || n > MAX_QUERY_CHARS || self.q.trim().is_empty() {
            return Err(ApiError::Invalid(format!(
                "q must be 1 to {MAX_QUERY_CHARS} characters, not blank"
            )));
        }
        if self.q.chars().any(char::is_control) {
            return Err(ApiError::Invalid(
                "q must not contain control characters".into(),
            ));
        }
        let limit = match self.limit {
            None => DEFAULT_RESULTS,
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (1..=MAX_RESULTS).contains(n))
                .ok_or_else(|| {
                    ApiError::Invalid(format!("limit must be 1 to {MAX_RESULTS}, not {n}"))
                })?,
        };
        Ok((&self.q, limit))
    }
}

/// Search results, best first.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = SearchResults)]
pub(crate) struct SearchView {
    pub results: Vec<SearchHitView>,
}

/// One matching message.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = SearchHit)]
pub(crate) struct SearchHitView {
    #[schema(value_type = uuid::Uuid)]
    pub chat_id: ChatId,
    #[schema(value_type = uuid::Uuid)]
    pub message_id: MessageId,
    pub sequence: u64,
    /// Plain text (not HTML; not escaped) around the matches, each match between `**`.
    pub snippet: String,
    pub sent_at: DateTime<Utc>,
}

/// Messages of the caller's current chats matching `q`, best first.
#[utoipa::path(
    get,
    path = "/v1/search",
    operation_id = "searchMessages",
    tag = "search",
    security(("bearer" = [])),
    params(SearchParams),
    responses(
        (status = 200, description = "Matches, best first", body = SearchView),
        (status = 400, description = "Missing `q` or malformed parameter", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "`chat_id` names no chat of the caller", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "`q` empty, over 256 characters or with control characters; `limit` out of range", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Read model unavailable; see Retry-After", body = ProblemDoc, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn search(
    principal: Principal,
    State(state): State<QueryState>,
    ApiQuery(params): ApiQuery<SearchParams>,
) -> Result<Json<SearchView>, ApiError> {
    let (q, limit) = params.checked()?;
    if let Some(chat) = params.chat_id {
        access::require_member(&state, principal.user_id, chat, None).await?;
    }
    let hits = db::search::search(&state.pg, principal.user_id, q, params.chat_id, limit).await?;
    Ok(Json(SearchView {
        results: hits
            .into_iter()
            .map(|h| SearchHitView {
                chat_id: h.chat_id,
                message_id: h.message_id,
                sequence: h.sequence,
                snippet: h.snippet,
                sent_at: h.sent_at,
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(q: &str, limit: Option<u64>) -> SearchParams {
        SearchParams {
            q: q.into(),
            chat_id: None,
            limit,
        }
    }

    #[test]
    fn a_query_must_be_1_to_256_characters_without_control_characters() {
        assert!(params("hello", None).checked().is_ok());
        assert!(params(&"é".repeat(256), None).checked().is_ok());
        for bad in ["", "   ", "a\u{0}b", "tab\there"] {
            assert!(
                matches!(params(bad, None).checked(), Err(ApiError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            params(&"é".repeat(257), None).checked(),
            Err(ApiError::Invalid(_))
        ));
    }

    #[test]
    fn limit_is_1_to_50_and_defaults_to_20() {
        assert_eq!(params("x", None).checked().ok().map(|c| c.1), Some(20));
        assert_eq!(params("x", Some(50)).checked().ok().map(|c| c.1), Some(50));
        for n in [0, 51] {
            assert!(matches!(
                params("x", Some(n)).checked(),
                Err(ApiError::Invalid(_))
            ));
        }
    }
}
