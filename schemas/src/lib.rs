//! Parley's shared language: typed ids, validated values, commands, events, their CloudEvents
//! encoding and the JSON Schemas analysts read them with.

pub mod cloudevent;
pub mod events;
pub mod frames;
pub mod ids;
pub mod json_schema;
pub mod values;

pub use cloudevent::{DecodeError, DomainEvent, EventMeta, StoredEvent};
pub use events::{ChatEvent, ChatKind, NotifyLevel, ReceiptEvent, Role, UserEvent, Visibility};
pub use ids::{AttachmentId, ChatId, DeviceId, EventId, IdError, MessageId, UserId};
pub use values::{
    ChatTitle, DeviceName, DisplayName, Emoji, Handle, MessageBody, Password, Platform, ValueError,
};
