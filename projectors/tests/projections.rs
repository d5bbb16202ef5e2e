//! The projections against a real PostgreSQL: effects and per-aggregate checkpoint commit
//! together, redelivery changes nothing, and an event ahead of its predecessor waits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use parley_nats::MessageKeys;
use parley_nats::receipts::WatermarkMoved;
use parley_nats::subjects::{live_receipts, notify_user};
use parley_projectors::runner::{Delivered, Disposition};
use parley_projectors::{chats, receipts, users};
use parley_schemas::cloudevent::{EventMeta, encode};
use parley_schemas::events::{
    ChatCreated, Delivered as DeliveredReceipt, DeliveredBatch, DeviceAdded, MemberRole,
    MessageSent, ParticipantsModified, Read as ReadReceipt, RoleChanged, TitleChanged,
    UserRegistered,
};
use parley_schemas::{
    ChatEvent, ChatId, ChatKind, DeviceId, EventId, MessageId, ReceiptEvent, Role, UserId,
};
use parley_test_support::TestStack;
use sqlx::PgPool;

const DELAY: Duration = Duration::from_millis(50);

struct Chat {
    id: ChatId,
    admin: UserId,
    seq: u64,
    stream_seq: u64,
}

impl Chat {
    fn new() -> Self {
        Self {
            id: ChatId::new(),
            admin: UserId::new(),
            seq: 0,
            stream_seq: 0,
        }
    }
    fn next(&mut self, event: ChatEvent) -> Delivered {
        self.seq += 1;
        self.stream_seq += 1;
        let meta = EventMeta {
            id: EventId::new(),
            subject: self.id.to_string(),
            time: chrono::Utc::now(),
            sequence: self.seq,
            actor: self.admin,
        };
        Delivered {
            stream_seq: self.stream_seq,
            payload: encode(&meta, &event).into(),
        }
    }
    fn created(&mut self, others: &[UserId]) -> Delivered {
        self.created_as(ChatKind::Group, others)
    }
    fn created_as(&mut self, kind: ChatKind, others: &[UserId]) -> Delivered {
        let mut members = vec![MemberRole {
            user_id: self.admin,
            role: Role::Admin,
        }];
        members.extend(others.iter().map(|u| MemberRole {
            user_id: *u,
            role: Role::Member,
        }));
        self.next(ChatEvent::Created(ChatCreated {
            chat_id: self.id,
            kind,
            title: Some("t".into()),
            members,
            visibility: Default::default(),
        }))
    }
    fn message(&mut self, body: &str) -> Delivered {
        self.next(ChatEvent::MessageSent(MessageSent {
            message_id: MessageId::new(),
            sender_id: self.admin,
            body: body.into(),
            reply_to: None,
            attachments: vec![],
            thread_root: None,
            mentions: vec![],
        }))
    }
}

/// A fresh database and a private NATS (for the message keys the projection opens bodies with).
async fn db() -> (TestStack, PgPool, MessageKeys) {
    let stack = TestStack::start().await;
    let pool = stack.infra.pg.clone();
    let keys = MessageKeys::new(
        stack.infra.buckets.message_keys.clone(),
        stack.infra.js.clone(),
    );
    (stack, pool, keys)
}

fn copy(d: &Delivered) -> Delivered {
    Delivered {
        stream_seq: d.stream_seq,
        payload: d.payload.clone(),
    }
}

async fn snapshot(pg: &PgPool) -> (Vec<(i64, String)>, Vec<(i64,)>, i64) {
    let msgs = sqlx::query_as("SELECT sequence, body FROM messages ORDER BY chat_id, sequence")
        .fetch_all(pg)
        .await
        .unwrap();
    let chats = sqlx::query_as("SELECT last_sequence FROM chats ORDER BY chat_id")
        .fetch_all(pg)
        .await
        .unwrap();
    let updates: (i64,) = sqlx::query_as("SELECT count(*) FROM chat_updates")
        .fetch_one(pg)
        .await
        .unwrap();
    (msgs, chats, updates.0)
}

#[tokio::test]
async fn a_batch_applies_messages_members_and_the_chat_checkpoint_together() {
    let (_db, pg, keys) = db().await;
    let bob = UserId::new();
    let mut chat = Chat::new();
    let batch = vec![
        chat.created(&[bob]),
        chat.message("one"),
        chat.message("two"),
    ];
    let out = chats::apply(&pg, &keys, batch, DELAY).await.unwrap();
    assert_eq!(out, vec![Disposition::Ack; 3]);
    let (msgs, chats_rows, updates) = snapshot(&pg).await;
    assert_eq!(msgs, vec![(2, "one".to_owned()), (3, "two".to_owned())]);
    assert_eq!(chats_rows, vec![(3,)]);
    assert_eq!(updates, 1);
    let members: Vec<(uuid::Uuid, String, i64)> =
        sqlx::query_as("SELECT user_id, role, joined_seq FROM members ORDER BY role")
            .fetch_all(&pg)
            .await
            .unwrap();
    assert_eq!(members.len(), 2);
    assert_eq!(members[0].1, "admin");
    let (last_msg,): (Option<i64>,) = sqlx::query_as("SELECT last_message_seq FROM chats")
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(last_msg, Some(3));
}

#[tokio::test]
async fn redelivering_an_applied_batch_changes_nothing() {
    let (_db, pg, keys) = db().await;
    let mut chat = Chat::new();
    let batch = vec![chat.created(&[]), chat.message("one"), chat.message("two")];
    let again: Vec<Delivered> = batch.iter().map(copy).collect();
    chats::apply(&pg, &keys, batch, DELAY).await.unwrap();
    let before = snapshot(&pg).await;
    let out = chats::apply(&pg, &keys, again, DELAY).await.unwrap();
    assert_eq!(
        out,
        vec![Disposition::Ack; 3],
        "already applied events are acked, not reapplied"
    );
    assert_eq!(snapshot(&pg).await, before);
}

#[tokio::test]
async fn an_event_ahead_of_a_missing_predecessor_waits_and_applies_once_the_gap_fills() {
    let (_db, pg, keys) = db().await;
    let mut chat = Chat::new();
    let created = chat.created(&[]);
    let one = chat.message("one");
    let two = chat.message("two");
    chats::apply(&pg, &keys, vec![created], DELAY)
        .await
        .unwrap();
    let out = chats::apply(&pg, &keys, vec![copy(&two)], DELAY)
        .await
        .unwrap();
    assert_eq!(out, vec![Disposition::Retry(DELAY)]);
    assert_eq!(snapshot(&pg).await.1, vec![(1,)], "nothing skipped ahead");
    let out = chats::apply(&pg, &keys, vec![one, two], DELAY)
        .await
        .unwrap();
    assert_eq!(out, vec![Disposition::Ack, Disposition::Ack]);
    assert_eq!(snapshot(&pg).await.1, vec![(3,)]);
}

#[tokio::test]
async fn undecodable_events_are_terminated_without_blocking_the_batch() {
    let (_db, pg, keys) = db().await;
    let mut chat = Chat::new();
    let created = chat.created(&[]);
    let junk = Delivered {
        stream_seq: 99,
        payload: bytes::Bytes::from_static(b"{\"nope\":1}"),
    };
    let out = chats::apply(&pg, &keys, vec![created, junk], DELAY)
        .await
        .unwrap();
    assert_eq!(out, vec![Disposition::Ack, Disposition::Term]);
}

#[tokio::test]
async fn leaving_and_rejoining_moves_the_membership_window() {
    let (_db, pg, keys) = db().await;
    let bob = UserId::new();
    let mut chat = Chat::new();
    let modify = |added: Vec<UserId>, removed: Vec<UserId>| {
        ChatEvent::ParticipantsModified(ParticipantsModified {
            added,
            removed,
            promoted: vec![],
        })
    };
    let batch = vec![
        chat.created(&[bob]),
        chat.next(modify(vec![], vec![bob])),
        chat.message("while away"),
        chat.next(modify(vec![bob], vec![])),
    ];
    chats::apply(&pg, &keys, batch, DELAY).await.unwrap();
    let (joined, left): (i64, Option<i64>) =
        sqlx::query_as("SELECT joined_seq, left_seq FROM members WHERE user_id = $1")
            .bind(bob.as_uuid())
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!((joined, left), (4, None));
}

#[tokio::test]
async fn thread_replies_count_on_their_root_once_even_when_redelivered_and_in_the_root_batch() {
    let (_db, pg, keys) = db().await;
    let bob = UserId::new();
    let mut chat = Chat::new();
    let root = MessageId::new();
    let reply = |chat: &mut Chat, body: &str| {
        chat.next(ChatEvent::MessageSent(MessageSent {
            message_id: MessageId::new(),
            sender_id: bob,
            body: body.into(),
            reply_to: None,
            attachments: vec![],
            thread_root: Some(root),
            mentions: vec![bob],
        }))
    };
    let created = chat.created(&[bob]);
    let root_event = chat.next(ChatEvent::MessageSent(MessageSent {
        message_id: root,
        sender_id: chat.admin,
        body: "root".into(),
        reply_to: None,
        attachments: vec![],
        thread_root: None,
        mentions: vec![],
    }));
    let first = reply(&mut chat, "first");
    let second = reply(&mut chat, "second");
    // The root and its first reply in one batch, the second reply alone, then all again.
    let again = vec![
        copy(&created),
        copy(&root_event),
        copy(&first),
        copy(&second),
    ];
    chats::apply(&pg, &keys, vec![created, root_event, first], DELAY)
        .await
        .unwrap();
    chats::apply(&pg, &keys, vec![second], DELAY).await.unwrap();
    chats::apply(&pg, &keys, again, DELAY).await.unwrap();
    let (count, last): (i64, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
        "SELECT thread_reply_count, last_reply_at FROM messages WHERE message_id = $1",
    )
    .bind(root.as_uuid())
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(count, 2);
    assert!(last.is_some());
    let replies: Vec<(Option<uuid::Uuid>, Vec<uuid::Uuid>)> = sqlx::query_as(
        "SELECT thread_root, mentions FROM messages WHERE thread_root IS NOT NULL ORDER BY sequence",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    assert_eq!(
        replies,
        vec![(Some(*root.as_uuid()), vec![*bob.as_uuid()]); 2]
    );
}

#[tokio::test]
async fn title_and_role_changes_update_the_chat_and_member_and_become_chat_updates() {
    let (_db, pg, keys) = db().await;
    let bob = UserId::new();
    let mut chat = Chat::new();
    let batch = vec![
        chat.created(&[bob]),
        chat.next(ChatEvent::TitleChanged(TitleChanged {
            title: "renamed".into(),
        })),
        chat.next(ChatEvent::RoleChanged(RoleChanged {
            user_id: bob,
            role: Role::Admin,
        })),
    ];
    let out = chats::apply(&pg, &keys, batch, DELAY).await.unwrap();
    assert_eq!(out, vec![Disposition::Ack; 3]);
    let (title,): (Option<String>,) = sqlx::query_as("SELECT title FROM chats")
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(title.as_deref(), Some("renamed"));
    let (role,): (String,) = sqlx::query_as("SELECT role FROM members WHERE user_id = $1")
        .bind(bob.as_uuid())
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(role, "admin");
    let kinds: Vec<(String,)> =
        sqlx::query_as("SELECT \"update\"->>'kind' FROM chat_updates ORDER BY sequence")
            .fetch_all(&pg)
            .await
            .unwrap();
    assert_eq!(
        kinds,
        vec![
            ("created".to_owned(),),
            ("title_changed".to_owned(),),
            ("role_changed".to_owned(),)
        ]
    );
}

#[tokio::test]
async fn sealed_messages_open_edit_react_and_a_deletion_in_the_same_batch_leaves_no_body() {
    use parley_nats::message_keys::seal;
    use parley_schemas::events::{
        AttachmentRef, MessageDeleted, MessageEdited, MessageSentV2, Reaction,
    };

    let (_db, pg, keys) = db().await;
    let mut chat = Chat::new();
    let (kept, gone) = (MessageId::new(), MessageId::new());
    let sent = |chat: &mut Chat, id: MessageId, key: &parley_nats::MessageKey, body: &str| {
        let sealed_body = seal(key, chat.id, id, body);
        let file = AttachmentRef {
            attachment_id: parley_schemas::AttachmentId::new(),
            content_type: "image/png".into(),
            size: 12,
            filename: Some(format!("{body}.png")),
            sha256: "ab".repeat(32),
        };
        chat.next(ChatEvent::MessageSentV2(MessageSentV2 {
            message_id: id,
            sender_id: chat.admin,
            sealed_body,
            reply_to: None,
            attachments: vec![file.attachment_id],
            thread_root: None,
            mentions: vec![],
            attachment_details: vec![file],
        }))
    };
    let kept_key = keys.create(chat.id, kept).await.unwrap();
    let gone_key = keys.create(chat.id, gone).await.unwrap();
    let reaction = |chat: &Chat, id| Reaction {
        message_id: id,
        emoji: "👍".into(),
        user_id: chat.admin,
    };
    let created = chat.created(&[]);
    let m1 = sent(&mut chat, kept, &kept_key, "kept words");
    let m2 = sent(&mut chat, gone, &gone_key, "secret words");
    let edit = MessageEdited {
        message_id: gone,
        sealed_body: seal(&gone_key, chat.id, gone, "secret edit"),
    };
    let batch = vec![
        created,
        m1,
        m2,
        chat.next(ChatEvent::MessageEdited(edit)),
        chat.next(ChatEvent::ReactionAdded(reaction(&chat, kept))),
        chat.next(ChatEvent::ReactionAdded(reaction(&chat, gone))),
        chat.next(ChatEvent::MessageDeleted(MessageDeleted {
            message_id: gone,
        })),
    ];
    let out = chats::apply(&pg, &keys, batch, DELAY).await.unwrap();
    assert_eq!(out, vec![Disposition::Ack; 7]);

    let msgs: Vec<(i64, Option<String>, bool)> =
        sqlx::query_as("SELECT sequence, body, deleted FROM messages ORDER BY sequence")
            .fetch_all(&pg)
            .await
            .unwrap();
    assert_eq!(
        msgs,
        vec![(2, Some("kept words".into()), false), (3, None, true)]
    );
    // History shows each attachment's metadata; a deleted message carries none any more.
    let files: Vec<(serde_json::Value,)> =
        sqlx::query_as("SELECT attachments FROM messages ORDER BY sequence")
            .fetch_all(&pg)
            .await
            .unwrap();
    assert_eq!(files[0].0[0]["filename"], "kept words.png");
    assert_eq!(files[0].0[0]["content_type"], "image/png");
    assert_eq!(files[0].0[0]["size"], 12);
    assert_eq!(files[1].0, serde_json::json!([]));
    let reactions: Vec<(uuid::Uuid,)> = sqlx::query_as("SELECT message_id FROM reactions")
        .fetch_all(&pg)
        .await
        .unwrap();
    assert_eq!(reactions, vec![(*kept.as_uuid(),)]);
    // History reads each message's summary: the kept message's reactor, none on the deleted.
    let summaries: Vec<(Option<serde_json::Value>,)> =
        sqlx::query_as("SELECT reactions FROM messages ORDER BY sequence")
            .fetch_all(&pg)
            .await
            .unwrap();
    assert_eq!(
        summaries,
        vec![(Some(serde_json::json!({ "👍": [chat.admin] })),), (None,)]
    );
    let traces: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM message_edits) + \
                (SELECT count(*) FROM chat_updates u WHERE u::text LIKE '%secret%')",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(traces, 0, "no edit history nor edited body left");
    assert!(
        keys.get(chat.id, gone).await.unwrap().is_none(),
        "the projector destroyed the key"
    );
    assert!(keys.get(chat.id, kept).await.unwrap().is_some());
}

#[tokio::test]
async fn a_backlog_batch_opens_every_body_with_keys_this_process_never_held() {
    use parley_nats::message_keys::seal;
    use parley_schemas::events::MessageSentV2;

    let (stack, pg, _) = db().await;
    // The keys were made by another process (the command-api): this projector's cache is
    // empty, so the batch reads them from the bucket, more than `BULK_READ_MIN` of them, which
    // takes the scan. Whether the scan or the reads one by one find a key, every body must
    // open; that the scan itself finds them is `nats/tests/message_keys.rs`'s to show.
    let sender = MessageKeys::new(
        stack.infra.buckets.message_keys.clone(),
        stack.infra.js.clone(),
    );
    let mut chat = Chat::new();
    let mut batch = vec![chat.created(&[])];
    let n = parley_nats::message_keys::BULK_READ_MIN * 2;
    for i in 0..n {
        let message_id = MessageId::new();
        let key = sender.create(chat.id, message_id).await.unwrap();
        batch.push(chat.next(ChatEvent::MessageSentV2(MessageSentV2 {
            message_id,
            sender_id: chat.admin,
            sealed_body: seal(&key, chat.id, message_id, &format!("body {i}")),
            reply_to: None,
            attachments: vec![],
            thread_root: None,
            mentions: vec![],
            attachment_details: vec![],
        })));
    }
    let projector = MessageKeys::new(
        stack.infra.buckets.message_keys.clone(),
        stack.infra.js.clone(),
    );
    let out = chats::apply(&pg, &projector, batch, DELAY).await.unwrap();
    assert_eq!(out, vec![Disposition::Ack; n + 1]);
    let bodies: Vec<(Option<String>,)> =
        sqlx::query_as("SELECT body FROM messages ORDER BY sequence")
            .fetch_all(&pg)
            .await
            .unwrap();
    let expected: Vec<(Option<String>,)> = (0..n).map(|i| (Some(format!("body {i}")),)).collect();
    assert_eq!(bodies, expected);
}

/// The events of one user, with the times the test gives them.
struct User {
    id: UserId,
    seq: u64,
}

impl User {
    fn event(&mut self, event: parley_schemas::UserEvent, time: DateTime<Utc>) -> Delivered {
        self.seq += 1;
        let meta = EventMeta {
            id: EventId::new(),
            subject: self.id.to_string(),
            time,
            sequence: self.seq,
            actor: self.id,
        };
        Delivered {
            stream_seq: self.seq,
            payload: encode(&meta, &event).into(),
        }
    }
    fn device_added(&mut self, device: DeviceId, time: DateTime<Utc>) -> Delivered {
        self.event(
            parley_schemas::UserEvent::DeviceAdded(DeviceAdded {
                device_id: device,
                device_name: "phone".into(),
                platform: None,
            }),
            time,
        )
    }
    fn registered(handle: &str) -> (Self, Delivered) {
        let mut user = User {
            id: UserId::new(),
            seq: 0,
        };
        let event = user.event(
            parley_schemas::UserEvent::Registered(UserRegistered {
                user_id: user.id,
                handle: handle.into(),
                display_name: handle.into(),
            }),
            Utc::now(),
        );
        (user, event)
    }
}

/// The stored cursor row of `device` in `chat`, if any.
async fn cursor_row(pg: &PgPool, device: DeviceId, chat: ChatId) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT acked_up_to FROM device_cursors WHERE device_id = $1 AND chat_id = $2",
    )
    .bind(device.as_uuid())
    .bind(chat.as_uuid())
    .fetch_optional(pg)
    .await
    .unwrap()
}

/// The cursor every reader uses: the row, or the membership's start when there is none (as the
/// gateway's inbox query reads it).
async fn effective_cursor(pg: &PgPool, device: DeviceId, chat: ChatId) -> i64 {
    sqlx::query_scalar(
        "SELECT GREATEST(COALESCE(d.acked_up_to, 0), m.joined_seq - 1) \
         FROM members m JOIN devices v ON v.user_id = m.user_id AND v.device_id = $1 \
         LEFT JOIN device_cursors d ON d.device_id = $1 AND d.chat_id = m.chat_id \
         WHERE m.chat_id = $2",
    )
    .bind(device.as_uuid())
    .bind(chat.as_uuid())
    .fetch_one(pg)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_new_devices_cursor_starts_at_the_chat_as_of_its_addition_whichever_projection_runs_first()
 {
    let (_db, pg, keys) = db().await;
    let (mut bob, registered) = User::registered("bob");
    users::apply(&pg, vec![registered], DELAY).await.unwrap();

    // Devices added before the chat, between its events, and after them; the users projection
    // applies all three only once the chats projection holds the whole chat.
    let early = (DeviceId::new(), Utc::now());
    let mut chat = Chat::new();
    let created = chat.created(&[bob.id]);
    let first = chat.message("one");
    let middle = (DeviceId::new(), Utc::now());
    let second = chat.message("two");
    let late = (DeviceId::new(), Utc::now());
    chats::apply(&pg, &keys, vec![created, first, second], DELAY)
        .await
        .unwrap();
    let added: Vec<Delivered> = [early, middle, late]
        .iter()
        .map(|(d, t)| bob.device_added(*d, *t))
        .collect();
    assert_eq!(
        users::apply(&pg, added, DELAY).await.unwrap(),
        vec![Disposition::Ack; 3]
    );

    assert_eq!(
        effective_cursor(&pg, early.0, chat.id).await,
        0,
        "added before the chat: gets all of it"
    );
    assert_eq!(
        cursor_row(&pg, early.0, chat.id).await,
        None,
        "the membership's start is the default, not a stored row"
    );
    assert_eq!(
        cursor_row(&pg, middle.0, chat.id).await,
        Some(2),
        "added after message one"
    );
    assert_eq!(
        cursor_row(&pg, late.0, chat.id).await,
        Some(3),
        "added after everything"
    );
}

#[tokio::test]
async fn a_device_added_just_before_a_chat_leaves_the_same_rows_in_either_projection_order() {
    let (_db, pg, keys) = db().await;
    let (mut ann, ann_registered) = User::registered("ann");
    let (mut bob, bob_registered) = User::registered("bob");
    users::apply(&pg, vec![ann_registered, bob_registered], DELAY)
        .await
        .unwrap();
    let (ann_phone, bob_phone) = (DeviceId::new(), DeviceId::new());
    let ann_added = ann.device_added(ann_phone, Utc::now());
    let bob_added = bob.device_added(bob_phone, Utc::now());
    let (mut ann_chat, mut bob_chat) = (Chat::new(), Chat::new());
    let ann_created = ann_chat.created(&[ann.id]);
    let bob_created = bob_chat.created(&[bob.id]);

    // Ann's device reaches the users projection before her chat reaches the chats projection
    // (as a rebuild, merging by time, applies them); Bob's arrives after his chat.
    users::apply(&pg, vec![ann_added], DELAY).await.unwrap();
    chats::apply(&pg, &keys, vec![ann_created, bob_created], DELAY)
        .await
        .unwrap();
    users::apply(&pg, vec![bob_added], DELAY).await.unwrap();

    assert_eq!(cursor_row(&pg, ann_phone, ann_chat.id).await, None);
    assert_eq!(
        cursor_row(&pg, bob_phone, bob_chat.id).await,
        None,
        "the order the projections ran in leaves no trace in the table"
    );
    assert_eq!(effective_cursor(&pg, ann_phone, ann_chat.id).await, 0);
    assert_eq!(effective_cursor(&pg, bob_phone, bob_chat.id).await, 0);
}

/// A receipt on `chat`'s `RECEIPTS` subject, at stream position `stream_seq`.
fn receipt(chat: ChatId, stream_seq: u64, actor: UserId, event: ReceiptEvent) -> Delivered {
    let meta = EventMeta {
        id: EventId::new(),
        subject: chat.to_string(),
        time: chrono::Utc::now(),
        sequence: stream_seq,
        actor,
    };
    Delivered {
        stream_seq,
        payload: encode(&meta, &event).into(),
    }
}

#[tokio::test]
async fn a_receipt_batch_keeps_the_highest_watermark_per_member_and_announces_each_move_once() {
    let (stack, pg, keys) = db().await;
    let (bob, cy) = (UserId::new(), UserId::new());
    let mut chat = Chat::new();
    let mut events = vec![chat.created(&[bob, cy])];
    events.extend((0..6).map(|i| chat.message(&format!("m{i}"))));
    chats::apply(&pg, &keys, events, DELAY).await.unwrap();
    // Cy has already delivered everything: nothing in the batch moves her.
    sqlx::query("UPDATE members SET delivered_up_to = 7 WHERE user_id = $1")
        .bind(cy.as_uuid())
        .execute(&pg)
        .await
        .unwrap();
    let mut notices = receipt_notices(&stack, chat.id).await;

    let (phone, laptop) = (DeviceId::new(), DeviceId::new());
    let delivered = |device: DeviceId, user: UserId, up_to: u64| {
        ReceiptEvent::Delivered(DeliveredReceipt {
            user_id: user,
            device_id: device,
            up_to,
        })
    };
    let read = |user: UserId, up_to: u64| {
        ReceiptEvent::Read(ReadReceipt {
            user_id: user,
            up_to,
        })
    };
    // Out of order within the batch, two devices of one user, and a stale ack.
    let batch = vec![
        receipt(chat.id, 1, bob, delivered(phone, bob, 5)),
        receipt(chat.id, 2, bob, delivered(laptop, bob, 3)),
        receipt(chat.id, 3, bob, delivered(phone, bob, 4)),
        receipt(chat.id, 4, bob, read(bob, 2)),
        receipt(chat.id, 5, bob, read(bob, 4)),
        receipt(chat.id, 6, cy, delivered(DeviceId::new(), cy, 6)),
    ];
    let out = receipts::apply(&pg, &immediate(&stack), batch)
        .await
        .unwrap();
    assert_eq!(out, vec![Disposition::Ack; 6]);

    let cursors: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT device_id, acked_up_to FROM device_cursors WHERE chat_id = $1")
            .bind(chat.id.as_uuid())
            .fetch_all(&pg)
            .await
            .unwrap();
    assert!(cursors.contains(&(*phone.as_uuid(), 5)), "{cursors:?}");
    assert!(cursors.contains(&(*laptop.as_uuid(), 3)), "{cursors:?}");
    let watermarks: Vec<(uuid::Uuid, i64, i64)> = sqlx::query_as(
        "SELECT user_id, delivered_up_to, read_up_to FROM members WHERE chat_id = $1 AND user_id <> $2",
    )
    .bind(chat.id.as_uuid())
    .bind(chat.admin.as_uuid())
    .fetch_all(&pg)
    .await
    .unwrap();
    assert!(
        watermarks.contains(&(*bob.as_uuid(), 5, 4)),
        "{watermarks:?}"
    );
    assert!(
        watermarks.contains(&(*cy.as_uuid(), 7, 0)),
        "{watermarks:?}"
    );

    // One notice, for Bob, with both highest watermarks; none for Cy, who did not move.
    let moved: WatermarkMoved = next_notice(&mut notices).await;
    assert_eq!(
        moved,
        WatermarkMoved {
            chat_id: chat.id,
            user_id: bob,
            delivered_up_to: Some(5),
            read_up_to: Some(4),
        }
    );
    // Nothing after it: a marker published now is the next message on the subject.
    next_is_marker(&stack, live_receipts(chat.id), &mut notices, "marker").await;

    // Redelivering the batch moves nothing and announces nothing.
    let again = vec![receipt(chat.id, 1, bob, delivered(phone, bob, 5))];
    receipts::apply(&pg, &immediate(&stack), again)
        .await
        .unwrap();
    next_is_marker(&stack, live_receipts(chat.id), &mut notices, "marker 2").await;
}

#[tokio::test]
async fn a_channel_keeps_its_members_watermarks_but_announces_no_moves() {
    let (stack, pg, keys) = db().await;
    let bob = UserId::new();
    let mut chat = Chat::new();
    let mut events = vec![chat.created_as(ChatKind::Channel, &[bob])];
    events.extend((0..3).map(|i| chat.message(&format!("m{i}"))));
    chats::apply(&pg, &keys, events, DELAY).await.unwrap();
    let mut notices = receipt_notices(&stack, chat.id).await;

    let batch = vec![
        receipt(
            chat.id,
            1,
            bob,
            ReceiptEvent::Delivered(DeliveredReceipt {
                user_id: bob,
                device_id: DeviceId::new(),
                up_to: 4,
            }),
        ),
        receipt(
            chat.id,
            2,
            bob,
            ReceiptEvent::Read(ReadReceipt {
                user_id: bob,
                up_to: 3,
            }),
        ),
    ];
    let out = receipts::apply(&pg, &immediate(&stack), batch)
        .await
        .unwrap();
    assert_eq!(out, vec![Disposition::Ack; 2]);
    let watermark: (i64, i64) = sqlx::query_as(
        "SELECT delivered_up_to, read_up_to FROM members WHERE chat_id = $1 AND user_id = $2",
    )
    .bind(chat.id.as_uuid())
    .bind(bob.as_uuid())
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(watermark, (4, 3));
    // Moved, yet nothing announced: the marker is the first message on the subject.
    next_is_marker(&stack, live_receipts(chat.id), &mut notices, "marker").await;
}

/// Publishes `marker` on `subject` and asserts it is the next message there: nothing was
/// announced in between.
async fn next_is_marker(
    stack: &TestStack,
    subject: String,
    notices: &mut async_nats::Subscriber,
    marker: &'static str,
) {
    stack
        .infra
        .nats
        .publish(subject, marker.into())
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), notices.next())
        .await
        .expect("the marker within 5 s")
        .unwrap();
    assert_eq!(&next.payload[..], marker.as_bytes());
}

#[tokio::test]
async fn a_receipt_ahead_of_its_membership_waits_for_it_instead_of_being_lost() {
    let (_stack, pg, keys) = db().await;
    let bob = UserId::new();
    let mut chat = Chat::new();
    let created = chat.created(&[bob]);
    let message = chat.message("one");
    let read = || {
        receipt(
            chat.id,
            1,
            bob,
            ReceiptEvent::Read(ReadReceipt {
                user_id: bob,
                up_to: 2,
            }),
        )
    };
    // The receipts projection gets there before the chats projection has the chat.
    let early = receipts::apply_quietly(&pg, vec![read()]).await.unwrap();
    assert!(
        matches!(early[..], [Disposition::Retry(_)]),
        "a receipt for a membership not projected yet waits: {early:?}"
    );
    chats::apply(&pg, &keys, vec![created, message], DELAY)
        .await
        .unwrap();
    let again = receipts::apply_quietly(&pg, vec![read()]).await.unwrap();
    assert_eq!(again, vec![Disposition::Ack]);
    let read_up_to: i64 =
        sqlx::query_scalar("SELECT read_up_to FROM members WHERE chat_id = $1 AND user_id = $2")
            .bind(chat.id.as_uuid())
            .bind(bob.as_uuid())
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!(read_up_to, 2, "the read watermark is kept, not lost");
}

/// A gateway flush's one event for the chat: every device in it moves its cursor and its
/// member's watermark, and each member that moved is announced once.
#[tokio::test]
async fn a_delivered_batch_moves_every_device_and_member_it_holds() {
    let (stack, pg, keys) = db().await;
    let (bob, cy, dee) = (UserId::new(), UserId::new(), UserId::new());
    let mut chat = Chat::new();
    let mut events = vec![chat.created(&[bob, cy, dee])];
    events.extend((0..4).map(|i| chat.message(&format!("m{i}"))));
    chats::apply(&pg, &keys, events, DELAY).await.unwrap();
    let mut notices = receipt_notices(&stack, chat.id).await;

    let (bob_phone, bob_laptop, cy_phone) = (DeviceId::new(), DeviceId::new(), DeviceId::new());
    let entry = |user_id, device_id, up_to| DeliveredReceipt {
        user_id,
        device_id,
        up_to,
    };
    let batch = ReceiptEvent::DeliveredBatch(DeliveredBatch {
        receipts: vec![
            entry(bob, bob_phone, 5),
            entry(bob, bob_laptop, 3),
            entry(cy, cy_phone, 4),
        ],
    });
    let out = receipts::apply(
        &pg,
        &immediate(&stack),
        vec![receipt(
            chat.id,
            1,
            parley_schemas::events::SYSTEM_ACTOR,
            batch,
        )],
    )
    .await
    .unwrap();
    assert_eq!(out, vec![Disposition::Ack]);

    let mut cursors: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT device_id, acked_up_to FROM device_cursors WHERE chat_id = $1")
            .bind(chat.id.as_uuid())
            .fetch_all(&pg)
            .await
            .unwrap();
    cursors.sort();
    let mut want = vec![
        (*bob_phone.as_uuid(), 5),
        (*bob_laptop.as_uuid(), 3),
        (*cy_phone.as_uuid(), 4),
    ];
    want.sort();
    assert_eq!(cursors, want);
    let delivered = |user: UserId| {
        sqlx::query_scalar::<_, i64>(
            "SELECT delivered_up_to FROM members WHERE chat_id = $1 AND user_id = $2",
        )
        .bind(*chat.id.as_uuid())
        .bind(*user.as_uuid())
        .fetch_one(&pg)
    };
    assert_eq!(delivered(bob).await.unwrap(), 5, "a user's highest device");
    assert_eq!(delivered(cy).await.unwrap(), 4);
    assert_eq!(delivered(dee).await.unwrap(), 0, "not in the batch");

    // One notice per member that moved (in member order), none for Dee.
    let mut moved = Vec::new();
    for _ in 0..2 {
        let m: WatermarkMoved = next_notice(&mut notices).await;
        moved.push((m.user_id, m.delivered_up_to, m.read_up_to));
    }
    moved.sort();
    let mut want = vec![(bob, Some(5), None), (cy, Some(4), None)];
    want.sort();
    assert_eq!(moved, want);
    next_is_marker(&stack, live_receipts(chat.id), &mut notices, "marker").await;
}

#[tokio::test]
async fn a_delivered_batch_with_a_member_not_projected_yet_waits_whole() {
    let (_stack, pg, keys) = db().await;
    let (bob, cy) = (UserId::new(), UserId::new());
    let mut chat = Chat::new();
    let mut events = vec![chat.created(&[bob])];
    events.push(chat.message("one"));
    chats::apply(&pg, &keys, events, DELAY).await.unwrap();
    let chat_id = chat.id;
    let batch = || {
        receipt(
            chat_id,
            1,
            parley_schemas::events::SYSTEM_ACTOR,
            ReceiptEvent::DeliveredBatch(DeliveredBatch {
                receipts: vec![
                    DeliveredReceipt {
                        user_id: bob,
                        device_id: DeviceId::new(),
                        up_to: 2,
                    },
                    DeliveredReceipt {
                        user_id: cy,
                        device_id: DeviceId::new(),
                        up_to: 2,
                    },
                ],
            }),
        )
    };
    // Cy's membership is not projected yet.
    let early = receipts::apply_quietly(&pg, vec![batch()]).await.unwrap();
    assert!(matches!(early[..], [Disposition::Retry(_)]), "{early:?}");
    let added = chat.next(ChatEvent::ParticipantsModified(ParticipantsModified {
        added: vec![cy],
        removed: vec![],
        promoted: vec![],
    }));
    chats::apply(&pg, &keys, vec![added], DELAY).await.unwrap();
    let again = receipts::apply_quietly(&pg, vec![batch()]).await.unwrap();
    assert_eq!(again, vec![Disposition::Ack]);
    let up_to: Vec<i64> = sqlx::query_scalar(
        "SELECT delivered_up_to FROM members WHERE chat_id = $1 AND user_id = ANY($2) ORDER BY 1",
    )
    .bind(chat.id.as_uuid())
    .bind(vec![*bob.as_uuid(), *cy.as_uuid()])
    .fetch_all(&pg)
    .await
    .unwrap();
    assert_eq!(
        up_to,
        vec![2, 2],
        "both members' watermarks, once both are members"
    );
}

/// A busy chat's moves after its first are merged over the interval, each member's highest
/// once; another chat is not held up by it; at shutdown the announcer stops.
#[tokio::test]
async fn a_chats_receipt_notices_are_merged_over_the_interval_after_its_first() {
    let (stack, pg, keys) = db().await;
    let (bob, cy) = (UserId::new(), UserId::new());
    let mut chat = Chat::new();
    let mut other = Chat::new();
    let mut events = vec![chat.created(&[bob, cy])];
    events.extend((0..6).map(|i| chat.message(&format!("m{i}"))));
    chats::apply(&pg, &keys, events, DELAY).await.unwrap();
    let mut events = vec![other.created(&[bob])];
    events.extend((0..2).map(|i| other.message(&format!("o{i}"))));
    chats::apply(&pg, &keys, events, DELAY).await.unwrap();
    let mut notices = receipt_notices(&stack, chat.id).await;
    let mut others = receipt_notices(&stack, other.id).await;

    let tracker = tokio_util::task::TaskTracker::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    // Long enough that the moves below are all offered inside the first interval.
    let interval = Duration::from_secs(3);
    let announcer = receipts::Announcer::merging(
        stack.infra.nats.clone(),
        interval,
        &tracker,
        shutdown.clone(),
    );
    let delivered = |user: UserId, up_to: u64| {
        ReceiptEvent::Delivered(DeliveredReceipt {
            user_id: user,
            device_id: DeviceId::new(),
            up_to,
        })
    };
    let read = |user: UserId, up_to: u64| {
        ReceiptEvent::Read(ReadReceipt {
            user_id: user,
            up_to,
        })
    };
    let started = std::time::Instant::now();
    let apply = |chat: ChatId, seq: u64, user: UserId, event: ReceiptEvent| {
        let (pg, announcer) = (pg.clone(), announcer.clone());
        async move {
            let out = receipts::apply(&pg, &announcer, vec![receipt(chat, seq, user, event)])
                .await
                .unwrap();
            assert_eq!(out, vec![Disposition::Ack]);
        }
    };

    // The chat's first move goes at once.
    apply(chat.id, 1, bob, delivered(bob, 2)).await;
    let first: WatermarkMoved = next_notice(&mut notices).await;
    assert_eq!((first.user_id, first.delivered_up_to), (bob, Some(2)));
    assert!(started.elapsed() < interval, "the first move did not wait");
    // Three more moves in the interval wait...
    apply(chat.id, 2, bob, delivered(bob, 4)).await;
    apply(chat.id, 3, bob, read(bob, 3)).await;
    apply(chat.id, 4, cy, delivered(cy, 5)).await;
    // ... while another chat's first move does not.
    apply(other.id, 5, bob, delivered(bob, 3)).await;
    let theirs: WatermarkMoved = next_notice(&mut others).await;
    assert_eq!(
        (theirs.chat_id, theirs.delivered_up_to),
        (other.id, Some(3))
    );
    next_is_marker(&stack, live_receipts(chat.id), &mut notices, "marker").await;
    assert!(
        started.elapsed() < interval,
        "the marker was checked inside the interval; the machine stalled too long to tell"
    );

    // At the interval's end: one notice per member, with its highest watermarks.
    let mut merged = Vec::new();
    for _ in 0..2 {
        let m: WatermarkMoved = next_notice(&mut notices).await;
        merged.push((m.user_id, m.delivered_up_to, m.read_up_to));
    }
    merged.sort();
    let mut want = vec![(bob, Some(4), Some(3)), (cy, Some(5), None)];
    want.sort();
    assert_eq!(merged, want);
    assert!(
        started.elapsed() >= interval,
        "the merged moves waited for the interval's end"
    );
    next_is_marker(&stack, live_receipts(chat.id), &mut notices, "marker 2").await;

    // At shutdown the announcer's task ends, and hands over what waited.
    apply(chat.id, 6, cy, delivered(cy, 6)).await;
    shutdown.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .expect("the announcer stops at shutdown");
    let last: WatermarkMoved = next_notice(&mut notices).await;
    assert_eq!((last.user_id, last.delivered_up_to), (cy, Some(6)));
}

/// Announces every move at once, as the merging announcer does for a quiet chat.
fn immediate(stack: &TestStack) -> receipts::Announcer {
    receipts::Announcer::immediate(stack.infra.nats.clone())
}

/// The next message on a notice subject within 5 s, decoded.
async fn next_notice<T: serde::de::DeserializeOwned>(notices: &mut async_nats::Subscriber) -> T {
    let next = tokio::time::timeout(Duration::from_secs(5), notices.next())
        .await
        .expect("a notice within 5 s")
        .unwrap();
    serde_json::from_slice(&next.payload).unwrap()
}

/// A subscription to `chat`'s receipt notices, in effect at the server when this returns.
async fn receipt_notices(stack: &TestStack, chat: ChatId) -> async_nats::Subscriber {
    let notices = stack
        .infra
        .nats
        .subscribe(live_receipts(chat))
        .await
        .unwrap();
    stack.infra.nats.flush().await.unwrap();
    notices
}

#[tokio::test]
async fn membership_notices_go_out_for_applied_events_again_on_redelivery_and_not_while_waiting() {
    let (stack, pg, keys) = db().await;
    let nats = &stack.infra.nats;
    let bob = UserId::new();
    let mut bobs = nats.subscribe(notify_user(bob)).await.unwrap();
    nats.flush().await.unwrap();
    let apply = |batch: Vec<Delivered>| {
        let (pg, keys, nats) = (pg.clone(), keys.clone(), nats.clone());
        async move {
            let prepared = chats::prepare(&keys, batch).await.unwrap();
            chats::apply_and_announce(&pg, &nats, prepared, DELAY)
                .await
                .unwrap()
        }
    };
    let mut chat = Chat::new();
    let created = chat.created(&[bob]);
    let hello = chat.message("hello");
    let removed = chat.next(ChatEvent::ParticipantsModified(ParticipantsModified {
        added: vec![],
        removed: vec![bob],
        promoted: vec![],
    }));
    let chat_id = chat.id.to_string();

    assert_eq!(apply(vec![copy(&created)]).await, vec![Disposition::Ack]);
    let notice = next_notice::<serde_json::Value>(&mut bobs).await;
    assert_eq!(
        notice,
        serde_json::json!({"chat_id": chat_id, "sequence": 1, "change": "added"})
    );
    // The batch is applied. (That the notice follows the commit is by construction:
    // `apply_and_announce` publishes after `apply_prepared` returned; this cannot observe it.)
    let (_, chats_rows, _) = snapshot(&pg).await;
    assert_eq!(chats_rows, vec![(1,)]);

    // A redelivery (a crash between the commit and the acks) announces the change again.
    assert_eq!(apply(vec![copy(&created)]).await, vec![Disposition::Ack]);
    assert_eq!(
        next_notice::<serde_json::Value>(&mut bobs).await["sequence"],
        1
    );

    // The removal ahead of the missing message waits, and so does its notice.
    assert_eq!(
        apply(vec![copy(&removed)]).await,
        vec![Disposition::Retry(DELAY)]
    );
    // Nothing was announced before the marker.
    next_is_marker(&stack, notify_user(bob), &mut bobs, "marker").await;

    // Once applied, the message announces nothing and the removal is announced.
    assert_eq!(
        apply(vec![hello, removed]).await,
        vec![Disposition::Ack, Disposition::Ack]
    );
    assert_eq!(
        next_notice::<serde_json::Value>(&mut bobs).await,
        serde_json::json!({"chat_id": chat_id, "sequence": 3, "change": "removed"})
    );
}

/// `(sequence, sender)` of the chat's rows in the activity rollup, and its rollup version.
async fn rollup(pg: &PgPool, chat: ChatId) -> (Vec<(i64, uuid::Uuid)>, Option<i64>) {
    let rows = sqlx::query_as(
        "SELECT sequence, sender_id FROM activity_messages WHERE chat_id = $1 ORDER BY sequence",
    )
    .bind(chat.as_uuid())
    .fetch_all(pg)
    .await
    .unwrap();
    let version = sqlx::query_scalar("SELECT last_sequence FROM activity_chats WHERE chat_id = $1")
        .bind(chat.as_uuid())
        .fetch_optional(pg)
        .await
        .unwrap();
    (rows, version)
}

#[tokio::test]
async fn the_live_apply_records_the_activity_rollup_and_acks_only_what_both_projections_hold() {
    let (_stack, pg, keys) = db().await;
    let live = |batch: Vec<Delivered>| {
        let (pg, keys) = (pg.clone(), keys.clone());
        async move {
            let prepared = chats::prepare(&keys, batch).await.unwrap();
            chats::apply_prepared(&pg, prepared, DELAY, chats::Rollup::Record)
                .await
                .unwrap()
        }
    };
    let mut chat = Chat::new();
    let admin = *chat.admin.as_uuid();
    let created = chat.created(&[]);
    let (one, two, three) = (chat.message("1"), chat.message("2"), chat.message("3"));

    // One transaction holds both projections' effects.
    assert_eq!(
        live(vec![copy(&created), copy(&one)]).await,
        vec![Disposition::Ack; 2]
    );
    assert_eq!(rollup(&pg, chat.id).await, (vec![(2, admin)], Some(2)));
    assert_eq!(snapshot(&pg).await.1, vec![(2,)]);

    // The read models ahead of the rollup (rebuilt, say): the rollup still takes the event.
    chats::apply(&pg, &keys, vec![copy(&two)], DELAY)
        .await
        .unwrap();
    assert_eq!(rollup(&pg, chat.id).await.1, Some(2));
    assert_eq!(live(vec![copy(&two)]).await, vec![Disposition::Ack]);
    assert_eq!(
        rollup(&pg, chat.id).await,
        (vec![(2, admin), (3, admin)], Some(3))
    );

    // The rollup ahead of the read models: the chats projection takes it, nothing doubles.
    parley_projectors::activity::apply_chats(&pg, vec![copy(&three)], DELAY)
        .await
        .unwrap();
    assert_eq!(live(vec![copy(&three)]).await, vec![Disposition::Ack]);
    assert_eq!(snapshot(&pg).await.1, vec![(4,)]);
    assert_eq!(
        rollup(&pg, chat.id).await,
        (vec![(2, admin), (3, admin), (4, admin)], Some(4))
    );

    // The rollup missing earlier events: the read models apply the event, but it is not acked
    // until the rollup has it too, so it comes again once the events before it have.
    let mut other = Chat::new();
    let (o_created, o_one, o_two) = (other.created(&[]), other.message("a"), other.message("b"));
    chats::apply(&pg, &keys, vec![copy(&o_created), copy(&o_one)], DELAY)
        .await
        .unwrap();
    assert_eq!(
        live(vec![copy(&o_two)]).await,
        vec![Disposition::Retry(DELAY)]
    );
    let other_admin = *other.admin.as_uuid();
    assert_eq!(rollup(&pg, other.id).await, (vec![], None));
    assert_eq!(
        live(vec![copy(&o_created), copy(&o_one), copy(&o_two)]).await,
        vec![Disposition::Ack; 3]
    );
    assert_eq!(
        rollup(&pg, other.id).await,
        (vec![(2, other_admin), (3, other_admin)], Some(3))
    );
}
