//! The JSON the gateway reads from and writes to core NATS, and small helpers that render
//! `schemas::frames::ServerFrame`s.

use axum::extract::ws::Utf8Bytes;
use parley_schemas::frames::ServerFrame;
use parley_schemas::{ChatId, DeviceId, UserId};
use serde::{Deserialize, Serialize};

/// `notify.user.<user_id>`: the user joined or left a chat at `sequence`.
#[derive(Debug, Clone, Copy, Deserialize)]
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
    fn the_pong_frame_has_the_documented_shape() {
        let pong: serde_json::Value = serde_json::from_str(&pong_frame()).unwrap();
        assert_eq!(pong, serde_json::json!({"type": "pong"}));
    }
}
