//! Migrations that change what the projections keep, checked on rows written before them: a
//! database at the previous migration gets rows, then the migration runs, as on an upgrade.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use parley_platform::MIGRATOR;
use parley_test_support::TestDb;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

/// Held by every test of this binary for its whole run, so that they run one at a time. The
/// in-place test counts pruned row versions, and a transaction open anywhere in the cluster
/// (another test's migration, in its own database) keeps snapshots' xmin back: PostgreSQL
/// then does not recompute its per-database horizon, prunes nothing, and the updates leave
/// their pages (74 % in place in two CI runs, 88 % in one local run of this binary).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fresh database with every migration before `version` applied, in order.
async fn at_migration_before(version: i64) -> (TestDb, PgPool) {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    for m in MIGRATOR.iter().filter(|m| m.version < version) {
        sqlx::raw_sql(&m.sql).execute(&pool).await.unwrap();
    }
    (db, pool)
}

async fn apply(pool: &PgPool, version: i64) {
    let m = MIGRATOR
        .iter()
        .find(|m| m.version == version)
        .expect("the migration under test exists");
    sqlx::raw_sql(&m.sql).execute(pool).await.unwrap();
}

#[tokio::test]
async fn the_reactions_summary_is_backfilled_from_the_reactions_rows() {
    let _one = ONE_AT_A_TIME.lock().await;
    const SUMMARY: i64 = 20261122001001;
    let (_db, pg) = at_migration_before(SUMMARY).await;
    let chat = Uuid::now_v7();
    let (reacted, plain, deleted) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let (ada, bob) = (Uuid::now_v7(), Uuid::now_v7());
    for (seq, message, is_deleted) in [
        (2_i64, reacted, false),
        (3, plain, false),
        (4, deleted, true),
    ] {
        sqlx::query(
            "INSERT INTO messages (chat_id, sequence, message_id, sender_id, body, sent_at, deleted) \
             VALUES ($1, $2, $3, $4, 'x', now(), $5)",
        )
        .bind(chat)
        .bind(seq)
        .bind(message)
        .bind(ada)
        .bind(is_deleted)
        .execute(&pg)
        .await
        .unwrap();
    }
    // Bob reacted before Ada (sequence 5 < 6), whatever the rows' physical order.
    for (message, emoji, user, seq) in [
        (reacted, "👍", ada, 6_i64),
        (reacted, "👍", bob, 5),
        (reacted, "🎉", ada, 7),
        // A leftover on a deleted message (the projection drops these) shows nowhere.
        (deleted, "👍", bob, 8),
    ] {
        sqlx::query(
            "INSERT INTO reactions (message_id, emoji, user_id, chat_id, sequence) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(message)
        .bind(emoji)
        .bind(user)
        .bind(chat)
        .bind(seq)
        .execute(&pg)
        .await
        .unwrap();
    }

    apply(&pg, SUMMARY).await;

    let rows: Vec<(Uuid, Option<serde_json::Value>)> =
        sqlx::query_as("SELECT message_id, reactions FROM messages ORDER BY sequence")
            .fetch_all(&pg)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            (reacted, Some(json!({ "👍": [bob, ada], "🎉": [ada] }))),
            (plain, None),
            (deleted, None),
        ]
    );
}

#[tokio::test]
async fn the_download_check_reads_only_the_messages_that_carry_attachments() {
    let _one = ONE_AT_A_TIME.lock().await;
    const PARTIAL: i64 = 20261122002001;
    let (_db, pg) = at_migration_before(PARTIAL).await;
    let (chat, ada, eve) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let attachment = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO members (chat_id, user_id, role, joined_seq) VALUES ($1, $2, 'admin', 1)",
    )
    .bind(chat)
    .bind(ada)
    .execute(&pg)
    .await
    .unwrap();
    // A chat of 20,000 plain messages and one that carries the attachment: scanning the chat's
    // messages is what the check must not do.
    sqlx::query(
        "INSERT INTO messages (chat_id, sequence, message_id, sender_id, body, sent_at, attachments) \
         SELECT $1, g, gen_random_uuid(), $2, 'm' || g, now(), \
                CASE WHEN g = 10000 THEN jsonb_build_array(jsonb_build_object('attachment_id', $3::text)) \
                     ELSE '[]'::jsonb END \
         FROM generate_series(1, 20000) g",
    )
    .bind(chat)
    .bind(ada)
    .bind(attachment.to_string())
    .execute(&pg)
    .await
    .unwrap();
    apply(&pg, PARTIAL).await;
    sqlx::query("ANALYZE messages").execute(&pg).await.unwrap();

    let indexed: i64 = sqlx::query_scalar(
        "SELECT reltuples::bigint FROM pg_class WHERE relname = 'messages_by_attachment'",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert!(
        indexed <= 1,
        "the index holds {indexed} rows, not only the one with an attachment"
    );
    let plan: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN {}",
        parley_platform::attachments::VISIBLE_THROUGH_CHATS
    ))
    .bind(ada)
    .bind(attachment.to_string())
    .fetch_all(&pg)
    .await
    .unwrap();
    assert!(
        plan.iter().any(|l| l.contains("messages_by_attachment")),
        "the check does not use the index: {plan:#?}"
    );
    for (user, visible) in [(ada, true), (eve, false)] {
        let seen = parley_platform::attachments::visible_through_chats(
            &pg,
            parley_schemas::UserId::from_uuid(user),
            parley_schemas::AttachmentId::from_uuid(attachment),
        )
        .await
        .unwrap();
        assert_eq!(seen, visible);
    }
}

#[tokio::test]
async fn the_activity_rollup_catches_up_with_the_chats_projection_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    const CATCH_UP: i64 = 20261123001001;
    let (_db, pg) = at_migration_before(CATCH_UP).await;
    let (behind, ahead, unseen) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let (ada, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let t = |secs: i64| chrono::DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap();
    // The chats projection holds messages 2..=5 of `behind` (Ada sent 2..=4, Bob 5), 2 of
    // `ahead` and 2..=3 of `unseen` (the rollup never saw that chat at all).
    for (chat, last) in [(behind, 5_i64), (ahead, 2), (unseen, 3)] {
        sqlx::query(
            "INSERT INTO chats (chat_id, kind, created_at, last_sequence, last_activity_at) \
             VALUES ($1, 'group', now(), $2, now())",
        )
        .bind(chat)
        .bind(last)
        .execute(&pg)
        .await
        .unwrap();
        for seq in 2..=last {
            let sender = if chat == behind && seq == 5 { bob } else { ada };
            sqlx::query(
                "INSERT INTO messages (chat_id, sequence, message_id, sender_id, body, sent_at) \
                 VALUES ($1, $2, $3, $4, 'x', $5)",
            )
            .bind(chat)
            .bind(seq)
            .bind(Uuid::now_v7())
            .bind(sender)
            .bind(t(seq))
            .execute(&pg)
            .await
            .unwrap();
        }
    }
    // The rollup's reader stopped at 3 in `behind`, with message 2 delivered to Bob at 100 s;
    // Bob's watermark has since reached 4 (at 200 s) and Ada's 5 (at 300 s). In `ahead` it is
    // at 9, beyond the chats projection (say, freshly rebuilt).
    sqlx::query("INSERT INTO activity_chats (chat_id, last_sequence) VALUES ($1, 3), ($2, 9)")
        .bind(behind)
        .bind(ahead)
        .execute(&pg)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO activity_messages (chat_id, sequence, sender_id, sent_at, delivered_at) \
         VALUES ($1, 2, $2, $3, $4), ($1, 3, $2, $5, NULL)",
    )
    .bind(behind)
    .bind(ada)
    .bind(t(2))
    .bind(t(100))
    .bind(t(3))
    .execute(&pg)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO activity_watermarks (chat_id, user_id, delivered_up_to, at) \
         VALUES ($1, $2, 4, $3), ($1, $4, 5, $5)",
    )
    .bind(behind)
    .bind(bob)
    .bind(t(200))
    .bind(ada)
    .bind(t(300))
    .execute(&pg)
    .await
    .unwrap();

    apply(&pg, CATCH_UP).await;

    let rows: Vec<(Uuid, i64, Uuid, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
        "SELECT chat_id, sequence, sender_id, delivered_at FROM activity_messages \
         ORDER BY chat_id, sequence",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    let mut want = vec![
        // Rows the rollup had are left as they were: only missing rows are copied.
        (behind, 2, ada, Some(t(100))),
        (behind, 3, ada, None),
        // Copied: 4 reached Bob by his watermark at 200 s; Bob's 5 reached Ada at 300 s.
        (behind, 4, ada, Some(t(200))),
        (behind, 5, bob, Some(t(300))),
        (unseen, 2, ada, None),
        (unseen, 3, ada, None),
    ];
    want.sort();
    assert_eq!(rows, want);
    let versions: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT chat_id, last_sequence FROM activity_chats ORDER BY chat_id")
            .fetch_all(&pg)
            .await
            .unwrap();
    let mut want = vec![(behind, 5), (ahead, 9), (unseen, 3)];
    want.sort();
    assert_eq!(versions, want);
}

/// Raises `column` on every row of `table` `times` times over, one statement (and transaction)
/// each, as the receipts projections do once per flush in a channel; returns the share of the
/// updates after the first two that PostgreSQL made in place (HOT: no new index entries). The
/// first two are left out: they find the pages as the inserts left them, before any earlier
/// version of a row is dead and can be pruned, which a table in use is past.
async fn hot_share(pg: &PgPool, table: &str, column: &str, times: i64) -> f64 {
    const WARM_UP: i64 = 2;
    let mut conn = pg.acquire().await.unwrap();
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let mut raise = async |from: i64, to: i64| {
        for up in from..=to {
            sqlx::query(&format!(
                "UPDATE {table} SET {column} = $1 WHERE {column} < $1"
            ))
            .bind(up)
            .execute(&mut *conn)
            .await
            .unwrap();
        }
        updates(&mut conn, table, rows * to).await
    };
    let (updated, hot) = raise(1, WARM_UP).await;
    let (updated_after, hot_after) = raise(WARM_UP + 1, times).await;
    (hot_after - hot) as f64 / (updated_after - updated) as f64
}

/// `table`'s (updated, HOT-updated) rows in the statistics, once they count `expected` updates.
async fn updates(conn: &mut sqlx::PgConnection, table: &str, expected: i64) -> (i64, i64) {
    // This backend's counters reach the shared statistics when it next goes idle.
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (updated, hot): (i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = $1",
        )
        .bind(table)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        if updated >= expected {
            return (updated, hot);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{table}: statistics show {updated} of {expected} updates after 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn watermark_rows_are_updated_in_place_when_a_whole_channel_moves() {
    let _one = ONE_AT_A_TIME.lock().await;
    const IN_PLACE: i64 = 20261123002001;
    let (_db, pg) = at_migration_before(IN_PLACE).await;
    apply(&pg, IN_PLACE).await;
    let chat = Uuid::now_v7();
    // A channel of 5,000: its members, one device each, and the rollup's watermarks.
    for insert in [
        "INSERT INTO members (chat_id, user_id, role, joined_seq) \
         SELECT $1, gen_random_uuid(), 'member', 1 FROM generate_series(1, 5000)",
        "INSERT INTO device_cursors (device_id, chat_id, acked_up_to) \
         SELECT gen_random_uuid(), $1, 0 FROM generate_series(1, 5000)",
        "INSERT INTO activity_watermarks (chat_id, user_id, delivered_up_to, at) \
         SELECT $1, gen_random_uuid(), 0, now() FROM generate_series(1, 5000)",
    ] {
        sqlx::query(insert).bind(chat).execute(&pg).await.unwrap();
    }
    // Before this migration the pages were full, and few of these updates were HOT.
    for (table, column) in [
        ("members", "delivered_up_to"),
        ("device_cursors", "acked_up_to"),
        ("activity_watermarks", "delivered_up_to"),
    ] {
        let share = hot_share(&pg, table, column, 10).await;
        assert!(
            share >= 0.9,
            "{table}: only {:.0} % of updates in place",
            share * 100.0
        );
    }
}
