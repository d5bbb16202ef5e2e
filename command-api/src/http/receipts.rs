//! `POST /v1/chats/{chat_id}/read`: a cumulative read receipt, appended to `RECEIPTS` (the
//! receipts projector moves the member's read watermark; unread counts follow).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use parley_platform::{ApiJson, PathIds, Principal};
use parley_schemas::events::Read;
use parley_schemas::{ChatId, ReceiptEvent};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::messages::require_member;
use crate::error::ApiError;
use crate::state::CommandState;

pub fn router() -> Router<CommandState> {
    Router::new().route("/v1/chats/{chat_id}/read", post(read))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadRequest {
    /// The caller has read every event of the chat up to this sequence (1..=last sequence).
    up_to: u64,
}

#[utoipa::path(post, path = "/v1/chats/{chat_id}/read", request_body = ReadRequest,
    params(("chat_id" = String, Path, format = Uuid)),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "recorded; read watermarks only move up"),
        (status = 404, body = parley_platform::Problem, description = "unknown chat or not a member"),
        (status = 422, body = parley_platform::Problem, description = "up_to is 0 or beyond the chat's last sequence"),
    ))]
pub async fn read(
    State(state): State<CommandState>,
    me: Principal,
    PathIds(chat_id): PathIds<ChatId>,
    ApiJson(req): ApiJson<ReadRequest>,
) -> Result<StatusCode, ApiError> {
    let version = require_member(&state, me.user_id, chat_id).await?;
    if req.up_to == 0 || req.up_to > version {
        return Err(ApiError::Invalid(format!(
            "up_to must be between 1 and the chat's last sequence ({version})"
        )));
    }
    let event = ReceiptEvent::Read(Read {
        user_id: me.user_id,
        up_to: req.up_to,
    });
    parley_nats::receipts::publish_acked(&state.js, chat_id, &event)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}
