//! The JSON the gateway reads from and writes to core NATS, and the frames that
//! `schemas::frames::ServerFrame` does not cover (typing).

use axum::extract::ws::Utf8Bytes;
use parley_schemas::frames::ServerFrame;
use parley_schemas::{ChatId, DeviceId, UserId};
use serde::{Deserialize, Serialize};

/// Core NATS subject of a chat's typing indicators (never stored).
pub(crate) fn typing_subject(chat: ChatId) -> String {
    format!("typing.{chat}")
}

/// `notify.user.<user_id>`: the user joined or left a chat at `sequence`.
#[derive(Debug, Deserialize)]
pub(crate) struct MembershipNotice {
    pub chat_id: ChatId,
    pub sequence: u64,
    pub change: MembershipChange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MembershipChange {
    Added,
    Removed,
}

/// `notify.devices.revoked`.
#[derive(Debug, Deserialize)]
pub(crate) struct DeviceRevoked {
    pub device_id: DeviceId,
}

/// `typing.<chat_id>`, as published and as received.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Typing {
    pub chat_id: ChatId,
    pub user_id: UserId,
}

#[derive(Serialize)]
struct TypingFrame<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(flatten)]
    typing: &'a Typing,
}

pub(crate) fn typing_frame(typing: &Typing) -> Utf8Bytes {
    let frame = TypingFrame {
        ty: "typing",
        typing,
    };
    // Two ids and a constant: serialisation cannot fail.
    serde_json::to_string(&frame).unwrap_or_default().into()
}

pub(crate) fn error_frame(code: &'static str, detail: impl Into<String>) -> Utf8Bytes {
    ServerFrame::Error {
        code,
        detail: detail.into(),
    }
    .to_json()
    .into()
}

pub(crate) fn ready_frame(user_id: UserId, device_id: DeviceId) -> Utf8Bytes {
    ServerFrame::Ready { user_id, device_id }.to_json().into()
}

pub(crate) fn pong_frame() -> Utf8Bytes {
    Utf8Bytes::from_static(r#"{"type":"pong"}"#)
}

/// Only the `sequence` extension of a CloudEvent: enough to learn that an event exists even
/// when its type is one this build cannot decode.
#[derive(Debug, Deserialize)]
pub(crate) struct SequenceOnly {
    pub sequence: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pong_and_typing_frames_have_the_documented_shape() {
        let pong: serde_json::Value = serde_json::from_str(&pong_frame()).unwrap();
        assert_eq!(pong, serde_json::json!({"type": "pong"}));
        let t = Typing {
            chat_id: ChatId::new(),
            user_id: UserId::new(),
        };
        let v: serde_json::Value = serde_json::from_str(&typing_frame(&t)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "typing", "chat_id": t.chat_id, "user_id": t.user_id})
        );
    }
}
