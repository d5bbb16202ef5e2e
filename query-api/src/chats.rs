//! `GET /v1/chats` and `GET /v1/chats/{chat_id}`: the caller's chats and one chat's detail.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use parley_platform::Principal;
use parley_platform::extract::{ApiQuery, PathIds};
use parley_schemas::frames::MessageView;
use parley_schemas::{ChatId, UserId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::access::{self, MinSequence};
use crate::db;
use crate::error::ApiError;
use crate::openapi::{MessageDoc, ProblemDoc};
use crate::state::QueryState;

pub(crate) fn router() -> Router<QueryState> {
    Router::new()
        .route("/v1/chats", get(list))
        .route("/v1/chats/{chat_id}", get(detail))
}

/// The caller's chats, most recent activity first.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ChatList)]
pub(crate) struct ChatListView {
    pub chats: Vec<ChatSummaryView>,
}

/// One chat as the chat list shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ChatSummary)]
pub(crate) struct ChatSummaryView {
    #[schema(value_type = uuid::Uuid)]
    pub chat_id: ChatId,
    /// `dm`, `group` or `channel`.
    #[schema(example = "group")]
    pub kind: String,
    pub title: Option<String>,
    /// The sequence of the chat's last event the read model holds.
    pub last_sequence: u64,
    /// The newest message, deleted or not; null when the chat has none.
    #[schema(value_type = Option<MessageDoc>)]
    pub last_message: Option<MessageView>,
    /// Others' messages, not deleted, above the caller's read watermark.
    pub unread_count: u64,
    pub muted: bool,
}

/// A chat and its current members.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ChatDetail)]
pub(crate) struct ChatDetailView {
    #[schema(value_type = uuid::Uuid)]
    pub chat_id: ChatId,
    /// `dm`, `group` or `channel`.
    #[schema(example = "group")]
    pub kind: String,
    pub title: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_sequence: u64,
    /// Current members in the order they joined.
    pub members: Vec<MemberView>,
}

/// A current member of a chat.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Member)]
pub(crate) struct MemberView {
    #[schema(value_type = uuid::Uuid)]
    pub user_id: UserId,
    /// Null only for a moment, while the member's user is not projected yet.
    pub handle: Option<String>,
    pub display_name: Option<String>,
    /// `admin` or `member`.
    #[schema(example = "member")]
    pub role: String,
}

/// Query parameters of the chat list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// The chat `min_sequence` refers to; without it `min_sequence` has no chat to wait for
    /// and is ignored.
    #[param(value_type = Option<uuid::Uuid>)]
    chat_id: Option<ChatId>,
    /// Read your writes: wait (up to 2 s, else 503) until the read model holds `chat_id` at
    /// this sequence or later.
    min_sequence: Option<u64>,
}

/// The chats the caller is a current member of, most recent activity first.
#[utoipa::path(
    get,
    path = "/v1/chats",
    operation_id = "listChats",
    tag = "chats",
    security(("bearer" = [])),
    params(ListParams),
    responses(
        (status = 200, description = "The caller's chats", body = ChatListView),
        (status = 400, description = "Malformed query parameter", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "`min_sequence` not reached in time, or read model unavailable; see Retry-After", body = ProblemDoc, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn list(
    principal: Principal,
    State(state): State<QueryState>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<ChatListView>, ApiError> {
    if let Some(chat) = params.chat_id {
        // Only freshness matters here: the list shows nothing of a chat the caller is not in.
        access::fresh_head(&state, principal.user_id, chat, params.min_sequence).await?;
    }
    let chats = db::chats::list(&state.pg, principal.user_id).await?;
    Ok(Json(ChatListView { chats }))
}

/// One chat with its current members; 404 unless the caller is a current member.
#[utoipa::path(
    get,
    path = "/v1/chats/{chat_id}",
    operation_id = "getChat",
    tag = "chats",
    security(("bearer" = [])),
    params(("chat_id" = uuid::Uuid, Path, description = "The chat"), MinSequence),
    responses(
        (status = 200, description = "The chat", body = ChatDetailView),
        (status = 400, description = "Malformed query parameter", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such chat, or the caller is not a member", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "`min_sequence` not reached in time, or read model unavailable; see Retry-After", body = ProblemDoc, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn detail(
    principal: Principal,
    State(state): State<QueryState>,
    PathIds(chat_id): PathIds<ChatId>,
    ApiQuery(params): ApiQuery<MinSequence>,
) -> Result<Json<ChatDetailView>, ApiError> {
    access::require_member(&state, principal.user_id, chat_id, params.min_sequence).await?;
    db::chats::detail(&state.pg, chat_id)
        .await?
        .map(Json)
        .ok_or(ApiError::ChatNotFound)
}
