//! `POST /v1/users`: sign-up. The handle is reserved create-only in KV before the registration
//! is appended, so two sign-ups can never both get it.

use async_nats::jetstream::kv::CreateErrorKind;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use parley_nats::AppendContext;
use parley_platform::{ApiJson, ClientIp};
use parley_schemas::{DisplayName, Handle, Password, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{answer, respond};
use crate::domain::user::{self, UserCommand};
use crate::error::ApiError;
use crate::idempotency::{self, IdempotencyKey};
use crate::state::CommandState;

pub fn router() -> Router<CommandState> {
    Router::new().route("/v1/users", post(register))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// `^[a-z0-9_]{3,32}$`
    handle: String,
    /// 1..64 characters.
    display_name: String,
    /// 8..256 characters.
    password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegisterResponse {
    #[schema(value_type = String, format = Uuid)]
    user_id: UserId,
    handle: String,
    display_name: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct Ids {
    user_id: UserId,
}

#[utoipa::path(post, path = "/v1/users", request_body = RegisterRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "1..64 printable ASCII")),
    responses(
        (status = 201, body = RegisterResponse),
        (status = 400, body = parley_platform::Problem, description = "malformed"),
        (status = 409, body = parley_platform::Problem, description = "handle taken"),
        (status = 422, body = parley_platform::Problem, description = "invalid handle, name or password"),
        (status = 429, body = parley_platform::Problem, description = "too many sign-ups from this address (see Retry-After)"),
        (status = 503, body = parley_platform::Problem, description = "every core is busy hashing passwords, for longer than 10 s (see Retry-After)"),
    ))]
pub async fn register(
    State(state): State<CommandState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<Response, ApiError> {
    state.limits.signup(ip)?;
    let key = IdempotencyKey::from_headers(&headers)?;
    let state = &state;
    let handle = Handle::parse(req.handle.clone())?;
    let display_name = DisplayName::parse(req.display_name.clone())?;
    let password = Password::parse(req.password.clone())?;
    let ids = || Ids {
        user_id: UserId::new(),
    };
    let res = idempotency::once(state, "users", key, &req, ids, |ids, msg_id| async move {
        register_user(state, ids.user_id, handle, display_name, password, msg_id).await
    })
    .await?;
    Ok(respond(res))
}

async fn register_user(
    state: &CommandState,
    user_id: UserId,
    handle: Handle,
    display_name: DisplayName,
    password: Password,
    msg_id: Option<String>,
) -> Result<idempotency::Answer, ApiError> {
    reserve_handle(state, &handle, user_id).await?;
    let hash = state.passwords.hash(password).await?;
    state
        .buckets
        .credentials
        .put(user_id.to_string(), hash.into_bytes().into())
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let cmd = UserCommand::Register {
        user_id,
        handle: handle.clone(),
        display_name: display_name.clone(),
    };
    let ctx = AppendContext::idempotent(user_id, msg_id);
    state
        .users
        .execute(*user_id.as_uuid(), &ctx, |s| user::decide(s, &cmd))
        .await?;
    Ok(answer(
        StatusCode::CREATED,
        &RegisterResponse {
            user_id,
            handle: handle.to_string(),
            display_name: display_name.to_string(),
        },
    ))
}

async fn reserve_handle(
    state: &CommandState,
    handle: &Handle,
    user_id: UserId,
) -> Result<(), ApiError> {
    let kv = &state.buckets.handles;
    match kv.create(handle.as_str(), user_id.to_string().into()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
            let owner = kv
                .get(handle.as_str())
                .await
                .map_err(|e| ApiError::Unavailable(e.to_string()))?;
            // Ours already: a retry of this very registration.
            if owner.as_deref() == Some(user_id.to_string().as_bytes()) {
                Ok(())
            } else {
                Err(ApiError::HandleTaken)
            }
        }
        Err(e) => Err(ApiError::Unavailable(e.to_string())),
    }
}
