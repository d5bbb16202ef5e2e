//! `ApiError`: every way a query can fail, and its single mapping to RFC 9457 problem+json.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use parley_platform::Problem;
use parley_schemas::ChatId;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// An unknown chat and a chat the caller is not a member of look exactly alike, so a
    /// probe learns nothing about chats it is not in.
    #[error("no such chat")]
    ChatNotFound,
    /// A message the chat does not hold (or not of the kind the route needs).
    #[error("no such message")]
    MessageNotFound,
    /// No such user, or one that shares no chat with the caller: alike, so nothing leaks.
    #[error("no such user")]
    UserNotVisible,
    /// A member asking for what only the chat's admins may see.
    #[error("only the chat's admins may do this")]
    NotAdmin,
    /// No such attachment, or not the caller's to see: alike, so nothing leaks.
    #[error("no such attachment")]
    AttachmentNotFound,
    /// The attachments object store cannot be read: worth a retry.
    #[error("attachments unavailable")]
    AttachmentsUnavailable(#[source] parley_nats::AttachmentError),
    /// The caller's user is not projected yet (a token can exist before its read model row).
    #[error("the caller's user is not in the read model yet")]
    UserNotFound,
    /// Well-formed parameters that cannot be combined or parsed (400).
    #[error("{0}")]
    Malformed(String),
    /// Parameters that parse but are out of range (422).
    #[error("{0}")]
    Invalid(String),
    /// `min_sequence` was not reached within the configured wait.
    #[error("read model of chat {chat_id} is at {have:?}, {want} was asked for")]
    Behind {
        chat_id: ChatId,
        have: Option<u64>,
        want: u64,
    },
    /// PostgreSQL cannot be reached or has no free connection: worth a retry.
    #[error("read model unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The presence buckets cannot be read: worth a retry.
    #[error("presence unavailable")]
    PresenceUnavailable(#[source] parley_nats::presence::PresenceError),
    /// Anything else the database says: our fault.
    #[error("read model query failed")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => ApiError::Unavailable(e),
            _ => ApiError::Database(e),
        }
    }
}

impl From<ApiError> for Problem {
    fn from(e: ApiError) -> Problem {
        match e {
            ApiError::ChatNotFound => Problem::not_found("no such chat"),
            ApiError::MessageNotFound => Problem::not_found("no such message in this chat"),
            ApiError::UserNotVisible => Problem::not_found("no such user"),
            ApiError::NotAdmin => Problem::forbidden("only the chat's admins may see this"),
            ApiError::AttachmentNotFound => Problem::not_found("no such attachment"),
            ApiError::AttachmentsUnavailable(cause) => {
                tracing::warn!(error = %cause, "attachments unavailable");
                Problem::unavailable("attachments are unavailable", 1)
            }
            ApiError::UserNotFound => {
                Problem::not_found("your user is not available yet; retry shortly")
            }
            ApiError::Malformed(detail) => Problem::bad_request(detail),
            ApiError::Invalid(detail) => Problem::invalid(detail),
            ApiError::Behind {
                chat_id,
                have,
                want,
            } => {
                tracing::info!(%chat_id, ?have, want, "min_sequence not reached in time");
                Problem::unavailable(
                    format!("the read model has not reached sequence {want} of this chat yet"),
                    1,
                )
            }
            ApiError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "read model unavailable");
                Problem::unavailable("the read model is unavailable", 1)
            }
            ApiError::PresenceUnavailable(cause) => {
                tracing::warn!(error = %cause, "presence unavailable");
                Problem::unavailable("presence is unavailable", 1)
            }
            ApiError::Database(cause) => {
                tracing::error!(error = %cause, debug = ?cause, "read model query failed");
                Problem::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}

/// A known route asked with a method it does not serve.
pub(crate) async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this route does not serve that method",
    )
}
