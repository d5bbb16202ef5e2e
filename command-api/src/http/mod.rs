//! The command routes and their OpenAPI description.

pub(crate) mod attachments;
mod blocks;
mod chat_admin;
mod chat_settings;
mod chats;
mod devices;
mod message_changes;
mod messages;
mod receipts;
mod sessions;
mod users;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

use crate::idempotency::Answer;
use crate::state::CommandState;

pub fn router(state: CommandState) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .merge(users::router())
        .merge(sessions::router())
        .merge(devices::router())
        .merge(chats::router())
        .merge(messages::router())
        .merge(message_changes::router())
        .merge(receipts::router())
        .merge(chat_admin::router())
        .merge(chat_settings::router())
        .merge(blocks::router())
        .layer(DefaultBodyLimit::max(limit))
        // After the JSON limit, so the upload route's own (disabled) limit is the inner one.
        .merge(attachments::router())
        .with_state(state)
}

/// Writes an answer (fresh or replayed from an idempotency record); error answers are
/// problem+json.
pub(crate) fn respond((status, body): Answer) -> Response {
    let mut res = (status, axum::Json(body)).into_response();
    if status.as_u16() >= 400 {
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
    }
    res
}

pub(crate) fn answer<T: serde::Serialize>(status: StatusCode, body: &T) -> Answer {
    (status, serde_json::to_value(body).unwrap_or_default())
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Parley command API", version = "1"),
    paths(
        users::register,
        sessions::login,
        devices::remove,
        chats::create,
        chats::participants,
        messages::send,
        message_changes::edit,
        message_changes::delete,
        message_changes::react,
        message_changes::unreact,
        receipts::read,
        chat_admin::change_title,
        chat_admin::change_role,
        chat_settings::change,
        blocks::block,
        blocks::unblock,
        attachments::upload,
    ),
    components(schemas(parley_platform::problem::Problem))
)]
struct CommandDoc;

/// OpenAPI for the command routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    CommandDoc::openapi()
}
