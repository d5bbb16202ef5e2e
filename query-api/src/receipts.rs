//! `GET /v1/chats/{chat_id}/messages/{message_id}/receipts`: who has the message (a device of
//! theirs acked past it) and who has read it, from the members' cumulative watermarks.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use parley_platform::Principal;
use parley_platform::extract::{ApiQuery, PathIds};
use parley_schemas::{ChatId, MessageId, UserId};
use serde::Serialize;
use utoipa::ToSchema;

use crate::access::{self, MinSequence};
use crate::error::ApiError;
use crate::openapi::ProblemDoc;
use crate::state::QueryState;

pub(crate) fn router() -> Router<QueryState> {
    Router::new().route(
        "/v1/chats/{chat_id}/messages/{message_id}/receipts",
        get(receipts),
    )
}

/// Receipts of one message; the sender is in neither list.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReceiptsView {
    #[schema(value_type = Vec<String>)]
    pub delivered_to: Vec<UserId>,
    #[schema(value_type = Vec<String>)]
    pub read_by: Vec<UserId>,
}

#[utoipa::path(
    get,
    path = "/v1/chats/{chat_id}/messages/{message_id}/receipts",
    operation_id = "messageReceipts",
    tag = "messages",
    security(("bearer" = [])),
    params(("chat_id" = uuid::Uuid, Path), ("message_id" = uuid::Uuid, Path), MinSequence),
    responses(
        (status = 200, body = ReceiptsView),
        (status = 401, body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such chat or message, or the caller is not a member", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn receipts(
    principal: Principal,
    State(state): State<QueryState>,
    PathIds((chat_id, message_id)): PathIds<(ChatId, MessageId)>,
    ApiQuery(params): ApiQuery<MinSequence>,
) -> Result<Json<ReceiptsView>, ApiError> {
    access::require_member(&state, principal.user_id, chat_id, params.min_sequence).await?;
    let rows: Vec<(uuid::Uuid, bool, bool)> = sqlx::query_as(
        "SELECT m.user_id, m.delivered_up_to >= msg.sequence OR m.read_up_to >= msg.sequence, \
                m.read_up_to >= msg.sequence \
         FROM messages msg JOIN members m ON m.chat_id = msg.chat_id \
         WHERE msg.chat_id = $1 AND msg.message_id = $2 AND m.user_id <> msg.sender_id \
           AND m.joined_seq <= msg.sequence AND (m.left_seq IS NULL OR m.left_seq >= msg.sequence) \
         ORDER BY m.user_id",
    )
    .bind(chat_id.as_uuid())
    .bind(message_id.as_uuid())
    .fetch_all(&state.pg)
    .await?;
    let exists: Option<(i32,)> =
        sqlx::query_as("SELECT 1 FROM messages WHERE chat_id = $1 AND message_id = $2")
            .bind(chat_id.as_uuid())
            .bind(message_id.as_uuid())
            .fetch_optional(&state.pg)
            .await?;
    if exists.is_none() {
        return Err(ApiError::ChatNotFound);
    }
    Ok(Json(ReceiptsView {
        delivered_to: rows
            .iter()
            .filter(|r| r.1)
            .map(|r| UserId::from_uuid(r.0))
            .collect(),
        read_by: rows
            .iter()
            .filter(|r| r.2)
            .map(|r| UserId::from_uuid(r.0))
            .collect(),
    }))
}
