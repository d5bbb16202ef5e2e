//! The HTTP inbox, for clients that cannot hold a socket: `GET /v1/inbox` pages through what the
//! calling device has not acked (the frames a socket would replay), `POST /v1/inbox/ack` moves
//! its cursor like an `ack` frame, durably, on `RECEIPTS`.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parley_platform::auth::AuthError;
use parley_platform::extract::ApiQuery;
use parley_platform::{ApiJson, Principal, Problem};
use parley_schemas::events::Delivered;
use parley_schemas::{ChatId, ReceiptEvent};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::time::Instant;
use utoipa::{IntoParams, ToSchema};

use crate::gateway::AppState;
use crate::inbox::{self, BATCH, Position};

/// Events per page when `limit` is absent.
const DEFAULT_LIMIT: usize = 100;
/// How long an ack waits for the read model to show it, so the next `GET` does not return
/// what was just acked. The ack is durable before; past this it is answered anyway.
const ACK_VISIBLE_WAIT: Duration = Duration::from_secs(2);
const ACK_POLL: Duration = Duration::from_millis(15);

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/inbox", get(read))
        .route("/v1/inbox/ack", post(ack))
}

/// Every way an inbox call fails, mapped once to problem+json.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InboxError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Not a chat of the caller's (or no such chat): the same answer, so nothing leaks.
    #[error("no such chat")]
    ChatNotFound,
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<sqlx::Error> for InboxError {
    fn from(e: sqlx::Error) -> Self {
        InboxError::Unavailable(format!("read model: {e}"))
    }
}

impl IntoResponse for InboxError {
    fn into_response(self) -> Response {
        let problem = match self {
            InboxError::Auth(e) => Problem::from(e),
            InboxError::ChatNotFound => Problem::not_found("no such chat"),
            InboxError::Malformed(detail) => Problem::bad_request(detail),
            InboxError::Invalid(detail) => Problem::invalid(detail),
            InboxError::Unavailable(cause) => {
                tracing::warn!(%cause, "inbox dependency unavailable");
                Problem::unavailable("the inbox is unavailable; retry", 1)
            }
        };
        problem.into_response()
    }
}

/// `GET /v1/inbox` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct InboxParams {
    /// Events per page, 1..=500 (default 100).
    limit: Option<usize>,
    /// The `next` of the previous page: `<chat_id>:<sequence>`.
    after: Option<String>,
}

/// A page of the calling device's inbox.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = InboxPage)]
pub(crate) struct InboxPage {
    /// `newMessage` and `chatUpdate` frames exactly as the socket sends them, chat by chat,
    /// each chat in sequence order from the device's cursor.
    #[schema(value_type = Vec<Object>)]
    events: Vec<Box<RawValue>>,
    /// More events wait after this page: ask again with `after=<next>`.
    has_more: bool,
    /// Where the next page starts (`<chat_id>:<sequence>`); null on the last page.
    next: Option<String>,
}

/// `POST /v1/inbox/ack` body: the device holds every event of the chat up to `sequence`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AckRequest {
    #[schema(value_type = uuid::Uuid)]
    chat_id: ChatId,
    /// 1..=the chat's last sequence (or the user's removal, for a chat it left).
    sequence: u64,
}

#[utoipa::path(
    get,
    path = "/v1/inbox",
    operation_id = "readInbox",
    tag = "inbox",
    security(("bearer" = [])),
    params(InboxParams),
    description = "What the calling device has not acked: the frames a WebSocket would replay on connect. Reading does not ack; page with `after`, ack with `POST /v1/inbox/ack`.",
    responses(
        (status = 200, body = InboxPage),
        (status = 400, description = "Malformed `limit` or `after`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`limit` out of range", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model unavailable; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn read(
    State(gw): State<AppState>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<InboxParams>,
) -> Result<Json<InboxPage>, InboxError> {
    let me = gw.infra.auth.from_headers(&headers).await?;
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=BATCH).contains(&limit) {
        return Err(InboxError::Invalid(format!("limit must be 1..={BATCH}")));
    }
    let after = params.after.as_deref().map(parse_position).transpose()?;
    let page = inbox::page(&gw.infra.pg, me.user_id, me.device_id, after, limit).await?;
    Ok(Json(render(page)))
}

#[utoipa::path(
    post,
    path = "/v1/inbox/ack",
    operation_id = "ackInbox",
    tag = "inbox",
    security(("bearer" = [])),
    request_body = AckRequest,
    description = "Cumulative, like the `ack` frame: the calling device holds every event of the chat up to `sequence`. Durable on RECEIPTS when answered; acks only move the cursor up.",
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such chat, or never the caller's", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`sequence` is 0 or beyond the chat's last sequence (or the caller's removal)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "NATS or the read model unavailable; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn ack(
    State(gw): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<AckRequest>,
) -> Result<StatusCode, InboxError> {
    let me = gw.infra.auth.from_headers(&headers).await?;
    let last = ackable_up_to(&gw, me, req.chat_id).await?;
    if req.sequence == 0 || req.sequence > last {
        return Err(InboxError::Invalid(format!(
            "sequence must be between 1 and {last} in this chat"
        )));
    }
    let event = ReceiptEvent::Delivered(Delivered {
        user_id: me.user_id,
        device_id: me.device_id,
        up_to: req.sequence,
    });
    parley_nats::receipts::publish_acked(&gw.infra.js, req.chat_id, &event)
        .await
        .map_err(|e| InboxError::Unavailable(format!("RECEIPTS: {e}")))?;
    wait_until_visible(&gw, me, req.chat_id, req.sequence).await;
    Ok(StatusCode::NO_CONTENT)
}

/// The highest sequence the caller's device may ack in `chat`: the chat's last stored event
/// while a member, the removal once removed. 404 for a chat that was never the user's.
async fn ackable_up_to(gw: &AppState, me: Principal, chat: ChatId) -> Result<u64, InboxError> {
    let (_, left) = inbox::membership(&gw.infra.pg, me.user_id, chat)
        .await?
        .ok_or(InboxError::ChatNotFound)?;
    if let Some(left) = left {
        return Ok(left);
    }
    // The stream, not the read model: a frame delivered live may be ahead of the projector.
    let bg = gw
        .background()
        .await
        .map_err(|e| InboxError::Unavailable(e.to_string()))?;
    inbox::stream_head(&bg.chats, chat)
        .await
        .map_err(|e| InboxError::Unavailable(format!("CHATS: {e}")))
}

async fn wait_until_visible(gw: &AppState, me: Principal, chat: ChatId, sequence: u64) {
    let deadline = Instant::now() + ACK_VISIBLE_WAIT;
    while Instant::now() < deadline {
        match inbox::acked_up_to(&gw.infra.pg, me.device_id, chat).await {
            Ok(acked) if acked >= sequence => return,
            Ok(_) => tokio::time::sleep(ACK_POLL).await,
            Err(error) => {
                tracing::debug!(%error, "cannot check the ack's projection");
                return;
            }
        }
    }
}

fn parse_position(s: &str) -> Result<Position, InboxError> {
    let malformed = || InboxError::Malformed("after must be <chat_id>:<sequence>".into());
    let (chat, seq) = s.split_once(':').ok_or_else(malformed)?;
    Ok(Position {
        chat: ChatId::parse(chat).map_err(|_| malformed())?,
        sequence: seq.parse().map_err(|_| malformed())?,
    })
}

fn render(page: inbox::Page) -> InboxPage {
    let events = page
        .events
        .into_iter()
        .filter_map(|e| RawValue::from_string(e.frame.to_string()).ok())
        .collect();
    InboxPage {
        events,
        has_more: page.next.is_some(),
        next: page.next.map(|p| format!("{}:{}", p.chat, p.sequence)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_what_a_page_writes() {
        let chat = ChatId::new();
        let p = parse_position(&format!("{chat}:42")).unwrap();
        assert_eq!(p, Position { chat, sequence: 42 });
        assert!(parse_position("nope").is_err());
        assert!(parse_position(&format!("{chat}:x")).is_err());
    }
}
