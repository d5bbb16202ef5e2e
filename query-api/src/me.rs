//! `GET /v1/me`: the caller's user and active devices.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use parley_platform::Principal;
use parley_schemas::{DeviceId, UserId};
use serde::Serialize;
use utoipa::ToSchema;

use crate::db;
use crate::error::ApiError;
use crate::openapi::ProblemDoc;
use crate::state::QueryState;

pub(crate) fn router() -> Router<QueryState> {
    Router::new().route("/v1/me", get(me))
}

/// The caller's user.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Me)]
pub(crate) struct MeView {
    #[schema(value_type = uuid::Uuid)]
    pub user_id: UserId,
    pub handle: String,
    pub display_name: String,
    /// Active devices (not removed), oldest first.
    pub devices: Vec<DeviceView>,
}

/// One logged-in device.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Device)]
pub(crate) struct DeviceView {
    #[schema(value_type = uuid::Uuid)]
    pub device_id: DeviceId,
    pub device_name: String,
    pub platform: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// The caller's user and active devices.
#[utoipa::path(
    get,
    path = "/v1/me",
    operation_id = "getMe",
    tag = "me",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller", body = MeView),
        (status = 401, description = "No or bad token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "The caller's user is not in the read model yet", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Read model unavailable; see Retry-After", body = ProblemDoc, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn me(
    principal: Principal,
    State(state): State<QueryState>,
) -> Result<Json<MeView>, ApiError> {
    db::users::me(&state.pg, principal.user_id)
        .await?
        .map(Json)
        .ok_or(ApiError::UserNotFound)
}
