//! The CloudEvents 1.0 structured-JSON envelope every stream message is.
//!
//! The envelope is a typed serde struct rather than `cloudevents::Event`, so that encoding and
//! decoding touch the data once (no `serde_json::Value` in between) on the hot path; a test
//! checks that the official `cloudevents-sdk` reads our bytes with every attribute intact.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{EventId, UserId};

/// The NATS `Content-Type` header of every stream message.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
pub const SPEC_VERSION: &str = "1.0";
pub const DATA_CONTENT_TYPE: &str = "application/json";

/// An aggregate's event family: how its variants map to CloudEvents `type` names.
pub trait DomainEvent: Serialize + Sized + Send + Sync + 'static {
    /// CloudEvents `source` for this aggregate kind.
    const SOURCE: &'static str;
    /// Every `type` this family reads, old versions included.
    const TYPES: &'static [&'static str];
    fn event_type(&self) -> &'static str;
    fn from_data(event_type: &str, data: &RawValue) -> Result<Self, DecodeError>;
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a CloudEvent: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported specversion {0:?}")]
    SpecVersion(String),
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("event source {found:?} is not {expected:?}")]
    Source {
        expected: &'static str,
        found: String,
    },
}

/// Everything in the envelope but the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMeta {
    pub id: EventId,
    /// The aggregate id, as text (CloudEvents `subject`).
    pub subject: String,
    pub time: DateTime<Utc>,
    /// The aggregate's version after this event: 1, 2, 3, … per chat or user.
    pub sequence: u64,
    /// The user who caused it.
    pub actor: UserId,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent<E> {
    pub meta: EventMeta,
    pub event: E,
}

#[derive(Serialize)]
struct OutEnvelope<'a, E> {
    specversion: &'static str,
    id: EventId,
    source: &'static str,
    #[serde(rename = "type")]
    ty: &'static str,
    subject: &'a str,
    time: &'a DateTime<Utc>,
    datacontenttype: &'static str,
    sequence: u64,
    actor: UserId,
    data: &'a E,
}

#[derive(Deserialize)]
struct InEnvelope<'a> {
    #[serde(borrow)]
    specversion: Cow<'a, str>,
    id: EventId,
    #[serde(borrow)]
    source: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(borrow)]
    subject: Cow<'a, str>,
    time: DateTime<Utc>,
    sequence: u64,
    actor: UserId,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// Encodes one event as a structured-mode CloudEvent.
pub fn encode<E: DomainEvent>(meta: &EventMeta, event: &E) -> Vec<u8> {
    let envelope = OutEnvelope {
        specversion: SPEC_VERSION,
        id: meta.id,
        source: E::SOURCE,
        ty: event.event_type(),
        subject: &meta.subject,
        time: &meta.time,
        datacontenttype: DATA_CONTENT_TYPE,
        sequence: meta.sequence,
        actor: meta.actor,
        data: event,
    };
    // Serialising plain structs of strings, ids and integers into a Vec cannot fail.
    serde_json::to_vec(&envelope).unwrap_or_default()
}

/// Decodes a structured-mode CloudEvent of family `E`.
pub fn decode<E: DomainEvent>(bytes: &[u8]) -> Result<StoredEvent<E>, DecodeError> {
    let env: InEnvelope<'_> = serde_json::from_slice(bytes)?;
    if env.specversion != SPEC_VERSION {
        return Err(DecodeError::SpecVersion(env.specversion.into_owned()));
    }
    if env.source != E::SOURCE {
        return Err(DecodeError::Source {
            expected: E::SOURCE,
            found: env.source.into_owned(),
        });
    }
    let event = E::from_data(&env.ty, env.data)?;
    Ok(StoredEvent {
        meta: EventMeta {
            id: env.id,
            subject: env.subject.into_owned(),
            time: env.time,
            sequence: env.sequence,
            actor: env.actor,
        },
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ChatEvent, MessageSent};
    use crate::ids::{ChatId, MessageId};
    use cloudevents::{AttributesReader, event::ExtensionValue};

    fn sample() -> (EventMeta, ChatEvent) {
        let meta = EventMeta {
            id: EventId::new(),
            subject: ChatId::new().to_string(),
            time: Utc::now(),
            sequence: 7,
            actor: UserId::new(),
        };
        let event = ChatEvent::MessageSent(MessageSent {
            message_id: MessageId::new(),
            sender_id: meta.actor,
            body: "hello \"world\" ✓".into(),
            reply_to: None,
            attachments: vec![],
            thread_root: None,
            mentions: vec![],
        });
        (meta, event)
    }

    #[test]
    fn encode_then_decode_is_identity() {
        let (meta, event) = sample();
        let back = decode::<ChatEvent>(&encode(&meta, &event)).unwrap();
        assert_eq!(back.meta, meta);
        assert_eq!(back.event, event);
    }

    #[test]
    fn the_official_sdk_reads_our_envelope_with_extensions() {
        let (meta, event) = sample();
        let bytes = encode(&meta, &event);
        let ce: cloudevents::Event = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(ce.id(), meta.id.to_string());
        assert_eq!(ce.ty(), ChatEvent::MESSAGE_SENT_V1);
        assert_eq!(ce.source().as_str(), ChatEvent::SOURCE);
        assert_eq!(ce.subject(), Some(meta.subject.as_str()));
        assert_eq!(ce.datacontenttype(), Some(DATA_CONTENT_TYPE));
        assert_eq!(
            ce.time().map(|t| t.timestamp_micros()),
            Some(meta.time.timestamp_micros())
        );
        assert_eq!(ce.extension("sequence"), Some(&ExtensionValue::Integer(7)));
        assert_eq!(
            ce.extension("actor"),
            Some(&ExtensionValue::String(meta.actor.to_string()))
        );
    }

    #[test]
    fn decode_refuses_unknown_types_and_foreign_sources() {
        let (meta, event) = sample();
        let text = String::from_utf8(encode(&meta, &event)).unwrap();
        let unknown = text.replace(ChatEvent::MESSAGE_SENT_V1, "parley.chat.nope.v1");
        assert!(matches!(
            decode::<ChatEvent>(unknown.as_bytes()),
            Err(DecodeError::UnknownType(_))
        ));
        let foreign = text.replace("/parley/chats", "/elsewhere");
        assert!(matches!(
            decode::<ChatEvent>(foreign.as_bytes()),
            Err(DecodeError::Source { .. })
        ));
        assert!(decode::<ChatEvent>(b"{not json").is_err());
    }
}
