//! The public JSON shapes shared by query-api and push-gateway: a message as history shows it,
//! chat updates, and the WebSocket frames (API.md, "Push gateway").

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::cloudevent::StoredEvent;
use crate::events::{AttachmentRef, ChatEvent, ChatKind, MemberRole, Role, Visibility};
use crate::ids::{AttachmentId, ChatId, DeviceId, MessageId, UserId};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentView {
    pub attachment_id: AttachmentId,
    pub content_type: String,
    pub size: u64,
    pub filename: Option<String>,
}

impl From<&AttachmentRef> for AttachmentView {
    fn from(a: &AttachmentRef) -> Self {
        Self {
            attachment_id: a.attachment_id,
            content_type: a.content_type.clone(),
            size: a.size,
            filename: a.filename.clone(),
        }
    }
}

/// A message as history and `newMessage` frames show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    pub message_id: MessageId,
    pub sequence: u64,
    pub sender_id: UserId,
    /// `None` once deleted.
    pub body: Option<String>,
    pub reply_to: Option<MessageId>,
    pub attachments: Vec<AttachmentView>,
    pub sent_at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    pub deleted: bool,
    pub reactions: BTreeMap<String, Vec<UserId>>,
    /// The root of the thread this message replies in; null in the main conversation.
    #[serde(default)]
    pub thread_root: Option<MessageId>,
    /// On a thread's root: how many replies the thread holds (0 for any other message).
    #[serde(default)]
    pub thread_reply_count: u64,
    /// On a thread's root: when its latest reply was sent.
    #[serde(default)]
    pub last_reply_at: Option<DateTime<Utc>>,
    /// Members the body names by `@handle`, resolved when sent.
    #[serde(default)]
    pub mentions: Vec<UserId>,
}

/// The `update` of a `chatUpdate` frame: the event's kind, who did it, when, and its facts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatUpdate {
    #[serde(flatten)]
    pub change: Change,
    pub actor: UserId,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    Created {
        chat_kind: ChatKind,
        title: Option<String>,
        members: Vec<MemberRole>,
        #[serde(default)]
        visibility: Visibility,
    },
    ParticipantsModified {
        added: Vec<UserId>,
        removed: Vec<UserId>,
        promoted: Vec<UserId>,
    },
    TitleChanged {
        title: String,
    },
    RoleChanged {
        user_id: UserId,
        role: Role,
    },
    /// The message's new body; `null` when it can no longer be read (deleted since).
    MessageEdited {
        message_id: MessageId,
        body: Option<String>,
    },
    /// Deleted for everyone; carries no body, ever.
    MessageDeleted {
        message_id: MessageId,
    },
    ReactionAdded {
        message_id: MessageId,
        emoji: String,
        user_id: UserId,
    },
    ReactionRemoved {
        message_id: MessageId,
        emoji: String,
        user_id: UserId,
    },
}

/// What a device sees for one chat event: a new message or an update to the chat.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatItem {
    Message(MessageView),
    Update(ChatUpdate),
}

/// Renders a stored chat event into what devices see. Sealed bodies render as unreadable: use
/// [`render_opened`] with the opened body for those.
pub fn render(event: &StoredEvent<ChatEvent>) -> ChatItem {
    render_opened(event, None)
}

/// Renders a stored chat event, given the plaintext of its sealed body (a v2 message or an
/// edit), or `None` when its message key is gone: the message was deleted, so it shows as
/// deleted with no body.
pub fn render_opened(event: &StoredEvent<ChatEvent>, opened: Option<&str>) -> ChatItem {
    let meta = &event.meta;
    let update = |change| {
        ChatItem::Update(ChatUpdate {
            change,
            actor: meta.actor,
            at: meta.time,
        })
    };
    match &event.event {
        ChatEvent::MessageSent(m) => ChatItem::Message(MessageView {
            message_id: m.message_id,
            sequence: meta.sequence,
            sender_id: m.sender_id,
            body: Some(m.body.clone()),
            reply_to: m.reply_to,
            attachments: Vec::new(),
            sent_at: meta.time,
            edited_at: None,
            deleted: false,
            reactions: BTreeMap::new(),
            thread_root: m.thread_root,
            thread_reply_count: 0,
            last_reply_at: None,
            mentions: m.mentions.clone(),
        }),
        ChatEvent::MessageSentV2(m) => ChatItem::Message(MessageView {
            message_id: m.message_id,
            sequence: meta.sequence,
            sender_id: m.sender_id,
            body: opened.map(str::to_owned),
            reply_to: m.reply_to,
            attachments: m
                .attachment_details
                .iter()
                .map(AttachmentView::from)
                .collect(),
            sent_at: meta.time,
            edited_at: None,
            deleted: opened.is_none(),
            reactions: BTreeMap::new(),
            thread_root: m.thread_root,
            thread_reply_count: 0,
            last_reply_at: None,
            mentions: m.mentions.clone(),
        }),
        ChatEvent::MessageEdited(e) => update(Change::MessageEdited {
            message_id: e.message_id,
            body: opened.map(str::to_owned),
        }),
        ChatEvent::MessageDeleted(d) => update(Change::MessageDeleted {
            message_id: d.message_id,
        }),
        ChatEvent::ReactionAdded(r) => update(Change::ReactionAdded {
            message_id: r.message_id,
            emoji: r.emoji.clone(),
            user_id: r.user_id,
        }),
        ChatEvent::ReactionRemoved(r) => update(Change::ReactionRemoved {
            message_id: r.message_id,
            emoji: r.emoji.clone(),
            user_id: r.user_id,
        }),
        ChatEvent::Created(c) => update(Change::Created {
            chat_kind: c.kind,
            title: c.title.clone(),
            members: c.members.clone(),
            visibility: c.visibility,
        }),
        ChatEvent::ParticipantsModified(p) => update(Change::ParticipantsModified {
            added: p.added.clone(),
            removed: p.removed.clone(),
            promoted: p.promoted.clone(),
        }),
        ChatEvent::TitleChanged(t) => update(Change::TitleChanged {
            title: t.title.clone(),
        }),
        ChatEvent::RoleChanged(r) => update(Change::RoleChanged {
            user_id: r.user_id,
            role: r.role,
        }),
    }
}

/// Frames the gateway sends.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub enum ServerFrame<'a> {
    #[serde(rename = "ready")]
    Ready {
        user_id: UserId,
        device_id: DeviceId,
    },
    #[serde(rename = "newMessage")]
    NewMessage {
        chat_id: ChatId,
        sequence: u64,
        message: &'a MessageView,
    },
    #[serde(rename = "chatUpdate")]
    ChatUpdate {
        chat_id: ChatId,
        sequence: u64,
        update: &'a ChatUpdate,
    },
    /// A member's delivered or read watermark moved (sent to the chat's other members).
    #[serde(rename = "receipt")]
    Receipt {
        chat_id: ChatId,
        user_id: UserId,
        #[serde(skip_serializing_if = "Option::is_none")]
        delivered_up_to: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        read_up_to: Option<u64>,
    },
    /// A user who shares a DM or group with the device's user went online or offline.
    #[serde(rename = "presence")]
    Presence {
        user_id: UserId,
        online: bool,
        last_seen_at: Option<DateTime<Utc>>,
    },
    /// Another member is typing in a chat (never stored).
    #[serde(rename = "typing")]
    Typing { chat_id: ChatId, user_id: UserId },
    #[serde(rename = "pong")]
    Pong,
    #[serde(rename = "error")]
    Error { code: &'static str, detail: String },
}

impl ServerFrame<'_> {
    pub fn for_item(chat_id: ChatId, sequence: u64, item: &ChatItem) -> ServerFrame<'_> {
        match item {
            ChatItem::Message(message) => ServerFrame::NewMessage {
                chat_id,
                sequence,
                message,
            },
            ChatItem::Update(update) => ServerFrame::ChatUpdate {
                chat_id,
                sequence,
                update,
            },
        }
    }

    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(frame: &ServerFrame<'_>) -> serde_json::Value {
        serde_json::from_str(&frame.to_json()).unwrap_or_default()
    }

    #[test]
    fn a_receipt_frame_names_only_the_watermarks_that_moved() {
        let (chat_id, user_id) = (ChatId::new(), UserId::new());
        let delivered = ServerFrame::Receipt {
            chat_id,
            user_id,
            delivered_up_to: Some(7),
            read_up_to: None,
        };
        assert_eq!(
            json(&delivered),
            serde_json::json!({"type": "receipt", "chat_id": chat_id, "user_id": user_id, "delivered_up_to": 7})
        );
    }

    #[test]
    fn presence_and_typing_frames_have_the_documented_shape() {
        let user_id = UserId::new();
        let presence = ServerFrame::Presence {
            user_id,
            online: false,
            last_seen_at: None,
        };
        assert_eq!(
            json(&presence),
            serde_json::json!({"type": "presence", "user_id": user_id, "online": false, "last_seen_at": null})
        );
        let chat_id = ChatId::new();
        assert_eq!(
            json(&ServerFrame::Typing { chat_id, user_id }),
            serde_json::json!({"type": "typing", "chat_id": chat_id, "user_id": user_id})
        );
    }
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum ClientFrame {
    #[serde(rename = "auth")]
    Auth { token: String },
    #[serde(rename = "ack")]
    Ack { chat_id: ChatId, sequence: u64 },
    #[serde(rename = "typing")]
    Typing { chat_id: ChatId },
    #[serde(rename = "ping")]
    Ping,
}
