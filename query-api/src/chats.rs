//! `GET /v1/chats` and `GET /v1/chats/{chat_id}`: the caller's chats and one chat's detail;
//! `GET /v1/channels`: public channels anyone may join.

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
        .route("/v1/channels", get(channels))
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
    /// The caller's own setting (`PUT /v1/chats/{chat_id}/settings`).
    pub muted: bool,
    /// The caller's own notify level: `all`, `mentions` or `none`.
    #[schema(example = "all")]
    pub notify: String,
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
    /// `public` (a channel anyone may join) or `private`.
    #[schema(example = "private")]
    pub visibility: String,
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

/// Public channels, most recent activity first.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ChannelList)]
pub(crate) struct ChannelListView {
    pub channels: Vec<ChannelView>,
}

/// A public channel as discovery shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Channel)]
pub(crate) struct ChannelView {
    #[schema(value_type = uuid::Uuid)]
    pub chat_id: ChatId,
    pub title: Option<String>,
    pub created_at: DateTime<Utc>,
    pub member_count: u64,
    /// Whether the caller is already a member.
    pub is_member: bool,
}

/// Query parameters of channel discovery.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ChannelParams {
    /// Only channels whose title contains this (case-insensitive), 1..128 characters.
    q: Option<String>,
    /// Most channels to return, 1 to 200 (default 50); 422 outside.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u64>,
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
        (status = 422, description = "`min_sequence` beyond the chat (a member asking for a sequence it never reached)", body = ProblemDoc, content_type = "application/problem+json"),
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

/// Public channels (optionally those whose title contains `q`), to join with
/// `POST /v1/chats/{chat_id}/participants {"add": [me]}`.
#[utoipa::path(
    get,
    path = "/v1/channels",
    operation_id = "listPublicChannels",
    tag = "chats",
    security(("bearer" = [])),
    params(ChannelParams),
    responses(
        (status = 200, description = "Public channels, most recent activity first", body = ChannelListView),
        (status = 400, description = "Malformed query parameter", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "`q` or `limit` out of range", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn channels(
    principal: Principal,
    State(state): State<QueryState>,
    ApiQuery(params): ApiQuery<ChannelParams>,
) -> Result<Json<ChannelListView>, ApiError> {
    let max = state.config.max_page.max(1);
    let limit = match params.limit {
        None => state.config.default_page.clamp(1, max),
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| ApiError::Invalid(format!("limit must be 1 to {max}, not {n}")))?,
    };
    let q = params.q.as_deref().filter(|q| !q.is_empty());
    if q.is_some_and(|q| q.chars().count() > 128) {
        return Err(ApiError::Invalid("q must be at most 128 characters".into()));
    }
    let channels = db::chats::public_channels(&state.pg, principal.user_id, q, limit).await?;
    Ok(Json(ChannelListView { channels }))
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
        (status = 422, description = "`min_sequence` beyond the chat (a member asking for a sequence it never reached)", body = ProblemDoc, content_type = "application/problem+json"),
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
