//! `PUT /v1/chats/{chat_id}/settings`: the caller's own mute and notify level in a chat.
//!
//! Stored as a user event (`parley.user.chat_settings_changed.v1` on `users.<user_id>`), not a
//! chat event: it takes no chat sequence, sends no chatUpdate to the other members, and so
//! never shows one member's settings to anyone else (docs/adr/0006).

use axum::extract::State;
use axum::routing::put;
use axum::{Json, Router};
use parley_nats::AppendContext;
use parley_platform::{ApiJson, PathIds, Principal};
use parley_schemas::{ChatId, NotifyLevel};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::Rejection;
use crate::domain::user::{self, UserCommand};
use crate::error::ApiError;
use crate::state::CommandState;

pub fn router() -> Router<CommandState> {
    Router::new().route("/v1/chats/{chat_id}/settings", put(change))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsRequest {
    muted: Option<bool>,
    /// `all`, `mentions` or `none`.
    #[schema(value_type = Option<String>, example = "mentions")]
    notify: Option<NotifyLevel>,
}

/// The caller's settings in the chat after the change.
#[derive(Debug, Serialize, ToSchema)]
pub struct SettingsResponse {
    #[schema(value_type = String, format = Uuid)]
    chat_id: ChatId,
    muted: bool,
    #[schema(value_type = String, example = "all")]
    notify: NotifyLevel,
}

#[utoipa::path(put, path = "/v1/chats/{chat_id}/settings", request_body = SettingsRequest,
    params(("chat_id" = String, Path, format = Uuid)),
    security(("bearer" = [])),
    description = "The caller's own settings in the chat; absent fields keep their value. Private to the caller: no chat event, no chatUpdate.",
    responses(
        (status = 200, body = SettingsResponse),
        (status = 400, body = parley_platform::Problem, description = "malformed, or an unknown notify level"),
        (status = 404, body = parley_platform::Problem, description = "unknown chat or not a member"),
    ))]
pub async fn change(
    State(state): State<CommandState>,
    me: Principal,
    PathIds(chat_id): PathIds<ChatId>,
    ApiJson(req): ApiJson<SettingsRequest>,
) -> Result<Json<SettingsResponse>, ApiError> {
    let member = state
        .chats
        .read(*chat_id.as_uuid(), |c, _| c.is_member(me.user_id))
        .await?;
    if !member {
        return Err(Rejection::NotFound.into());
    }
    let cmd = UserCommand::ChangeChatSettings {
        chat_id,
        muted: req.muted,
        notify: req.notify,
    };
    state
        .users
        .execute(
            *me.user_id.as_uuid(),
            &AppendContext::new(me.user_id),
            |s| user::decide(s, &cmd),
        )
        .await?;
    let now = state
        .users
        .read(*me.user_id.as_uuid(), |u, _| u.chat_settings(chat_id))
        .await?;
    Ok(Json(SettingsResponse {
        chat_id,
        muted: now.muted,
        notify: now.notify,
    }))
}
