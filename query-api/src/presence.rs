//! `GET /v1/users/{user_id}/presence`: whether a user is online and when it was last seen, to
//! the user itself and to users who share a chat with it; 404 to anyone else, exactly like an
//! unknown user, so existence is not leaked.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use parley_platform::Principal;
use parley_platform::extract::PathIds;
use parley_schemas::UserId;
use serde::Serialize;
use utoipa::ToSchema;

use crate::db;
use crate::error::ApiError;
use crate::openapi::ProblemDoc;
use crate::state::QueryState;

pub(crate) fn router() -> Router<QueryState> {
    Router::new().route("/v1/users/{user_id}/presence", get(presence))
}

/// A user's presence.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Presence)]
pub(crate) struct PresenceView {
    /// A gateway heartbeat for the user is younger than the presence TTL (60 s by default).
    pub online: bool,
    /// The user's latest heartbeat, or when its last connection closed; null if never seen.
    pub last_seen_at: Option<DateTime<Utc>>,
}

#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/presence",
    operation_id = "getPresence",
    tag = "users",
    security(("bearer" = [])),
    params(("user_id" = uuid::Uuid, Path, description = "The user")),
    responses(
        (status = 200, description = "The user's presence", body = PresenceView),
        (status = 401, description = "No or bad token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such user, or it shares no chat with the caller", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Presence store or read model unavailable; see Retry-After", body = ProblemDoc, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn presence(
    principal: Principal,
    State(state): State<QueryState>,
    PathIds(user_id): PathIds<UserId>,
) -> Result<Json<PresenceView>, ApiError> {
    if user_id != principal.user_id
        && !db::users::share_a_chat(&state.pg, principal.user_id, user_id).await?
    {
        return Err(ApiError::UserNotVisible);
    }
    let seen = parley_nats::presence::read(&state.buckets, user_id, Utc::now())
        .await
        .map_err(ApiError::PresenceUnavailable)?;
    Ok(Json(PresenceView {
        online: seen.online,
        last_seen_at: seen.last_seen_at,
    }))
}
