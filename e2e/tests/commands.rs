//! Command rules and bad input through the public HTTP API: problem+json, never a 5xx, never
//! an event appended for a refused command.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::spawn_app;
use serde_json::{Value, json};

fn is_problem(body: &Value) -> bool {
    body["type"].is_string()
        && body["title"].is_string()
        && body["status"].is_u64()
        && body["detail"].is_string()
}

#[tokio::test]
async fn signup_rejects_taken_handles_and_invalid_fields_with_problem_json() {
    let app = spawn_app().await;
    app.signup("ada").await;
    let (s, b) = app
        .post(
            "/v1/users",
            None,
            json!({"handle": "ada", "display_name": "A", "password": "12345678"}),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(is_problem(&b));
    for bad in [
        json!({"handle": "Ada!", "display_name": "A", "password": "12345678"}),
        json!({"handle": "ab", "display_name": "A", "password": "12345678"}),
        json!({"handle": "abc", "display_name": "", "password": "12345678"}),
        json!({"handle": "abc", "display_name": "A", "password": "short"}),
    ] {
        let (s, b) = app.post("/v1/users", None, bad.clone()).await;
        assert_eq!(s, 422, "{bad} -> {b}");
        assert!(is_problem(&b));
    }
    for bad in [
        json!({"handle": "abc"}),
        json!({"handle": 5, "display_name": "A", "password": "12345678"}),
        json!([]),
    ] {
        let (s, b) = app.post("/v1/users", None, bad.clone()).await;
        assert_eq!(s, 400, "{bad} -> {b}");
        assert!(is_problem(&b));
    }
    let res = app
        .http
        .post(format!("{}/v1/users", app.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn login_fails_with_401_on_bad_credentials_and_409_on_a_sixth_device() {
    let app = spawn_app().await;
    app.signup("ada").await; // device 1
    let (s, _) = app
        .post(
            "/v1/sessions",
            None,
            json!({"handle": "ada", "password": "wrong password", "device_name": "x"}),
        )
        .await;
    assert_eq!(s, 401);
    let (s, _) = app
        .post(
            "/v1/sessions",
            None,
            json!({"handle": "nobody", "password": "wrong password", "device_name": "x"}),
        )
        .await;
    assert_eq!(s, 401);
    let mut devices = Vec::new();
    for _ in 0..4 {
        devices.push(app.login("ada").await);
    }
    let (s, b) = app
        .post(
            "/v1/sessions",
            None,
            json!({"handle": "ada", "password": "correct horse", "device_name": "six"}),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    // Removing one frees a slot, and its token stops working at once.
    let gone = devices.pop().unwrap();
    let res = app
        .http
        .delete(format!("{}/v1/devices/{}", app.base, gone.device_id))
        .bearer_auth(&devices[0].token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let (s, _) = app.get("/v1/me", Some(&gone.token)).await;
    assert_eq!(s, 401, "a removed device's token must stop working at once");
    app.login("ada").await;
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_same_answer_and_creates_nothing_new() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chat = app.group(&ada, &[&bob]).await;
    let send = |key: &'static str, body: &'static str| {
        app.http
            .post(format!("{}/v1/chats/{chat}/messages", app.base))
            .bearer_auth(&ada.token)
            .header("Idempotency-Key", key)
            .json(&json!({"body": body}))
            .send()
    };
    let first = send("k-1", "hello").await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = send("k-1", "hello").await.unwrap();
    assert_eq!(again.status(), 201);
    let again: Value = again.json().await.unwrap();
    assert_eq!(first, again);
    let other = send("k-1", "different").await.unwrap();
    assert_eq!(other.status(), 422);
    let (_, page) = app
        .get(
            &format!("/v1/chats/{chat}/messages?min_sequence=2"),
            Some(&bob.token),
        )
        .await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1, "{page}");
}

#[tokio::test]
async fn one_dm_per_pair_asking_again_returns_the_existing_one() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let (s, first) = app
        .post(
            "/v1/chats",
            Some(&ada.token),
            json!({"kind": "dm", "members": [bob.user_id]}),
        )
        .await;
    assert_eq!(s, 201, "{first}");
    let (s, again) = app
        .post(
            "/v1/chats",
            Some(&bob.token),
            json!({"kind": "dm", "members": [ada.user_id]}),
        )
        .await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(first["chat_id"], again["chat_id"]);
    let (s, _) = app
        .post("/v1/chats", Some(&ada.token), json!({"kind": "dm", "members": [bob.user_id, ada.user_id, "0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3f"]}))
        .await;
    assert_eq!(s, 422);
}

#[tokio::test]
async fn participants_rules_admins_only_limits_and_leaving() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let cat = app.signup("cat").await;
    let chat = app.group(&ada, &[&bob]).await;
    let path = format!("/v1/chats/{chat}/participants");
    let (s, _) = app
        .post(&path, Some(&bob.token), json!({"add": [cat.user_id]}))
        .await;
    assert_eq!(s, 403);
    let (s, _) = app
        .post(&path, Some(&bob.token), json!({"remove": [bob.user_id]}))
        .await;
    assert_eq!(s, 200, "anyone may leave");
    let (s, _) = app
        .post(
            &format!("/v1/chats/{chat}/messages"),
            Some(&bob.token),
            json!({"body": "still here?"}),
        )
        .await;
    assert_eq!(s, 404, "a member who left can no longer send");
    // The limit here is 5 members (set by spawn_app): ada plus five more is one too many.
    let mut extra = Vec::new();
    for h in ["dan", "eli", "fay", "gus", "hal"] {
        extra.push(app.signup(h).await.user_id);
    }
    let (s, b) = app
        .post(&path, Some(&ada.token), json!({"add": extra}))
        .await;
    assert_eq!(s, 422, "{b}");
    let (s, b) = app
        .post(
            &path,
            Some(&ada.token),
            json!({"add": ["0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3f"]}),
        )
        .await;
    assert_eq!(s, 422, "unknown user: {b}");
}

#[tokio::test]
async fn bad_ids_tokens_and_bodies_get_4xx_problem_json_never_5xx() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let chat = app.group(&ada, &[]).await;
    for id in [
        "abc",
        "*",
        ">",
        "a.b",
        "chats.%3E",
        "%20",
        "0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3f.x",
    ] {
        let (s, b) = app
            .post(
                &format!("/v1/chats/{id}/messages"),
                Some(&ada.token),
                json!({"body": "x"}),
            )
            .await;
        assert_eq!(s, 404, "{id}: {b}");
        assert!(is_problem(&b));
    }
    let (s, _) = app
        .post(
            &format!("/v1/chats/{chat}/messages"),
            None,
            json!({"body": "x"}),
        )
        .await;
    assert_eq!(s, 401);
    let (s, _) = app
        .post(
            &format!("/v1/chats/{chat}/messages"),
            Some("not-a-token"),
            json!({"body": "x"}),
        )
        .await;
    assert_eq!(s, 401);
    for (body, want) in [
        (json!({"body": ""}), 422),
        (json!({"body": "   "}), 422),
        (json!({"body": "x".repeat(4001)}), 422),
        (json!({"body": 7}), 400),
        (json!({}), 400),
        (
            json!({"body": "x", "reply_to": "0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3f"}),
            422,
        ),
        (json!({"body": "x", "reply_to": "nope"}), 400),
        (
            json!({"body": "x", "attachments": vec!["0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3f"; 11]}),
            422,
        ),
    ] {
        let (s, b) = app
            .post(
                &format!("/v1/chats/{chat}/messages"),
                Some(&ada.token),
                body.clone(),
            )
            .await;
        assert_eq!(s, want, "{body} -> {b}");
        assert!(is_problem(&b), "{b}");
    }
    let huge = json!({"body": "x".repeat(200_000)});
    let (s, _) = app
        .post(
            &format!("/v1/chats/{chat}/messages"),
            Some(&ada.token),
            huge,
        )
        .await;
    assert_eq!(s, 413);
    // None of the refused commands appended anything: the chat is still at sequence 1.
    let (_, detail) = app
        .get(&format!("/v1/chats/{chat}"), Some(&ada.token))
        .await;
    assert_eq!(detail["last_sequence"], 1, "{detail}");
}

#[tokio::test]
async fn a_reply_must_name_a_message_of_the_same_chat() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let one = app.group(&ada, &[]).await;
    let two = app.group(&ada, &[]).await;
    let (_, sent) = app
        .post(
            &format!("/v1/chats/{one}/messages"),
            Some(&ada.token),
            json!({"body": "q"}),
        )
        .await;
    let target = sent["message_id"].as_str().unwrap();
    let (s, b) = app
        .post(
            &format!("/v1/chats/{one}/messages"),
            Some(&ada.token),
            json!({"body": "a", "reply_to": target}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, _) = app
        .post(
            &format!("/v1/chats/{two}/messages"),
            Some(&ada.token),
            json!({"body": "a", "reply_to": target}),
        )
        .await;
    assert_eq!(s, 422, "a reply across chats is refused");
}

#[tokio::test]
async fn openapi_document_is_served_and_names_every_route() {
    let app = spawn_app().await;
    let (s, doc) = app.get("/v1/openapi.json", None).await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/v1/users",
        "/v1/sessions",
        "/v1/devices/{device_id}",
        "/v1/chats",
        "/v1/chats/{chat_id}/participants",
        "/v1/chats/{chat_id}/messages",
        "/v1/me",
        "/v1/chats/{chat_id}",
        "/v1/ws",
        "/v1/chats/{chat_id}/read",
        "/v1/chats/{chat_id}/messages/{message_id}/receipts",
        "/v1/chats/{chat_id}/messages/{message_id}/thread",
        "/v1/chats/{chat_id}/members/{user_id}/role",
        "/v1/chats/{chat_id}/settings",
        "/v1/users/{user_id}/block",
        "/v1/channels",
        "/v1/users/{user_id}/presence",
        "/v1/inbox",
        "/v1/inbox/ack",
    ] {
        assert!(doc["paths"][path].is_object(), "OpenAPI lacks {path}");
    }
    let checked_in: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    assert_eq!(
        doc, checked_in,
        "docs/openapi.json is stale: run `cargo run -- openapi > docs/openapi.json`"
    );
}

/// The messages a connection named `name` has published, as the server counts them; panics
/// unless exactly one connection has that name.
async fn published_by(app: &common::TestApp, name: &str) -> u64 {
    let named: Vec<Value> = app
        .nats
        .connections()
        .await
        .into_iter()
        .filter(|c| c["name"] == name)
        .collect();
    assert_eq!(named.len(), 1, "connections named {name}: {named:?}");
    named[0]["in_msgs"].as_u64().expect("in_msgs")
}

#[tokio::test]
async fn commands_append_on_a_nats_connection_of_their_own() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chat = app.group(&ada, &[&bob]).await;
    let appends = parley_command_api::APPENDS_CONNECTION;
    let before = published_by(&app, appends).await;
    for i in 0..3 {
        app.send_message(&ada, &chat, &format!("m{i}")).await;
    }
    // Three sends are three appends (the message keys and snapshots are written elsewhere),
    // and the shared connection is still there for everything else.
    assert_eq!(published_by(&app, appends).await, before + 3);
    published_by(&app, parley_nats::CONNECTION_NAME).await;
}
