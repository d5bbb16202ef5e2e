//! Every event type Parley stores, by aggregate. Event data uses plain types, not the validated
//! values of `values.rs`: a rule tightened later must never make an old event unreadable.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::cloudevent::{DecodeError, DomainEvent};
use crate::ids::{AttachmentId, ChatId, DeviceId, MessageId, UserId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChatKind {
    /// Exactly two people; one per pair.
    Dm,
    /// Up to 100 members by default.
    Group,
    /// Up to 100,000 members by default.
    Channel,
}

impl ChatKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatKind::Dm => "dm",
            ChatKind::Group => "group",
            ChatKind::Channel => "channel",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MemberRole {
    pub user_id: UserId,
    pub role: Role,
}

/// `parley.chat.created.v1`: always a chat's sequence 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ChatCreated {
    pub chat_id: ChatId,
    pub kind: ChatKind,
    pub title: Option<String>,
    /// Everyone in the chat at creation, the creator first (as `admin`).
    pub members: Vec<MemberRole>,
}

/// `parley.chat.participants_modified.v1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ParticipantsModified {
    /// New members, as `member`.
    pub added: Vec<UserId>,
    pub removed: Vec<UserId>,
    /// Members made `admin` because the last admin left.
    #[serde(default)]
    pub promoted: Vec<UserId>,
}

/// `parley.chat.message_sent.v1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageSent {
    pub message_id: MessageId,
    pub sender_id: UserId,
    pub body: String,
    pub reply_to: Option<MessageId>,
    #[serde(default)]
    pub attachments: Vec<AttachmentId>,
}

/// Events on `chats.<chat_id>` in the `CHATS` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ChatEvent {
    Created(ChatCreated),
    ParticipantsModified(ParticipantsModified),
    MessageSent(MessageSent),
}

impl ChatEvent {
    pub const CREATED_V1: &'static str = "parley.chat.created.v1";
    pub const PARTICIPANTS_MODIFIED_V1: &'static str = "parley.chat.participants_modified.v1";
    pub const MESSAGE_SENT_V1: &'static str = "parley.chat.message_sent.v1";
}

impl DomainEvent for ChatEvent {
    const SOURCE: &'static str = "/parley/chats";
    const TYPES: &'static [&'static str] = &[
        Self::CREATED_V1,
        Self::PARTICIPANTS_MODIFIED_V1,
        Self::MESSAGE_SENT_V1,
    ];

    fn event_type(&self) -> &'static str {
        match self {
            ChatEvent::Created(_) => Self::CREATED_V1,
            ChatEvent::ParticipantsModified(_) => Self::PARTICIPANTS_MODIFIED_V1,
            ChatEvent::MessageSent(_) => Self::MESSAGE_SENT_V1,
        }
    }

    fn from_data(event_type: &str, data: &RawValue) -> Result<Self, DecodeError> {
        let d = data.get();
        Ok(match event_type {
            Self::CREATED_V1 => ChatEvent::Created(serde_json::from_str(d)?),
            Self::PARTICIPANTS_MODIFIED_V1 => {
                ChatEvent::ParticipantsModified(serde_json::from_str(d)?)
            }
            Self::MESSAGE_SENT_V1 => ChatEvent::MessageSent(serde_json::from_str(d)?),
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        })
    }
}

/// `parley.user.registered.v1`. Credentials are not events: the password hash lives in the
/// `credentials` KV bucket so that analysts replaying `USERS` never see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserRegistered {
    pub user_id: UserId,
    pub handle: String,
    pub display_name: String,
}

/// `parley.user.device_added.v1`: a login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceAdded {
    pub device_id: DeviceId,
    pub device_name: String,
    pub platform: Option<String>,
}

/// `parley.user.device_removed.v1`: a logout; the device's token is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceRemoved {
    pub device_id: DeviceId,
}

/// Events on `users.<user_id>` in the `USERS` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum UserEvent {
    Registered(UserRegistered),
    DeviceAdded(DeviceAdded),
    DeviceRemoved(DeviceRemoved),
}

impl UserEvent {
    pub const REGISTERED_V1: &'static str = "parley.user.registered.v1";
    pub const DEVICE_ADDED_V1: &'static str = "parley.user.device_added.v1";
    pub const DEVICE_REMOVED_V1: &'static str = "parley.user.device_removed.v1";
}

impl DomainEvent for UserEvent {
    const SOURCE: &'static str = "/parley/users";
    const TYPES: &'static [&'static str] = &[
        Self::REGISTERED_V1,
        Self::DEVICE_ADDED_V1,
        Self::DEVICE_REMOVED_V1,
    ];

    fn event_type(&self) -> &'static str {
        match self {
            UserEvent::Registered(_) => Self::REGISTERED_V1,
            UserEvent::DeviceAdded(_) => Self::DEVICE_ADDED_V1,
            UserEvent::DeviceRemoved(_) => Self::DEVICE_REMOVED_V1,
        }
    }

    fn from_data(event_type: &str, data: &RawValue) -> Result<Self, DecodeError> {
        let d = data.get();
        Ok(match event_type {
            Self::REGISTERED_V1 => UserEvent::Registered(serde_json::from_str(d)?),
            Self::DEVICE_ADDED_V1 => UserEvent::DeviceAdded(serde_json::from_str(d)?),
            Self::DEVICE_REMOVED_V1 => UserEvent::DeviceRemoved(serde_json::from_str(d)?),
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        })
    }
}

/// `parley.receipt.delivered.v1`: a device holds every event of the chat up to `up_to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Delivered {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub up_to: u64,
}

/// `parley.receipt.read.v1`: the user has read the chat up to `up_to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Read {
    pub user_id: UserId,
    pub up_to: u64,
}

/// Events on `receipts.<chat_id>` in the `RECEIPTS` stream: cumulative watermarks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ReceiptEvent {
    Delivered(Delivered),
    Read(Read),
}

impl ReceiptEvent {
    pub const DELIVERED_V1: &'static str = "parley.receipt.delivered.v1";
    pub const READ_V1: &'static str = "parley.receipt.read.v1";
}

impl DomainEvent for ReceiptEvent {
    const SOURCE: &'static str = "/parley/receipts";
    const TYPES: &'static [&'static str] = &[Self::DELIVERED_V1, Self::READ_V1];

    fn event_type(&self) -> &'static str {
        match self {
            ReceiptEvent::Delivered(_) => Self::DELIVERED_V1,
            ReceiptEvent::Read(_) => Self::READ_V1,
        }
    }

    fn from_data(event_type: &str, data: &RawValue) -> Result<Self, DecodeError> {
        let d = data.get();
        Ok(match event_type {
            Self::DELIVERED_V1 => ReceiptEvent::Delivered(serde_json::from_str(d)?),
            Self::READ_V1 => ReceiptEvent::Read(serde_json::from_str(d)?),
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        })
    }
}
