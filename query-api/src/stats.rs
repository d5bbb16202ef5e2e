//! `GET /v1/chats/{chat_id}/stats`: a chat's activity per hour (messages, distinct senders,
//! median send→deliver latency) from the activity projection, for the chat's admins; and
//! `hourly`, the one query behind it, which `parley stats` exports as CSV.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Duration, Utc};
use parley_platform::Principal;
use parley_platform::extract::{ApiQuery, PathIds};
use parley_schemas::ChatId;
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgPool};
use tokio::time::Instant;
use utoipa::{IntoParams, ToSchema};

use crate::access;
use crate::error::ApiError;
use crate::openapi::ProblemDoc;
use crate::state::QueryState;

/// The window when `since` is absent: the 7 days before `until`.
const DEFAULT_WINDOW_DAYS: i64 = 7;
/// The widest window one request may ask for.
const MAX_WINDOW_DAYS: i64 = 366;

pub(crate) fn router() -> Router<QueryState> {
    Router::new().route("/v1/chats/{chat_id}/stats", get(stats))
}

/// One hour of a chat's activity. Hours without messages are absent.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema, FromRow)]
pub struct HourStats {
    /// The start of the hour (UTC) in which the messages were sent.
    pub hour: DateTime<Utc>,
    /// Messages sent in the hour (deleted ones included: they were sent).
    pub messages: i64,
    /// Distinct senders of those messages.
    pub senders: i64,
    /// Those messages that have reached a user other than their sender.
    pub delivered: i64,
    /// Median, over the delivered ones, of the time from a message's `time` to the `time` of the
    /// first delivered receipt covering it from a user other than the sender; null when none
    /// is delivered yet.
    pub median_delivery_ms: Option<f64>,
}

/// A chat's activity per hour, oldest first, for messages sent in `[since, until)` (either
/// bound may be open).
pub async fn hourly(
    pg: &PgPool,
    chat: uuid::Uuid,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Result<Vec<HourStats>, sqlx::Error> {
    // date_trunc in UTC explicitly: the session time zone must not move hour boundaries.
    sqlx::query_as(
        "SELECT date_trunc('hour', sent_at, 'UTC') AS hour, \
                count(*) AS messages, \
                count(DISTINCT sender_id) AS senders, \
                count(delivered_at) AS delivered, \
                percentile_cont(0.5) WITHIN GROUP \
                    (ORDER BY extract(epoch FROM delivered_at - sent_at) * 1000) AS median_delivery_ms \
         FROM activity_messages \
         WHERE chat_id = $1 AND ($2::timestamptz IS NULL OR sent_at >= $2) \
           AND ($3::timestamptz IS NULL OR sent_at < $3) \
         GROUP BY 1 ORDER BY 1",
    )
    .bind(chat)
    .bind(since)
    .bind(until)
    .fetch_all(pg)
    .await
}

/// A chat's hourly activity over a window.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ChatStats)]
pub(crate) struct ChatStatsView {
    #[schema(value_type = uuid::Uuid)]
    pub chat_id: ChatId,
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub hours: Vec<HourStats>,
}

/// Query parameters of the stats.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct StatsParams {
    /// Messages sent at or after this time (RFC 3339); default: 7 days before `until`.
    since: Option<DateTime<Utc>>,
    /// Messages sent before this time (RFC 3339); default: now. At most 366 days after `since`.
    until: Option<DateTime<Utc>>,
    /// Read your writes: wait (up to 2 s, else 503) until the chat's read model and its
    /// activity rollup hold the chat at this sequence or later.
    min_sequence: Option<u64>,
}

impl StatsParams {
    /// The window asked for: 422 when reversed or too wide.
    fn window(&self) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
        let until = self.until.unwrap_or_else(Utc::now);
        let since = self
            .since
            .unwrap_or(until - Duration::days(DEFAULT_WINDOW_DAYS));
        if since > until {
            return Err(ApiError::Invalid(format!(
                "since ({}) is after until ({})",
                since.to_rfc3339(),
                until.to_rfc3339()
            )));
        }
        if until - since > Duration::days(MAX_WINDOW_DAYS) {
            return Err(ApiError::Invalid(format!(
                "the window is at most {MAX_WINDOW_DAYS} days"
            )));
        }
        Ok((since, until))
    }
}

/// The chat's activity per hour; admins only (403 for other members, 404 for non-members).
#[utoipa::path(
    get,
    path = "/v1/chats/{chat_id}/stats",
    operation_id = "chatStats",
    tag = "chats",
    security(("bearer" = [])),
    params(("chat_id" = uuid::Uuid, Path, description = "The chat"), StatsParams),
    responses(
        (status = 200, description = "Hourly activity, oldest hour first; hours without messages are absent", body = ChatStatsView),
        (status = 400, description = "Malformed query parameter", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "The caller is a member but not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such chat, or the caller is not a member", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "`since` after `until`, or a window over 366 days", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "`min_sequence` not reached in time, or read model unavailable; see Retry-After", body = ProblemDoc, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn stats(
    principal: Principal,
    State(state): State<QueryState>,
    PathIds(chat_id): PathIds<ChatId>,
    ApiQuery(params): ApiQuery<StatsParams>,
) -> Result<Json<ChatStatsView>, ApiError> {
    let (since, until) = params.window()?;
    access::require_admin(&state, principal.user_id, chat_id, params.min_sequence).await?;
    if let Some(want) = params.min_sequence {
        rollup_reaches(&state, chat_id, want).await?;
    }
    let hours = hourly(&state.pg, *chat_id.as_uuid(), Some(since), Some(until)).await?;
    Ok(Json(ChatStatsView {
        chat_id,
        since,
        until,
        hours,
    }))
}

/// Waits until the activity rollup holds the chat at `want` (the rollup has its own readers,
/// so the chat read model being there does not mean the rollup is).
async fn rollup_reaches(state: &QueryState, chat: ChatId, want: u64) -> Result<(), ApiError> {
    let deadline = Instant::now() + state.config.min_sequence_wait;
    let want_db = crate::db::bound(want);
    loop {
        let have: Option<i64> =
            sqlx::query_scalar("SELECT last_sequence FROM activity_chats WHERE chat_id = $1")
                .bind(chat.as_uuid())
                .fetch_optional(&state.pg)
                .await?;
        if have.is_some_and(|h| h >= want_db) {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ApiError::Behind {
                chat_id: chat,
                have: have.map(crate::db::seq),
                want,
            });
        }
        tokio::time::sleep(access::POLL_EVERY.min(deadline - now)).await;
    }
}
