//! `GET /v1/chats/{chat_id}/messages`: paging, message shape, and parameter errors.

use parley_schemas::{ChatId, UserId};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, assert_problem, sequences, spawn_app};

/// A chat of alice and bob holding 120 messages, with a non-message event between each two so
/// sequences have gaps, as in real chats. Returns the token, the chat, and the sequences.
async fn chat_with_120_messages(app: &TestApp) -> (String, ChatId, Vec<i64>) {
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let token = app.login(alice, "phone").await;
    let chat = app
        .chat("group", None, &[(alice, "admin"), (bob, "member")])
        .await;
    let mut seqs = Vec::new();
    for i in 0..120 {
        let sender = if i % 3 == 0 { alice } else { bob };
        seqs.push(app.message(chat, sender, &format!("message {i}")).await);
        app.bump(chat).await;
    }
    (token, chat, seqs)
}

#[tokio::test]
async fn history_pages_backwards_from_the_newest_through_every_message_in_order() {
    let app = spawn_app().await;
    let (token, chat, all) = chat_with_120_messages(&app).await;

    let newest = app
        .get_json(&format!("/v1/chats/{chat}/messages"), &token)
        .await;
    assert_eq!(sequences(&newest), all[70..]);
    assert_eq!(newest["has_more"], true);

    let mut read = sequences(&newest);
    let mut has_more = true;
    while has_more {
        let before = read[0];
        let page = app
            .get_json(
                &format!("/v1/chats/{chat}/messages?before={before}&limit=50"),
                &token,
            )
            .await;
        has_more = page["has_more"].as_bool().unwrap();
        read.splice(0..0, sequences(&page));
    }
    assert_eq!(read, all);
}

#[tokio::test]
async fn history_pages_forwards_from_the_start_through_every_message_in_order() {
    let app = spawn_app().await;
    let (token, chat, all) = chat_with_120_messages(&app).await;

    let mut read = Vec::new();
    let mut after = 0;
    let mut pages = 0;
    loop {
        let page = app
            .get_json(
                &format!("/v1/chats/{chat}/messages?after={after}&limit=50"),
                &token,
            )
            .await;
        pages += 1;
        read.extend(sequences(&page));
        after = *read.last().unwrap();
        if page["has_more"] == false {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(read, all);
    let bodies: Vec<String> = (0..120).map(|i| format!("message {i}")).collect();
    let page = app
        .get_json(
            &format!("/v1/chats/{chat}/messages?after=0&limit=200"),
            &token,
        )
        .await;
    let got: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(got, bodies);
}

#[tokio::test]
async fn history_has_more_is_exact_at_the_page_boundary() {
    let app = spawn_app().await;
    let (token, chat, all) = chat_with_120_messages(&app).await;
    let path = |q: &str| format!("/v1/chats/{chat}/messages?{q}");

    let exact = app.get_json(&path("after=0&limit=120"), &token).await;
    assert_eq!(
        (sequences(&exact).len(), exact["has_more"].clone()),
        (120, json!(false))
    );
    let one_short = app.get_json(&path("after=0&limit=119"), &token).await;
    assert_eq!(one_short["has_more"], true);
    let newest = app.get_json(&path("limit=120"), &token).await;
    assert_eq!(newest["has_more"], false);
    let before_first = app
        .get_json(&path(&format!("before={}", all[0])), &token)
        .await;
    assert_eq!(before_first, json!({"messages": [], "has_more": false}));
    let after_last = app
        .get_json(&path(&format!("after={}", all[119])), &token)
        .await;
    assert_eq!(after_last, json!({"messages": [], "has_more": false}));
    let before_2 = app
        .get_json(&path(&format!("before={}&limit=2", all[3])), &token)
        .await;
    assert_eq!(sequences(&before_2), all[1..3]);
    assert_eq!(before_2["has_more"], true);
}

#[tokio::test]
async fn history_shows_messages_in_full_and_deleted_ones_without_body() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let token = app.login(alice, "phone").await;
    let chat = app.chat("group", None, &[(alice, "admin")]).await;
    let kept = app.message(chat, alice, "kept").await;
    let gone = app.message(chat, alice, "secret").await;
    let attachment = uuid::Uuid::now_v7();
    sqlx::query(
        "UPDATE messages SET attachments = $3, edited_at = sent_at, reply_to = \
         (SELECT message_id FROM messages WHERE chat_id = $1 AND sequence = $4) \
         WHERE chat_id = $1 AND sequence = $2",
    )
    .bind(chat.as_uuid())
    .bind(kept)
    .bind(json!([{"attachment_id": attachment, "content_type": "image/png", "size": 12, "filename": "a.png"}]))
    .bind(gone)
    .execute(app.pg())
    .await
    .unwrap();
    // A projector that forgot to clear the body must still not leak it.
    sqlx::query("UPDATE messages SET deleted = true WHERE chat_id = $1 AND sequence = $2")
        .bind(chat.as_uuid())
        .bind(gone)
        .execute(app.pg())
        .await
        .unwrap();

    let page = app
        .get_json(&format!("/v1/chats/{chat}/messages"), &token)
        .await;

    let (k, g) = (&page["messages"][0], &page["messages"][1]);
    assert_eq!(k["body"], "kept");
    assert_eq!(k["sender_id"], alice.to_string());
    assert_eq!(k["deleted"], false);
    assert_eq!(k["edited_at"], k["sent_at"]);
    assert_eq!(k["reply_to"], g["message_id"]);
    assert_eq!(
        k["attachments"],
        json!([{"attachment_id": attachment.to_string(), "content_type": "image/png", "size": 12, "filename": "a.png"}])
    );
    assert_eq!(k["reactions"], json!({}));
    assert_eq!(g["sequence"], gone);
    assert_eq!(g["body"], serde_json::Value::Null);
    assert_eq!(g["deleted"], true);
    assert_eq!(g["attachments"], json!([]));
    assert!(g["message_id"].is_string());
    assert_eq!(g["edited_at"], serde_json::Value::Null);
}

async fn member_token_and_chat(app: &TestApp) -> (String, ChatId) {
    let alice: UserId = app.user("alice").await;
    let token = app.login(alice, "phone").await;
    let chat = app.chat("group", None, &[(alice, "admin")]).await;
    app.message(chat, alice, "hello").await;
    (token, chat)
}

#[tokio::test]
async fn history_limit_of_zero_or_above_200_is_422() {
    let app = spawn_app().await;
    let (token, chat) = member_token_and_chat(&app).await;

    for q in [
        "limit=0",
        "limit=201",
        "limit=99999999999",
        "before=5&limit=0",
        "after=1&limit=1000",
    ] {
        let res = app
            .get(&format!("/v1/chats/{chat}/messages?{q}"), &token)
            .await;
        let body = assert_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(
            body["detail"].as_str().unwrap().contains("limit"),
            "{q}: {body}"
        );
    }
    let max = app
        .get_json(&format!("/v1/chats/{chat}/messages?limit=200"), &token)
        .await;
    assert_eq!(sequences(&max), [2]);
}

#[tokio::test]
async fn history_with_before_and_after_together_is_400() {
    let app = spawn_app().await;
    let (token, chat) = member_token_and_chat(&app).await;

    let res = app
        .get(
            &format!("/v1/chats/{chat}/messages?before=9&after=1"),
            &token,
        )
        .await;

    let body = assert_problem(res, StatusCode::BAD_REQUEST).await;
    assert!(
        body["detail"].as_str().unwrap().contains("before"),
        "{body}"
    );
}

#[tokio::test]
async fn history_with_unparseable_parameters_is_400_naming_the_parameter() {
    let app = spawn_app().await;
    let (token, chat) = member_token_and_chat(&app).await;

    for (q, name) in [
        ("before=abc", "before"),
        ("before=-1", "before"),
        ("after=1.5", "after"),
        ("after=", "after"),
        ("limit=ten", "limit"),
        ("limit=-5", "limit"),
        ("min_sequence=x", "min_sequence"),
    ] {
        let res = app
            .get(&format!("/v1/chats/{chat}/messages?{q}"), &token)
            .await;
        let body = assert_problem(res, StatusCode::BAD_REQUEST).await;
        assert!(
            body["detail"].as_str().unwrap().contains(name),
            "{q}: {body}"
        );
    }
}
