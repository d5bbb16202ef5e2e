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

/// A message body sealed with XChaCha20-Poly1305 under the message's own key (KV bucket
/// `message_keys`, key `<chat_id>.<message_id>`), with the chat id and message id as associated
/// data. Deleting the message destroys the key, after which these bytes can never be opened
/// (crypto-shredding, ADR 7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SealedBody {
    /// Always `xchacha20poly1305`; another algorithm would be a new value here.
    pub alg: String,
    /// The 24-byte random nonce, base64 (standard alphabet, padded).
    pub nonce: String,
    /// Ciphertext and 16-byte tag, base64 (standard alphabet, padded).
    pub ciphertext: String,
}

/// `parley.chat.message_sent.v2`: a message whose body is sealed (v1 carried it in clear).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageSentV2 {
    pub message_id: MessageId,
    pub sender_id: UserId,
    pub sealed_body: SealedBody,
    pub reply_to: Option<MessageId>,
    #[serde(default)]
    pub attachments: Vec<AttachmentId>,
}

/// `parley.chat.message_edited.v1`: the sender replaced the body; the new one is sealed under
/// the same message key, so deletion shreds every version at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageEdited {
    pub message_id: MessageId,
    pub sealed_body: SealedBody,
}

/// `parley.chat.message_deleted.v1`: deleted for everyone (by its sender or an admin, the
/// event's `actor`); the message key is destroyed right after this is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageDeleted {
    pub message_id: MessageId,
}

/// `parley.chat.reaction_added.v1` / `parley.chat.reaction_removed.v1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Reaction {
    pub message_id: MessageId,
    /// One emoji, at most 32 bytes of UTF-8.
    pub emoji: String,
    pub user_id: UserId,
}

/// Events on `chats.<chat_id>` in the `CHATS` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ChatEvent {
    Created(ChatCreated),
    ParticipantsModified(ParticipantsModified),
    MessageSent(MessageSent),
    MessageSentV2(MessageSentV2),
    MessageEdited(MessageEdited),
    MessageDeleted(MessageDeleted),
    ReactionAdded(Reaction),
    ReactionRemoved(Reaction),
}

impl ChatEvent {
    pub const CREATED_V1: &'static str = "parley.chat.created.v1";
    pub const PARTICIPANTS_MODIFIED_V1: &'static str = "parley.chat.participants_modified.v1";
    pub const MESSAGE_SENT_V1: &'static str = "parley.chat.message_sent.v1";
    pub const MESSAGE_SENT_V2: &'static str = "parley.chat.message_sent.v2";
    pub const MESSAGE_EDITED_V1: &'static str = "parley.chat.message_edited.v1";
    pub const MESSAGE_DELETED_V1: &'static str = "parley.chat.message_deleted.v1";
    pub const REACTION_ADDED_V1: &'static str = "parley.chat.reaction_added.v1";
    pub const REACTION_REMOVED_V1: &'static str = "parley.chat.reaction_removed.v1";

    /// The message this event is about, for events about one message.
    pub fn message_id(&self) -> Option<MessageId> {
        match self {
            ChatEvent::MessageSent(m) => Some(m.message_id),
            ChatEvent::MessageSentV2(m) => Some(m.message_id),
            ChatEvent::MessageEdited(e) => Some(e.message_id),
            ChatEvent::MessageDeleted(d) => Some(d.message_id),
            ChatEvent::ReactionAdded(r) | ChatEvent::ReactionRemoved(r) => Some(r.message_id),
            ChatEvent::Created(_) | ChatEvent::ParticipantsModified(_) => None,
        }
    }

    /// The sealed body this event carries, if any (a v2 message or an edit).
    pub fn sealed_body(&self) -> Option<&SealedBody> {
        match self {
            ChatEvent::MessageSentV2(m) => Some(&m.sealed_body),
            ChatEvent::MessageEdited(e) => Some(&e.sealed_body),
            _ => None,
        }
    }
}

impl DomainEvent for ChatEvent {
    const SOURCE: &'static str = "/parley/chats";
    const TYPES: &'static [&'static str] = &[
        Self::CREATED_V1,
        Self::PARTICIPANTS_MODIFIED_V1,
        Self::MESSAGE_SENT_V1,
        Self::MESSAGE_SENT_V2,
        Self::MESSAGE_EDITED_V1,
        Self::MESSAGE_DELETED_V1,
        Self::REACTION_ADDED_V1,
        Self::REACTION_REMOVED_V1,
    ];

    fn event_type(&self) -> &'static str {
        match self {
            ChatEvent::Created(_) => Self::CREATED_V1,
            ChatEvent::ParticipantsModified(_) => Self::PARTICIPANTS_MODIFIED_V1,
            ChatEvent::MessageSent(_) => Self::MESSAGE_SENT_V1,
            ChatEvent::MessageSentV2(_) => Self::MESSAGE_SENT_V2,
            ChatEvent::MessageEdited(_) => Self::MESSAGE_EDITED_V1,
            ChatEvent::MessageDeleted(_) => Self::MESSAGE_DELETED_V1,
            ChatEvent::ReactionAdded(_) => Self::REACTION_ADDED_V1,
            ChatEvent::ReactionRemoved(_) => Self::REACTION_REMOVED_V1,
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
            Self::MESSAGE_SENT_V2 => ChatEvent::MessageSentV2(serde_json::from_str(d)?),
            Self::MESSAGE_EDITED_V1 => ChatEvent::MessageEdited(serde_json::from_str(d)?),
            Self::MESSAGE_DELETED_V1 => ChatEvent::MessageDeleted(serde_json::from_str(d)?),
            Self::REACTION_ADDED_V1 => ChatEvent::ReactionAdded(serde_json::from_str(d)?),
            Self::REACTION_REMOVED_V1 => ChatEvent::ReactionRemoved(serde_json::from_str(d)?),
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
