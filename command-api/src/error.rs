//! The one error type of command-api, and its one mapping to problem+json.

use axum::response::{IntoResponse, Response};
use parley_nats::{ExecuteError, StoreError};
use parley_platform::Problem;
use parley_schemas::ValueError;

use crate::domain::Rejection;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Already a problem (extractor rejections, auth).
    #[error("{}", .0.detail)]
    Problem(Problem),
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("{0}")]
    Invalid(String),
    /// Larger than the limit for its kind (413).
    #[error("{0}")]
    TooLarge(String),
    /// A media type that may not be uploaded (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("handle is taken")]
    HandleTaken,
    #[error("bad credentials")]
    BadCredentials,
    #[error("Idempotency-Key reused with a different request")]
    IdempotencyMismatch,
    #[error("too many concurrent writers; retry")]
    Contended,
    #[error("dependency unavailable: {0}")]
    Unavailable(String),
    /// This process is at capacity for the work (password hashing); retry shortly.
    #[error("busy: {0}")]
    Busy(&'static str),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<Problem> for ApiError {
    fn from(p: Problem) -> Self {
        ApiError::Problem(p)
    }
}

/// A value that fails its own rules (handle, body, title, …) is semantically invalid: 422.
impl From<ValueError> for ApiError {
    fn from(e: ValueError) -> Self {
        ApiError::Invalid(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Nats(cause) => ApiError::Unavailable(cause),
            StoreError::Corrupt { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<ExecuteError<Rejection>> for ApiError {
    fn from(e: ExecuteError<Rejection>) -> Self {
        match e {
            ExecuteError::Rejected(r) => ApiError::Rejected(r),
            ExecuteError::Conflict | ExecuteError::Stale { .. } => ApiError::Contended,
            ExecuteError::Store(s) => s.into(),
        }
    }
}

impl From<parley_nats::KeyError> for ApiError {
    fn from(e: parley_nats::KeyError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<parley_nats::AttachmentError> for ApiError {
    fn from(e: parley_nats::AttachmentError) -> Self {
        use parley_nats::AttachmentError as E;
        match e {
            E::TooLarge { limit } => {
                ApiError::TooLarge(format!("at most {limit} bytes for this kind of attachment"))
            }
            // The client broke its own upload (disconnect, bad chunking): its fault, not ours.
            E::Body(why) => ApiError::Problem(Problem::bad_request(format!(
                "the upload could not be read: {why}"
            ))),
            E::NotFound => ApiError::Invalid("unknown attachment".into()),
            E::Nats(cause) => ApiError::Unavailable(cause),
            E::Corrupt(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl ApiError {
    pub fn problem(&self) -> Problem {
        match self {
            ApiError::Problem(p) => p.clone(),
            ApiError::Rejected(Rejection::NotFound) => Problem::not_found("no such resource"),
            ApiError::Rejected(Rejection::Forbidden(why)) => Problem::forbidden(*why),
            ApiError::Rejected(Rejection::Conflict(why)) => Problem::conflict(*why),
            ApiError::Rejected(Rejection::Invalid(why)) => Problem::invalid(why.clone()),
            ApiError::Invalid(why) => Problem::invalid(why.clone()),
            ApiError::TooLarge(why) => Problem::too_large(why.clone()),
            ApiError::UnsupportedMediaType(why) => Problem::new(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                why.clone(),
            ),
            ApiError::HandleTaken => Problem::conflict("that handle is taken"),
            ApiError::BadCredentials => Problem::unauthorized("unknown handle or wrong password"),
            ApiError::IdempotencyMismatch => {
                Problem::invalid("this Idempotency-Key was used with a different request")
            }
            ApiError::Contended => Problem::conflict("too many concurrent changes; retry"),
            ApiError::Unavailable(cause) => {
                tracing::warn!(%cause, "dependency unavailable");
                Problem::unavailable("a dependency is unavailable; retry", 1)
            }
            ApiError::Busy(what) => Problem::unavailable(*what, 1),
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                Problem::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.problem().into_response()
    }
}
