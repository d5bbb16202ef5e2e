//! Parley's JetStream layer: the one definition of every stream, consumer name and bucket, and
//! the event store (optimistic append with dedup, aggregate loading from cache and snapshots).

pub mod attachments;
pub mod message_keys;
pub mod presence;
pub mod receipts;
pub mod replay;
pub mod setup;
pub mod store;

pub use attachments::{AttachmentError, AttachmentMeta, Attachments, NewAttachment};
pub use message_keys::{KeyError, KeyPool, MessageKey, MessageKeys};
pub use setup::{
    Buckets, CONNECTION_NAME, JetStreamSettings, connect, connect_named, context, ensure, subjects,
};
pub use store::{Aggregate, AppendContext, EventStore, ExecuteError, Outcome, StoreError};

/// Stream names: part of the public contract (API.md, "Event streams").
pub mod streams {
    pub const CHATS: &str = "CHATS";
    pub const USERS: &str = "USERS";
    pub const RECEIPTS: &str = "RECEIPTS";
}
