//! `PATCH /v1/chats/{chat_id}` (the title) and `PUT /v1/chats/{chat_id}/members/{user_id}/role`:
//! what a chat's admins change about it. Both are chat events every member sees.

use axum::extract::State;
use axum::routing::{patch, put};
use axum::{Json, Router};
use parley_nats::AppendContext;
use parley_platform::{ApiJson, PathIds, Principal};
use parley_schemas::{ChatId, ChatTitle, Role, UserId};
use serde::Deserialize;
use utoipa::ToSchema;

use super::chats::SequenceResponse;
use crate::domain::chat::{self, ChatCommand};
use crate::error::ApiError;
use crate::state::CommandState;

pub fn router() -> Router<CommandState> {
    Router::new()
        .route("/v1/chats/{chat_id}", patch(change_title))
        .route(
            "/v1/chats/{chat_id}/members/{user_id}/role",
            put(change_role),
        )
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TitleRequest {
    /// 1..128 characters.
    title: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleRequest {
    /// `admin` or `member`.
    #[schema(value_type = String, example = "admin")]
    role: Role,
}

#[utoipa::path(patch, path = "/v1/chats/{chat_id}", request_body = TitleRequest,
    params(("chat_id" = String, Path, format = Uuid)),
    security(("bearer" = [])),
    description = "Renames a group or channel (admins only); members get a `title_changed` chatUpdate. The same title again changes nothing.",
    responses(
        (status = 200, body = SequenceResponse),
        (status = 403, body = parley_platform::Problem, description = "not an admin"),
        (status = 404, body = parley_platform::Problem, description = "unknown chat or not a member"),
        (status = 422, body = parley_platform::Problem, description = "bad title, or a dm (which has none)"),
    ))]
pub async fn change_title(
    State(state): State<CommandState>,
    me: Principal,
    PathIds(chat_id): PathIds<ChatId>,
    ApiJson(req): ApiJson<TitleRequest>,
) -> Result<Json<SequenceResponse>, ApiError> {
    let cmd = ChatCommand::ChangeTitle {
        actor: me.user_id,
        title: ChatTitle::parse(req.title)?,
    };
    decide(&state, me, chat_id, &cmd).await
}

#[utoipa::path(put, path = "/v1/chats/{chat_id}/members/{user_id}/role", request_body = RoleRequest,
    params(("chat_id" = String, Path, format = Uuid), ("user_id" = String, Path, format = Uuid)),
    security(("bearer" = [])),
    description = "Makes a member `admin` or `member` (admins only); members get a `role_changed` chatUpdate. A chat always keeps an admin.",
    responses(
        (status = 200, body = SequenceResponse),
        (status = 403, body = parley_platform::Problem, description = "not an admin"),
        (status = 404, body = parley_platform::Problem, description = "unknown chat, caller or user not a member"),
        (status = 422, body = parley_platform::Problem, description = "demoting the last admin, or a dm"),
    ))]
pub async fn change_role(
    State(state): State<CommandState>,
    me: Principal,
    PathIds((chat_id, user_id)): PathIds<(ChatId, UserId)>,
    ApiJson(req): ApiJson<RoleRequest>,
) -> Result<Json<SequenceResponse>, ApiError> {
    let cmd = ChatCommand::ChangeRole {
        actor: me.user_id,
        user: user_id,
        role: req.role,
    };
    decide(&state, me, chat_id, &cmd).await
}

/// Decides `cmd` on the chat and appends what it yields; answers the chat's version after it.
async fn decide(
    state: &CommandState,
    me: Principal,
    chat_id: ChatId,
    cmd: &ChatCommand,
) -> Result<Json<SequenceResponse>, ApiError> {
    let outcome = state
        .chats
        .execute(*chat_id.as_uuid(), &AppendContext::new(me.user_id), |s| {
            chat::decide(s, cmd)
        })
        .await?;
    Ok(Json(SequenceResponse {
        sequence: outcome.version,
    }))
}
