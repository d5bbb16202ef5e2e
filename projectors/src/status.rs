//! `parley projections status`: each projector's checkpoint and how far behind its stream it
//! is, in events and in seconds. Reads only (consumer info, stream info, one table), so it is
//! safe to run against a live system at any time.

use chrono::{DateTime, Utc};
use parley_nats::replay::from_nats_time;
use sqlx::PgPool;

use crate::PROJECTORS;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProjectorStatus {
    pub projector: &'static str,
    pub stream: &'static str,
    /// The durable consumer (`proj-<name>`); `None` in `consumer_exists` until it first ran.
    pub consumer: String,
    pub consumer_exists: bool,
    /// Highest stream sequence applied, from `projector_checkpoints` (0 before the first batch).
    pub checkpoint: u64,
    /// Everything up to here is acknowledged by the projector.
    pub acked: Option<u64>,
    /// The stream's last sequence.
    pub stream_last: u64,
    /// Events not yet acknowledged (or, without a consumer, above the checkpoint).
    pub lag_events: u64,
    /// Age of the oldest event not yet acknowledged; 0 when caught up.
    pub lag_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("stream {stream}: {cause}")]
    Stream { stream: &'static str, cause: String },
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

/// The status of every projector, in `PROJECTORS` order.
pub async fn status(
    js: &async_nats::jetstream::Context,
    pg: &PgPool,
) -> Result<Vec<ProjectorStatus>, StatusError> {
    let checkpoints: Vec<(String, i64)> =
        sqlx::query_as("SELECT projection, stream_seq FROM projector_checkpoints")
            .fetch_all(pg)
            .await?;
    let now = Utc::now();
    let mut out = Vec::with_capacity(PROJECTORS.len());
    for p in PROJECTORS {
        let err = |e: String| StatusError::Stream {
            stream: p.stream,
            cause: e,
        };
        let mut stream = js
            .get_stream(p.stream)
            .await
            .map_err(|e| err(e.to_string()))?;
        let state = stream
            .info()
            .await
            .map_err(|e| err(e.to_string()))?
            .state
            .clone();
        let checkpoint = checkpoints
            .iter()
            .find(|(name, _)| name == p.name)
            .map(|(_, seq)| u64::try_from(*seq).unwrap_or(0))
            .unwrap_or(0);
        let consumer = format!("proj-{}", p.name);
        let info = stream.consumer_info(&consumer).await.ok();
        let (acked, lag_events) = match &info {
            Some(i) => (
                Some(i.ack_floor.stream_sequence),
                i.num_pending + i.num_ack_pending as u64,
            ),
            None => (None, state.last_sequence.saturating_sub(checkpoint)),
        };
        let lag_seconds = if lag_events == 0 {
            0.0
        } else {
            // The oldest event not yet acknowledged; if it has expired, the oldest one held.
            let next = acked.unwrap_or(checkpoint) + 1;
            let at = match stream.get_raw_message(next.max(state.first_sequence)).await {
                Ok(m) => from_nats_time(m.time.unix_timestamp_nanos()),
                Err(_) => from_nats_time(state.first_timestamp.unix_timestamp_nanos()),
            };
            seconds_since(at, now)
        };
        out.push(ProjectorStatus {
            projector: p.name,
            stream: p.stream,
            consumer,
            consumer_exists: info.is_some(),
            checkpoint,
            acked,
            stream_last: state.last_sequence,
            lag_events,
            lag_seconds,
        });
    }
    Ok(out)
}

fn seconds_since(at: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    ((now - at).num_milliseconds().max(0) as f64) / 1000.0
}
