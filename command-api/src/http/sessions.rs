//! `POST /v1/sessions`: log in on a device. A device is an event on the user (at most five
//! active); its token is random, and only its sha256 is stored, in the `sessions` bucket.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use base64::Engine;
use parley_nats::AppendContext;
use parley_platform::{ApiJson, ClientIp, SessionRecord, token_key};
use parley_schemas::{DeviceId, DeviceName, Platform, UserId};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{answer, respond};
use crate::domain::user::{self, UserCommand};
use crate::error::ApiError;
use crate::idempotency::{self, IdempotencyKey};
use crate::state::CommandState;

pub fn router() -> Router<CommandState> {
    Router::new().route("/v1/sessions", post(login))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    handle: String,
    password: String,
    /// 1..64 characters.
    device_name: String,
    /// 1..32 characters, e.g. `ios`, `web`.
    platform: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    /// Bearer token of this device.
    token: String,
    #[schema(value_type = String, format = Uuid)]
    user_id: UserId,
    #[schema(value_type = String, format = Uuid)]
    device_id: DeviceId,
}

#[derive(Clone, Serialize, Deserialize)]
struct Ids {
    device_id: DeviceId,
    token: String,
}

/// The key under which a device's token key is kept, so removing the device can revoke it.
pub(crate) fn device_key(device_id: DeviceId) -> String {
    format!("device.{device_id}")
}

#[utoipa::path(post, path = "/v1/sessions", request_body = LoginRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "1..64 printable ASCII")),
    responses(
        (status = 201, body = LoginResponse),
        (status = 400, body = parley_platform::Problem),
        (status = 401, body = parley_platform::Problem, description = "bad credentials"),
        (status = 409, body = parley_platform::Problem, description = "already 5 active devices"),
        (status = 422, body = parley_platform::Problem),
        (status = 429, body = parley_platform::Problem, description = "too many log-ins for this handle or address (see Retry-After)"),
        (status = 503, body = parley_platform::Problem, description = "every core is busy hashing passwords, for longer than 10 s (see Retry-After)"),
    ))]
pub async fn login(
    State(state): State<CommandState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    state.limits.login(ip, &req.handle)?;
    let key = IdempotencyKey::from_headers(&headers)?;
    let state = &state;
    let device_name = DeviceName::parse(req.device_name.clone())?;
    let platform = req.platform.clone().map(Platform::parse).transpose()?;
    let user_id = verify(state, &req.handle, &req.password).await?;
    let ids = || Ids {
        device_id: DeviceId::new(),
        token: new_token(),
    };
    let scope = format!("sessions:{user_id}");
    let res = idempotency::once(state, &scope, key, &req, ids, |ids, msg_id| async move {
        let cmd = UserCommand::AddDevice {
            device_id: ids.device_id,
            device_name,
            platform,
            max_devices: state.config.max_devices,
        };
        let ctx = AppendContext::idempotent(user_id, msg_id);
        state
            .users
            .execute(*user_id.as_uuid(), &ctx, |s| user::decide(s, &cmd))
            .await?;
        open_session(state, user_id, ids.device_id, &ids.token).await?;
        Ok(answer(
            StatusCode::CREATED,
            &LoginResponse {
                token: ids.token,
                user_id,
                device_id: ids.device_id,
            },
        ))
    })
    .await?;
    Ok(respond(res))
}

/// Checks handle and password; both failures look the same to the caller.
async fn verify(state: &CommandState, handle: &str, password: &str) -> Result<UserId, ApiError> {
    let kv_err = |e: async_nats::jetstream::kv::EntryError| ApiError::Unavailable(e.to_string());
    // Keys are validated by the KV client; a handle outside the alphabet simply matches nothing.
    let valid_handle = parley_schemas::Handle::parse(handle).is_ok();
    let user = if valid_handle {
        state.buckets.handles.get(handle).await.map_err(kv_err)?
    } else {
        None
    };
    let user_id = user
        .and_then(|b| {
            std::str::from_utf8(&b)
                .ok()
                .and_then(|s| UserId::parse(s).ok())
        })
        .ok_or(ApiError::BadCredentials)?;
    let hash = state
        .buckets
        .credentials
        .get(user_id.to_string())
        .await
        .map_err(kv_err)?
        .ok_or(ApiError::BadCredentials)?;
    let phc = String::from_utf8_lossy(&hash).into_owned();
    let ok = state.passwords.verify(password.to_owned(), phc).await?;
    if ok {
        Ok(user_id)
    } else {
        Err(ApiError::BadCredentials)
    }
}

async fn open_session(
    state: &CommandState,
    user_id: UserId,
    device_id: DeviceId,
    token: &str,
) -> Result<(), ApiError> {
    let key = token_key(token);
    let record = serde_json::to_vec(&SessionRecord { user_id, device_id })
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let kv = &state.buckets.sessions;
    let unavailable = |e: async_nats::jetstream::kv::PutError| ApiError::Unavailable(e.to_string());
    kv.put(device_key(device_id), key.clone().into_bytes().into())
        .await
        .map_err(unavailable)?;
    kv.put(key, record.into()).await.map_err(unavailable)?;
    Ok(())
}

/// 256 random bits, URL-safe base64.
fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
