//! The activity projection against a real PostgreSQL: a message's delivery time is the first
//! delivered receipt from someone else covering it, whichever of its two readers runs first.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use parley_platform::MIGRATOR;
use parley_projectors::activity;
use parley_projectors::runner::{Delivered, Disposition};
use parley_schemas::cloudevent::{EventMeta, encode};
use parley_schemas::events::{
    ChatCreated, Delivered as DeliveredEvent, DeliveredBatch, MemberRole, MessageSent,
};
use parley_schemas::{
    ChatEvent, ChatId, ChatKind, DeviceId, EventId, MessageId, ReceiptEvent, Role, UserId,
};
use parley_test_support::{TestDb, eventually};
use sqlx::PgPool;

const DELAY: Duration = Duration::from_millis(50);

fn at(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 16, 0, 0).unwrap() + chrono::Duration::seconds(secs)
}

struct Scenario {
    chat: ChatId,
    ada: UserId,
    bob: UserId,
    chats: Vec<Delivered>,
    receipts: Vec<Delivered>,
}

fn delivered(seq: u64, meta: EventMeta, event: &impl parley_schemas::DomainEvent) -> Delivered {
    Delivered {
        stream_seq: seq,
        payload: encode(&meta, event).into(),
    }
}

/// Ada creates a chat with Bob and sends three messages (at 1 s, 2 s, 3 s); Bob sends one (4 s).
/// Bob's device acks up to 3 at 10 s and up to 5 at 20 s; Ada's device acks up to 5 at 30 s.
fn scenario() -> Scenario {
    let (chat, ada, bob) = (ChatId::new(), UserId::new(), UserId::new());
    let meta = |seq: u64, secs: i64, actor: UserId| EventMeta {
        id: EventId::new(),
        subject: chat.to_string(),
        time: at(secs),
        sequence: seq,
        actor,
    };
    let mut chats = vec![delivered(
        1,
        meta(1, 0, ada),
        &ChatEvent::Created(ChatCreated {
            chat_id: chat,
            kind: ChatKind::Group,
            title: None,
            visibility: Default::default(),
            members: vec![
                MemberRole {
                    user_id: ada,
                    role: Role::Admin,
                },
                MemberRole {
                    user_id: bob,
                    role: Role::Member,
                },
            ],
        }),
    )];
    for (seq, secs, sender) in [(2, 1, ada), (3, 2, ada), (4, 3, ada), (5, 4, bob)] {
        chats.push(delivered(
            seq,
            meta(seq, secs, sender),
            &ChatEvent::MessageSent(MessageSent {
                message_id: MessageId::new(),
                sender_id: sender,
                body: "x".into(),
                reply_to: None,
                attachments: vec![],
                thread_root: None,
                mentions: vec![],
            }),
        ));
    }
    let receipts = vec![
        receipt(chat, 1, bob, 3, 10),
        receipt(chat, 2, bob, 5, 20),
        receipt(chat, 3, ada, 5, 30),
    ];
    Scenario {
        chat,
        ada,
        bob,
        chats,
        receipts,
    }
}

/// Stream message `n` of `RECEIPTS`: a device of `user` delivered `chat` up to `up_to`, at
/// `secs`.
fn receipt(chat: ChatId, n: u64, user: UserId, up_to: u64, secs: i64) -> Delivered {
    let meta = EventMeta {
        id: EventId::new(),
        subject: chat.to_string(),
        time: at(secs),
        sequence: up_to,
        actor: user,
    };
    let event = ReceiptEvent::Delivered(DeliveredEvent {
        user_id: user,
        device_id: DeviceId::new(),
        up_to,
    });
    delivered(n, meta, &event)
}

fn copy(batch: &[Delivered]) -> Vec<Delivered> {
    batch
        .iter()
        .map(|d| Delivered {
            stream_seq: d.stream_seq,
            payload: d.payload.clone(),
        })
        .collect()
}

async fn db() -> (TestDb, PgPool) {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    MIGRATOR.run(&pool).await.unwrap();
    (db, pool)
}

async fn delivered_at(pg: &PgPool, chat: ChatId) -> Vec<(i64, Option<DateTime<Utc>>)> {
    sqlx::query_as(
        "SELECT sequence, delivered_at FROM activity_messages WHERE chat_id = $1 ORDER BY sequence",
    )
    .bind(chat.as_uuid())
    .fetch_all(pg)
    .await
    .unwrap()
}

fn expected() -> Vec<(i64, Option<DateTime<Utc>>)> {
    // Ada's messages 2 and 3 reached Bob at 10 s, message 4 at 20 s; Bob's message 5 reached
    // Ada at 30 s (Bob's own receipt at 20 s does not count for his message).
    vec![
        (2, Some(at(10))),
        (3, Some(at(10))),
        (4, Some(at(20))),
        (5, Some(at(30))),
    ]
}

#[tokio::test]
async fn messages_then_receipts_stamp_each_message_with_its_first_delivery_to_someone_else() {
    let (_db, pg) = db().await;
    let s = scenario();
    let out = activity::apply_chats(&pg, copy(&s.chats), DELAY)
        .await
        .unwrap();
    assert_eq!(out, vec![Disposition::Ack; 5]);
    activity::apply_receipts(&pg, copy(&s.receipts))
        .await
        .unwrap();
    assert_eq!(delivered_at(&pg, s.chat).await, expected());
}

/// The scenario's last two receipts (Bob up to 5, Ada up to 5) as one gateway batch at 20 s:
/// each entry stamps what it would stamp alone, with the batch's time.
#[tokio::test]
async fn a_delivered_batch_stamps_what_its_entries_would_one_by_one() {
    let (_db, pg) = db().await;
    let s = scenario();
    activity::apply_chats(&pg, copy(&s.chats), DELAY)
        .await
        .unwrap();
    activity::apply_receipts(&pg, copy(&s.receipts[..1]))
        .await
        .unwrap();
    let (ada, bob) = (s.ada, s.bob);
    let entry = |user_id, up_to| DeliveredEvent {
        user_id,
        device_id: DeviceId::new(),
        up_to,
    };
    let batch = delivered(
        2,
        EventMeta {
            id: EventId::new(),
            subject: s.chat.to_string(),
            time: at(20),
            sequence: 5,
            actor: parley_schemas::events::SYSTEM_ACTOR,
        },
        &ReceiptEvent::DeliveredBatch(DeliveredBatch {
            receipts: vec![entry(bob, 5), entry(ada, 5)],
        }),
    );
    activity::apply_receipts(&pg, vec![batch]).await.unwrap();
    let mut want = expected();
    // Ada's entry now comes at 20 s, not 30 s.
    want[3].1 = Some(at(20));
    assert_eq!(delivered_at(&pg, s.chat).await, want);
}

#[tokio::test]
async fn receipts_applied_before_their_messages_give_the_same_delivery_times() {
    let (_db, pg) = db().await;
    let s = scenario();
    // Each receipt lands before the messages it covers: the RECEIPTS reader ahead of CHATS.
    activity::apply_receipts(&pg, copy(&s.receipts[..1]))
        .await
        .unwrap();
    activity::apply_chats(&pg, copy(&s.chats[..4]), DELAY)
        .await
        .unwrap();
    activity::apply_receipts(&pg, copy(&s.receipts[1..]))
        .await
        .unwrap();
    activity::apply_chats(&pg, copy(&s.chats[4..]), DELAY)
        .await
        .unwrap();
    assert_eq!(delivered_at(&pg, s.chat).await, expected());
}

#[tokio::test]
async fn redelivered_batches_change_nothing() {
    let (_db, pg) = db().await;
    let s = scenario();
    activity::apply_chats(&pg, copy(&s.chats), DELAY)
        .await
        .unwrap();
    activity::apply_receipts(&pg, copy(&s.receipts))
        .await
        .unwrap();
    let out = activity::apply_chats(&pg, copy(&s.chats), DELAY)
        .await
        .unwrap();
    assert_eq!(out, vec![Disposition::Ack; 5], "duplicates are acked");
    activity::apply_receipts(&pg, copy(&s.receipts))
        .await
        .unwrap();
    assert_eq!(delivered_at(&pg, s.chat).await, expected());
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM activity_messages")
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(count, 4);
}

#[tokio::test]
async fn receipts_in_one_batch_stamp_the_same_times_in_any_order() {
    let (_db, pg) = db().await;
    let s = scenario();
    activity::apply_chats(&pg, copy(&s.chats), DELAY)
        .await
        .unwrap();
    // Bob's later, wider receipt first: his earlier one still stamps the messages it covers.
    let mut reversed = copy(&s.receipts);
    reversed.reverse();
    activity::apply_receipts(&pg, reversed).await.unwrap();
    assert_eq!(delivered_at(&pg, s.chat).await, expected());
}

#[tokio::test]
async fn a_crowd_acking_one_range_stamps_each_message_with_the_earliest_receipt_not_its_senders() {
    let (_db, pg) = db().await;
    let s = scenario();
    activity::apply_chats(&pg, copy(&s.chats), DELAY)
        .await
        .unwrap();
    // As in a channel: everyone's watermark moves over the same messages in one batch. Ada's
    // two devices ack first, then Bob, then a crowd. Her own receipts do not count for her
    // messages (2, 3, 4): Bob's is the earliest that does, though two of Ada's come before it.
    let crowd: Vec<UserId> = (0..40).map(|_| UserId::new()).collect();
    let ackers = [(s.ada, 10), (s.ada, 11), (s.bob, 12)]
        .into_iter()
        .chain(crowd.iter().map(|&u| (u, 13)));
    let batch: Vec<Delivered> = ackers
        .enumerate()
        .map(|(i, (user, secs))| receipt(s.chat, i as u64 + 1, user, 5, secs))
        .collect();
    activity::apply_receipts(&pg, batch).await.unwrap();
    assert_eq!(
        delivered_at(&pg, s.chat).await,
        vec![
            (2, Some(at(12))),
            (3, Some(at(12))),
            (4, Some(at(12))),
            // Bob's message reached Ada first.
            (5, Some(at(10))),
        ]
    );
}

/// A channel with a long history, in a table holding other chats' too: a crowd's receipts over
/// its newest message read `activity_messages` through its index only, so a batch costs what
/// its ranges cover, not what the table holds. (Planned as one statement, the stamping often
/// hashed the whole table instead: a cost growing with every chat's history.)
#[tokio::test]
async fn a_receipts_batch_reads_only_the_messages_its_ranges_cover_not_the_whole_history() {
    const HISTORY: i64 = 20_000;
    const OTHERS: i64 = 50_000;
    const CROWD: usize = 2_000;
    let db = TestDb::create().await;
    // One connection, so that the statistics read below are the ones the batch left.
    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    MIGRATOR.run(&pg).await.unwrap();
    let (chat, sender) = (ChatId::new(), UserId::new());
    // The channel's history, delivered long ago, then its newest message, not yet delivered;
    // and 500 other chats of 100 messages.
    sqlx::query(
        "INSERT INTO activity_messages (chat_id, sequence, sender_id, sent_at, delivered_at) \
         SELECT $1, s, $2, $3, CASE WHEN s <= $4 THEN $3 END FROM generate_series(1, $4 + 1) s \
         UNION ALL \
         SELECT md5((s / 100)::text)::uuid, s % 100 + 1, $2, $3, $3 \
         FROM generate_series(0, $5 - 1) s",
    )
    .bind(chat.as_uuid())
    .bind(sender.as_uuid())
    .bind(at(0))
    .bind(HISTORY)
    .bind(OTHERS)
    .execute(&pg)
    .await
    .unwrap();
    let crowd: Vec<UserId> = (0..CROWD).map(|_| UserId::new()).collect();
    let ids: Vec<uuid::Uuid> = crowd.iter().map(|u| *u.as_uuid()).collect();
    sqlx::query(
        "INSERT INTO activity_watermarks (chat_id, user_id, delivered_up_to, at) \
         SELECT $1, u, $2, $3 FROM UNNEST($4::uuid[]) AS t(u)",
    )
    .bind(chat.as_uuid())
    .bind(HISTORY)
    .bind(at(0))
    .bind(&ids)
    .execute(&pg)
    .await
    .unwrap();
    // As autovacuum would have by then: the planner knows the tables' sizes.
    sqlx::query("ANALYZE activity_messages, activity_watermarks")
        .execute(&pg)
        .await
        .unwrap();
    let before = message_scans(&pg, |_| true).await;
    let batch: Vec<Delivered> = crowd
        .iter()
        .enumerate()
        .map(|(i, &user)| receipt(chat, i as u64 + 1, user, HISTORY as u64 + 1, 100 + i as i64))
        .collect();
    activity::apply_receipts(&pg, batch).await.unwrap();
    let after = message_scans(&pg, |(_, idx)| idx > before.1).await;
    assert_eq!(
        after.0, before.0,
        "sequential scans of activity_messages by one receipts batch"
    );
    let newest = delivered_at(&pg, chat).await.pop().unwrap();
    assert_eq!(newest, (HISTORY + 1, Some(at(100))));
}

/// `activity_messages`' (sequential, index) scans in the statistics, once `ready` holds for
/// them (this backend's counters reach the shared statistics when it next goes idle).
async fn message_scans(pg: &PgPool, ready: impl Fn((i64, i64)) -> bool) -> (i64, i64) {
    eventually(
        Duration::from_secs(10),
        "the batch's scans in the statistics",
        || async {
            sqlx::query("SELECT pg_stat_force_next_flush()")
                .execute(pg)
                .await
                .unwrap();
            let scans: (i64, i64) = sqlx::query_as(
                "SELECT seq_scan, COALESCE(idx_scan, 0) FROM pg_stat_user_tables \
             WHERE relname = 'activity_messages'",
            )
            .fetch_one(pg)
            .await
            .unwrap();
            ready(scans).then_some(scans)
        },
    )
    .await
}

/// Every Parley pool runs with PostgreSQL's JIT compiler off: the planner would otherwise
/// compile, on every execution, any statement whose estimated cost passes `jit_above_cost`,
/// and the receipts' rollup over a channel's batch does once the read model grows (session 22
/// found 32 compilations in one channel benchmark phase). A statement estimated far past the
/// threshold is planned without JIT.
#[tokio::test]
async fn parley_pools_plan_without_the_jit_compiler() {
    let db = TestDb::create().await;
    let pool = parley_platform::pg_pool(&db.url, 1).await.unwrap();
    let jit: String = sqlx::query_scalar("SHOW jit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(jit, "off");
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT sum(a * b * c) FROM generate_series(1, 1000000) a, \
         generate_series(1, 1000000) b, generate_series(1, 1000000) c",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        !plan.iter().any(|line| line.contains("JIT")),
        "planned with JIT: {plan:#?}"
    );
}
