//! `POST /v1/users/{user_id}/block` and `DELETE` the same: the caller blocks or unblocks a
//! user. Blocks are events of the blocker's user aggregate; the chat commands read them to
//! refuse a blocked user opening a dm with, or adding, the blocker.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use parley_nats::AppendContext;
use parley_platform::{PathIds, Principal};
use parley_schemas::UserId;

use crate::domain::user::{self, UserCommand};
use crate::error::ApiError;
use crate::state::CommandState;

pub fn router() -> Router<CommandState> {
    Router::new().route("/v1/users/{user_id}/block", post(block).delete(unblock))
}

#[utoipa::path(post, path = "/v1/users/{user_id}/block",
    params(("user_id" = String, Path, format = Uuid)),
    security(("bearer" = [])),
    description = "Blocks the user: they can no longer open a dm with the caller nor add the caller to a chat (they get 404, as for someone they cannot see). Idempotent.",
    responses(
        (status = 204, description = "blocked (or already blocked)"),
        (status = 404, body = parley_platform::Problem, description = "unknown user"),
        (status = 422, body = parley_platform::Problem, description = "blocking yourself"),
    ))]
pub async fn block(
    State(state): State<CommandState>,
    me: Principal,
    PathIds(user_id): PathIds<UserId>,
) -> Result<StatusCode, ApiError> {
    change(&state, me, user_id, true).await
}

#[utoipa::path(delete, path = "/v1/users/{user_id}/block",
    params(("user_id" = String, Path, format = Uuid)),
    security(("bearer" = [])),
    description = "Lifts a block. Idempotent.",
    responses(
        (status = 204, description = "not blocked (any more)"),
        (status = 404, body = parley_platform::Problem, description = "unknown user"),
        (status = 422, body = parley_platform::Problem, description = "unblocking yourself"),
    ))]
pub async fn unblock(
    State(state): State<CommandState>,
    me: Principal,
    PathIds(user_id): PathIds<UserId>,
) -> Result<StatusCode, ApiError> {
    change(&state, me, user_id, false).await
}

async fn change(
    state: &CommandState,
    me: Principal,
    user: UserId,
    block: bool,
) -> Result<StatusCode, ApiError> {
    let user_exists = state.users.read(*user.as_uuid(), |_, v| v > 0).await?;
    let actor = me.user_id;
    let cmd = if block {
        UserCommand::Block {
            actor,
            user,
            user_exists,
        }
    } else {
        UserCommand::Unblock {
            actor,
            user,
            user_exists,
        }
    };
    state
        .users
        .execute(*actor.as_uuid(), &AppendContext::new(actor), |s| {
            user::decide(s, &cmd)
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
