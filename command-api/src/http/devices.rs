//! `DELETE /v1/devices/{device_id}`: log a device out. Its token stops working at once: the
//! session key is deleted (every service's token cache watches the bucket) and gateways are told
//! to close its sockets.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::delete;
use parley_nats::{AppendContext, subjects};
use parley_platform::{PathIds, Principal};
use parley_schemas::DeviceId;

use super::sessions::device_key;
use crate::domain::user::{self, UserCommand};
use crate::error::ApiError;
use crate::state::CommandState;

pub fn router() -> Router<CommandState> {
    Router::new().route("/v1/devices/{device_id}", delete(remove))
}

#[utoipa::path(delete, path = "/v1/devices/{device_id}",
    params(("device_id" = String, Path, format = Uuid)),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "removed; its token no longer works"),
        (status = 401, body = parley_platform::Problem),
        (status = 404, body = parley_platform::Problem, description = "not one of the caller's devices"),
    ))]
pub async fn remove(
    State(state): State<CommandState>,
    me: Principal,
    PathIds(device_id): PathIds<DeviceId>,
) -> Result<StatusCode, ApiError> {
    let cmd = UserCommand::RemoveDevice { device_id };
    state
        .users
        .execute(
            *me.user_id.as_uuid(),
            &AppendContext::new(me.user_id),
            |s| user::decide(s, &cmd),
        )
        .await?;
    // Revocation runs on every call, not only the first: a crash after the event but before
    // this point is repaired by the client's retry.
    revoke(&state, device_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn revoke(state: &CommandState, device_id: DeviceId) -> Result<(), ApiError> {
    let kv = &state.buckets.sessions;
    let unavailable = |e: String| ApiError::Unavailable(e);
    if let Some(token_key) = kv
        .get(device_key(device_id))
        .await
        .map_err(|e| unavailable(e.to_string()))?
    {
        let token_key = String::from_utf8_lossy(&token_key).into_owned();
        kv.delete(&token_key)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        state.auth.forget(&token_key).await;
    }
    let notice = serde_json::json!({ "device_id": device_id }).to_string();
    // Best effort: a gateway that misses this still re-checks tokens within its cache TTL.
    if let Err(e) = state
        .nats
        .publish(subjects::DEVICE_REVOKED, notice.into())
        .await
    {
        tracing::warn!(error = %e, "device revocation notice not sent");
    }
    Ok(())
}
