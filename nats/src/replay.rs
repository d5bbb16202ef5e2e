//! Reading a stream back in order, for analysts (`parley replay`) and projection rebuilds: an
//! ephemeral ordered consumer (no acks, no durable state), so a replay never disturbs the
//! projectors' durable consumers, and the stored payload bytes are handed out unchanged.

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::Ordered, pull::OrderedConfig},
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The oldest event the stream still holds.
    First,
    /// The first event at or after this stream sequence.
    Sequence(u64),
    /// The first event JetStream stored at or after this instant.
    Time(DateTime<Utc>),
}

/// What to read: one stream, optionally one subject of it, from `start`.
#[derive(Debug, Clone)]
pub struct ReplaySpec {
    pub stream: String,
    /// A full subject (e.g. `chats.<chat_id>`) built from a validated id, or `None` for all.
    pub filter_subject: Option<String>,
    pub start: Start,
}

/// One stored event, as JetStream holds it.
#[derive(Debug, Clone)]
pub struct Replayed {
    /// The event's position in its stream.
    pub stream_seq: u64,
    /// When JetStream stored it.
    pub stored_at: DateTime<Utc>,
    /// How many matching events the stream held after this one when it was delivered.
    pub pending: u64,
    /// The CloudEvent, byte for byte as stored.
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("stream {stream} is not available: {cause}")]
    Stream { stream: String, cause: String },
    #[error("cannot create a replay consumer on {stream}: {cause}")]
    Consumer { stream: String, cause: String },
    #[error("reading {stream} failed: {cause}")]
    Read { stream: String, cause: String },
}

/// An open replay: events in stream order, one at a time.
pub struct Replay {
    stream: String,
    messages: Ordered,
    /// Matching events the stream held when the replay opened.
    pending_at_open: u64,
}

/// The stream's sequence range as it is now: `(first, last)`; an empty stream has `last == 0`
/// or `first > last`.
pub async fn bounds(js: &jetstream::Context, stream: &str) -> Result<(u64, u64), ReplayError> {
    let mut s = js
        .get_stream(stream)
        .await
        .map_err(|e| ReplayError::Stream {
            stream: stream.to_owned(),
            cause: e.to_string(),
        })?;
    let info = s.info().await.map_err(|e| ReplayError::Stream {
        stream: stream.to_owned(),
        cause: e.to_string(),
    })?;
    Ok((info.state.first_sequence, info.state.last_sequence))
}

impl Replay {
    /// Creates the ephemeral ordered consumer. It is deleted by the server once the replay is
    /// dropped and idle (the ordered consumer's inactivity threshold).
    pub async fn open(js: &jetstream::Context, spec: &ReplaySpec) -> Result<Replay, ReplayError> {
        let stream_err = |e: String| ReplayError::Stream {
            stream: spec.stream.clone(),
            cause: e,
        };
        let stream = js
            .get_stream(&spec.stream)
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let deliver_policy = match spec.start {
            Start::First => DeliverPolicy::All,
            Start::Sequence(seq) => DeliverPolicy::ByStartSequence {
                start_sequence: seq.max(1),
            },
            Start::Time(at) => DeliverPolicy::ByStartTime {
                start_time: to_nats_time(at).map_err(stream_err)?,
            },
        };
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: spec.filter_subject.clone().unwrap_or_default(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| ReplayError::Consumer {
                stream: spec.stream.clone(),
                cause: e.to_string(),
            })?;
        let pending_at_open = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| ReplayError::Consumer {
                stream: spec.stream.clone(),
                cause: e.to_string(),
            })?;
        Ok(Replay {
            stream: spec.stream.clone(),
            messages,
            pending_at_open,
        })
    }

    /// Matching events the stream held when the replay opened (0: nothing to read yet).
    pub fn pending_at_open(&self) -> u64 {
        self.pending_at_open
    }

    /// The next event; waits for one to be stored when the replay has caught up. `None` only if
    /// the connection closes.
    pub async fn next(&mut self) -> Option<Result<Replayed, ReplayError>> {
        let read_err = |cause: String| ReplayError::Read {
            stream: self.stream.clone(),
            cause,
        };
        let message = match self.messages.next().await? {
            Ok(m) => m,
            Err(e) => return Some(Err(read_err(e.to_string()))),
        };
        let info = match message.info() {
            Ok(i) => (
                i.stream_sequence,
                from_nats_time(i.published.unix_timestamp_nanos()),
                i.pending,
            ),
            Err(e) => return Some(Err(read_err(e.to_string()))),
        };
        Some(Ok(Replayed {
            stream_seq: info.0,
            stored_at: info.1,
            pending: info.2,
            payload: message.message.payload.clone(),
        }))
    }
}

fn to_nats_time(at: DateTime<Utc>) -> Result<async_nats::datetime::DateTime, String> {
    let nanos = at
        .timestamp_nanos_opt()
        .ok_or_else(|| format!("{at} is out of range"))?;
    async_nats::datetime::from_nanos(i128::from(nanos)).map_err(|e| e.to_string())
}

/// JetStream's timestamps as chrono; out-of-range values (never produced by a server) clamp.
pub fn from_nats_time(nanos: i128) -> DateTime<Utc> {
    let nanos = i64::try_from(nanos).unwrap_or(i64::MAX);
    DateTime::from_timestamp_nanos(nanos)
}
