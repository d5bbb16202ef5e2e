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

/// Who may join a channel: `public` ones anyone may join by adding themselves; `private` chats
/// (every dm and group) only admins grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    Public,
    #[default]
    Private,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Private => "private",
        }
    }
}

/// A member's own notification level in a chat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotifyLevel {
    #[default]
    All,
    Mentions,
    None,
}

impl NotifyLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyLevel::All => "all",
            NotifyLevel::Mentions => "mentions",
            NotifyLevel::None => "none",
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
    /// Only a channel may be `public`; absent in events written before visibility existed
    /// (they are all private).
    #[serde(default)]
    pub visibility: Visibility,
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
    /// The message that starts the thread this one replies in (itself in no thread); null for
    /// a message of the main conversation. Absent in older events.
    #[serde(default)]
    pub thread_root: Option<MessageId>,
    /// Members named by `@handle` in the body, resolved when sent. Absent in older events.
    #[serde(default)]
    pub mentions: Vec<UserId>,
}

/// `parley.chat.title_changed.v1`: a group's or channel's new title.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TitleChanged {
    pub title: String,
}

/// `parley.chat.role_changed.v1`: an admin made a member `admin` or `member`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RoleChanged {
    pub user_id: UserId,
    pub role: Role,
}

/// A message body sealed with XChaCha20-Poly1305 under the message's own key (KV bucket
/// `message_keys`: a slot of the key block `b.<block_id>` when `key` is `block`, else the entry
/// `m.<message_id>`), with the chat id and message id as associated data. Deleting the message
/// destroys the key, after which these bytes can never be opened (crypto-shredding, ADR 7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SealedBody {
    /// Always `xchacha20poly1305`; another algorithm would be a new value here.
    pub alg: String,
    /// The 24-byte random nonce, base64 (standard alphabet, padded).
    pub nonce: String,
    /// Ciphertext and 16-byte tag, base64 (standard alphabet, padded).
    pub ciphertext: String,
    /// Where the key is kept: `block` for a slot of a key block (the message id names the block
    /// and the slot, ADR 7 "Keys in blocks"); absent for a key of its own (`m.<message_id>`,
    /// or the older `<chat_id>.<message_id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyPlace>,
}

/// Where a sealed body's key is kept, when not in an entry of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyPlace {
    /// A slot of a key block: 64 keys in one KV entry.
    Block,
}

/// What a message records about each attachment it carries, copied from the upload when the
/// message is sent, so every reader of the event (live frames, projections, analysts) sees it
/// without looking the attachment up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AttachmentRef {
    pub attachment_id: AttachmentId,
    /// The uploaded media type, e.g. `image/png`.
    pub content_type: String,
    /// Bytes.
    pub size: u64,
    pub filename: Option<String>,
    /// sha256 of the bytes, lowercase hex.
    pub sha256: String,
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
    /// As in `message_sent.v1`: the thread this message replies in, if any.
    #[serde(default)]
    pub thread_root: Option<MessageId>,
    /// As in `message_sent.v1`: members named by `@handle`, resolved when sent.
    #[serde(default)]
    pub mentions: Vec<UserId>,
    /// The metadata of `attachments`, in the same order. Absent in older events (which carry
    /// no attachments: none could be sent before uploads existed).
    #[serde(default)]
    pub attachment_details: Vec<AttachmentRef>,
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
    TitleChanged(TitleChanged),
    RoleChanged(RoleChanged),
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
    pub const TITLE_CHANGED_V1: &'static str = "parley.chat.title_changed.v1";
    pub const ROLE_CHANGED_V1: &'static str = "parley.chat.role_changed.v1";
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
            ChatEvent::Created(_)
            | ChatEvent::ParticipantsModified(_)
            | ChatEvent::TitleChanged(_)
            | ChatEvent::RoleChanged(_) => None,
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
        Self::TITLE_CHANGED_V1,
        Self::ROLE_CHANGED_V1,
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
            ChatEvent::TitleChanged(_) => Self::TITLE_CHANGED_V1,
            ChatEvent::RoleChanged(_) => Self::ROLE_CHANGED_V1,
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
            Self::TITLE_CHANGED_V1 => ChatEvent::TitleChanged(serde_json::from_str(d)?),
            Self::ROLE_CHANGED_V1 => ChatEvent::RoleChanged(serde_json::from_str(d)?),
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

/// `parley.user.user_blocked.v1`: this user blocked `user_id`, who can then neither open a dm
/// with them nor add them to a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserBlocked {
    pub user_id: UserId,
}

/// `parley.user.user_unblocked.v1`: the block on `user_id` is lifted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserUnblocked {
    pub user_id: UserId,
}

/// `parley.user.chat_settings_changed.v1`: this user's own settings in one chat, in full. A user
/// event, not a chat event, so that it takes no chat sequence and no other member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ChatSettingsChanged {
    pub chat_id: ChatId,
    pub muted: bool,
    pub notify: NotifyLevel,
}

/// Events on `users.<user_id>` in the `USERS` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum UserEvent {
    Registered(UserRegistered),
    DeviceAdded(DeviceAdded),
    DeviceRemoved(DeviceRemoved),
    Blocked(UserBlocked),
    Unblocked(UserUnblocked),
    ChatSettingsChanged(ChatSettingsChanged),
}

impl UserEvent {
    pub const REGISTERED_V1: &'static str = "parley.user.registered.v1";
    pub const DEVICE_ADDED_V1: &'static str = "parley.user.device_added.v1";
    pub const DEVICE_REMOVED_V1: &'static str = "parley.user.device_removed.v1";
    pub const BLOCKED_V1: &'static str = "parley.user.user_blocked.v1";
    pub const UNBLOCKED_V1: &'static str = "parley.user.user_unblocked.v1";
    pub const CHAT_SETTINGS_CHANGED_V1: &'static str = "parley.user.chat_settings_changed.v1";
}

impl DomainEvent for UserEvent {
    const SOURCE: &'static str = "/parley/users";
    const TYPES: &'static [&'static str] = &[
        Self::REGISTERED_V1,
        Self::DEVICE_ADDED_V1,
        Self::DEVICE_REMOVED_V1,
        Self::BLOCKED_V1,
        Self::UNBLOCKED_V1,
        Self::CHAT_SETTINGS_CHANGED_V1,
    ];

    fn event_type(&self) -> &'static str {
        match self {
            UserEvent::Registered(_) => Self::REGISTERED_V1,
            UserEvent::DeviceAdded(_) => Self::DEVICE_ADDED_V1,
            UserEvent::DeviceRemoved(_) => Self::DEVICE_REMOVED_V1,
            UserEvent::Blocked(_) => Self::BLOCKED_V1,
            UserEvent::Unblocked(_) => Self::UNBLOCKED_V1,
            UserEvent::ChatSettingsChanged(_) => Self::CHAT_SETTINGS_CHANGED_V1,
        }
    }

    fn from_data(event_type: &str, data: &RawValue) -> Result<Self, DecodeError> {
        let d = data.get();
        Ok(match event_type {
            Self::REGISTERED_V1 => UserEvent::Registered(serde_json::from_str(d)?),
            Self::DEVICE_ADDED_V1 => UserEvent::DeviceAdded(serde_json::from_str(d)?),
            Self::DEVICE_REMOVED_V1 => UserEvent::DeviceRemoved(serde_json::from_str(d)?),
            Self::BLOCKED_V1 => UserEvent::Blocked(serde_json::from_str(d)?),
            Self::UNBLOCKED_V1 => UserEvent::Unblocked(serde_json::from_str(d)?),
            Self::CHAT_SETTINGS_CHANGED_V1 => {
                UserEvent::ChatSettingsChanged(serde_json::from_str(d)?)
            }
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

/// The `actor` of an event that no single user caused (a delivered batch holding several
/// users' devices): the nil UUID, which no user id is (they are UUIDv7).
pub const SYSTEM_ACTOR: UserId = UserId::from_uuid(uuid::Uuid::nil());

/// `parley.receipt.delivered_batch.v1`: the delivered watermarks of several devices in one
/// chat, as one push-gateway flush collected them (each entry means what a
/// `parley.receipt.delivered.v1` means). One event instead of one per device keeps the
/// `RECEIPTS` stream, and everything that reads it, from growing with the chat's size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeliveredBatch {
    /// At least two entries, each device at most once.
    pub receipts: Vec<Delivered>,
}

/// Events on `receipts.<chat_id>` in the `RECEIPTS` stream: cumulative watermarks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ReceiptEvent {
    Delivered(Delivered),
    DeliveredBatch(DeliveredBatch),
    Read(Read),
}

impl ReceiptEvent {
    pub const DELIVERED_V1: &'static str = "parley.receipt.delivered.v1";
    pub const DELIVERED_BATCH_V1: &'static str = "parley.receipt.delivered_batch.v1";
    pub const READ_V1: &'static str = "parley.receipt.read.v1";

    /// The delivered watermarks the event carries: one, several, or none (a read receipt).
    pub fn delivered(&self) -> &[Delivered] {
        match self {
            ReceiptEvent::Delivered(d) => std::slice::from_ref(d),
            ReceiptEvent::DeliveredBatch(b) => &b.receipts,
            ReceiptEvent::Read(_) => &[],
        }
    }

    /// The CloudEvent `actor`: the user whose device or reading moved the watermark; for a
    /// batch holding more than one user's devices, [`SYSTEM_ACTOR`].
    pub fn actor(&self) -> UserId {
        match self {
            ReceiptEvent::Read(r) => r.user_id,
            _ => {
                let mut users = self.delivered().iter().map(|d| d.user_id);
                let first = users.next().unwrap_or(SYSTEM_ACTOR);
                if users.all(|u| u == first) {
                    first
                } else {
                    SYSTEM_ACTOR
                }
            }
        }
    }

    /// The CloudEvent `sequence`: the highest chat sequence a watermark of the event reaches.
    pub fn up_to(&self) -> u64 {
        match self {
            ReceiptEvent::Read(r) => r.up_to,
            _ => self.delivered().iter().map(|d| d.up_to).max().unwrap_or(0),
        }
    }
}

impl DomainEvent for ReceiptEvent {
    const SOURCE: &'static str = "/parley/receipts";
    const TYPES: &'static [&'static str] =
        &[Self::DELIVERED_V1, Self::DELIVERED_BATCH_V1, Self::READ_V1];

    fn event_type(&self) -> &'static str {
        match self {
            ReceiptEvent::Delivered(_) => Self::DELIVERED_V1,
            ReceiptEvent::DeliveredBatch(_) => Self::DELIVERED_BATCH_V1,
            ReceiptEvent::Read(_) => Self::READ_V1,
        }
    }

    fn from_data(event_type: &str, data: &RawValue) -> Result<Self, DecodeError> {
        let d = data.get();
        Ok(match event_type {
            Self::DELIVERED_V1 => ReceiptEvent::Delivered(serde_json::from_str(d)?),
            Self::DELIVERED_BATCH_V1 => ReceiptEvent::DeliveredBatch(serde_json::from_str(d)?),
            Self::READ_V1 => ReceiptEvent::Read(serde_json::from_str(d)?),
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_sent_written_before_threads_and_mentions_reads_with_empty_defaults() {
        let old = r#"{"message_id":"0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3f","sender_id":"0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e40","body":"hi","reply_to":null,"attachments":[]}"#;
        let m: MessageSent = serde_json::from_str(old).unwrap();
        assert_eq!(m.thread_root, None);
        assert!(m.mentions.is_empty());
    }

    #[test]
    fn a_delivered_batch_reaches_its_highest_watermark_and_names_its_user_only_when_it_has_one() {
        let (alice, bob) = (UserId::new(), UserId::new());
        let entry = |user_id, up_to| Delivered {
            user_id,
            device_id: DeviceId::new(),
            up_to,
        };
        let batch = |receipts| ReceiptEvent::DeliveredBatch(DeliveredBatch { receipts });
        let two_users = batch(vec![entry(alice, 3), entry(bob, 7), entry(alice, 5)]);
        assert_eq!(two_users.up_to(), 7);
        assert_eq!(two_users.actor(), SYSTEM_ACTOR);
        assert_eq!(two_users.delivered().len(), 3);
        let one_user = batch(vec![entry(alice, 3), entry(alice, 4)]);
        assert_eq!((one_user.up_to(), one_user.actor()), (4, alice));
        let single = ReceiptEvent::Delivered(entry(bob, 2));
        assert_eq!((single.up_to(), single.actor()), (2, bob));
        let read = ReceiptEvent::Read(Read {
            user_id: alice,
            up_to: 9,
        });
        assert_eq!((read.up_to(), read.actor()), (9, alice));
        assert!(read.delivered().is_empty());
    }

    #[test]
    fn a_chat_created_before_visibility_existed_is_private() {
        let old = r#"{"chat_id":"0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3f","kind":"channel","title":"x","members":[]}"#;
        let c: ChatCreated = serde_json::from_str(old).unwrap();
        assert_eq!(c.visibility, Visibility::Private);
    }
}
