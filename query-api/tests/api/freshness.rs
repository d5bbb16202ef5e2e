//! Read your writes: `min_sequence` waits for the read model, up to the configured wait.

use std::time::Duration;

use parley_query_api::QueryConfig;
use reqwest::StatusCode;

use crate::helpers::{assert_problem, sequences, spawn_app, spawn_app_with};

/// The write side is ahead of the read model: the `CHATS` stream holds `chat` at `sequence`
/// (as after a command whose event the projector has not applied yet; this harness runs no
/// projector).
async fn stored_at(app: &crate::helpers::TestApp, chat: parley_schemas::ChatId, sequence: u64) {
    use parley_schemas::cloudevent::{EventMeta, encode};
    use parley_schemas::events::TitleChanged;
    use parley_schemas::{ChatEvent, EventId, UserId};
    let meta = EventMeta {
        id: EventId::new(),
        subject: chat.to_string(),
        time: chrono::Utc::now(),
        sequence,
        actor: UserId::new(),
    };
    let event = ChatEvent::TitleChanged(TitleChanged { title: "t".into() });
    app.stack
        .infra
        .js
        .publish(format!("chats.{chat}"), encode(&meta, &event).into())
        .await
        .unwrap()
        .await
        .unwrap();
}

fn short_wait() -> QueryConfig {
    QueryConfig {
        min_sequence_wait: Duration::from_millis(300),
        ..QueryConfig::default()
    }
}

#[tokio::test]
async fn min_sequence_already_reached_answers_at_once() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let token = app.login(alice, "phone").await;
    let chat = app.chat("group", None, &[(alice, "admin")]).await;
    let seq = app.message(chat, alice, "hi").await;

    for route in [
        format!("/v1/chats/{chat}?min_sequence={seq}"),
        format!("/v1/chats/{chat}?min_sequence=0"),
        format!("/v1/chats/{chat}/messages?min_sequence={seq}"),
        format!("/v1/chats?chat_id={chat}&min_sequence={seq}"),
        // Without a chat to wait for, the list ignores min_sequence.
        "/v1/chats?min_sequence=999".to_string(),
    ] {
        app.get_json(&route, &token).await;
    }
}

#[tokio::test]
async fn min_sequence_never_reached_is_503_with_retry_after() {
    let app = spawn_app_with(short_wait()).await;
    let alice = app.user("alice").await;
    let token = app.login(alice, "phone").await;
    let chat = app.chat("group", None, &[(alice, "admin")]).await;
    stored_at(&app, chat, 2).await;
    let fresh = parley_schemas::ChatId::new();
    stored_at(&app, fresh, 1).await;

    for route in [
        format!("/v1/chats/{chat}?min_sequence=2"),
        format!("/v1/chats/{chat}/messages?min_sequence=2"),
        format!("/v1/chats?chat_id={chat}&min_sequence=2"),
        // A chat the read model does not hold yet may be the caller's brand-new one.
        format!("/v1/chats/{fresh}?min_sequence=1"),
    ] {
        let started = std::time::Instant::now();
        let res = app.get(&route, &token).await;
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{route} did not wait"
        );
        assert_eq!(
            res.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1"),
            "{route}"
        );
        assert_problem(res, StatusCode::SERVICE_UNAVAILABLE).await;
    }
}

#[tokio::test]
async fn min_sequence_reached_while_waiting_answers_with_the_new_state() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let token = app.login(alice, "phone").await;
    let chat = app.chat("group", None, &[(alice, "admin")]).await;

    let url = format!("{}/v1/chats/{chat}/messages?min_sequence=2", app.base);
    let mut pending = tokio::spawn(app.http.get(url).bearer_auth(&token).send());
    // Not a synchronisation sleep: the read must still be waiting, since sequence 2 is absent.
    assert!(
        tokio::time::timeout(Duration::from_millis(150), &mut pending)
            .await
            .is_err(),
        "answered before the read model reached min_sequence"
    );
    let seq = app.message(chat, alice, "just sent").await;

    let res = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("an answer once the read model caught up")
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let page: serde_json::Value = res.json().await.unwrap();
    assert_eq!(sequences(&page), [seq]);
}

#[tokio::test]
async fn min_sequence_lets_a_user_added_while_waiting_read_the_chat() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let token = app.login(bob, "phone").await;
    let chat = app.chat("group", Some("team"), &[(alice, "admin")]).await;

    let url = format!("{}/v1/chats/{chat}?min_sequence=2", app.base);
    let pending = tokio::spawn(app.http.get(url).bearer_auth(&token).send());
    // What the projector does for "bob added at sequence 2", in one transaction.
    let mut tx = app.pg().begin().await.unwrap();
    sqlx::query("UPDATE chats SET last_sequence = 2 WHERE chat_id = $1")
        .bind(chat.as_uuid())
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO members (chat_id, user_id, role, joined_seq) VALUES ($1, $2, 'member', 2)",
    )
    .bind(chat.as_uuid())
    .bind(bob.as_uuid())
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let res = pending.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let detail: serde_json::Value = res.json().await.unwrap();
    assert_eq!(detail["last_sequence"], 2);
    assert_eq!(detail["members"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn min_sequence_reached_still_returns_404_to_a_non_member() {
    let app = spawn_app_with(short_wait()).await;
    let alice = app.user("alice").await;
    let mallory = app.user("mallory").await;
    let token = app.login(mallory, "laptop").await;
    let chat = app.chat("group", None, &[(alice, "admin")]).await;

    let res = app
        .get(&format!("/v1/chats/{chat}/messages?min_sequence=1"), &token)
        .await;

    assert_problem(res, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn min_sequence_the_chat_never_reached_is_422_for_a_member_and_404_for_an_unknown_chat() {
    let app = spawn_app_with(short_wait()).await;
    let alice = app.user("alice").await;
    let token = app.login(alice, "phone").await;
    let chat = app.chat("group", None, &[(alice, "admin")]).await;
    stored_at(&app, chat, 1).await;
    let res = app
        .get(&format!("/v1/chats/{chat}?min_sequence=2"), &token)
        .await;
    assert_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    let unknown = parley_schemas::ChatId::new();
    let res = app
        .get(&format!("/v1/chats/{unknown}?min_sequence=1"), &token)
        .await;
    assert_problem(res, StatusCode::NOT_FOUND).await;
}
