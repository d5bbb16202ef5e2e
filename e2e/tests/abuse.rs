//! Abuse limits through the public HTTP API: sending, sign-up and log-in are rate limited with
//! 429 problem+json and `Retry-After`, a body flooded across chats is refused, and a refused
//! command appends nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{TestApp, spawn_app_with};
use parley_platform::Rate;
use serde_json::{Value, json};

/// POST that also returns `Retry-After`.
async fn post_raw(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Option<u64>, Value) {
    let mut req = app.http.post(format!("{}{path}", app.base)).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let retry = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let ct = res.headers().get("content-type").cloned();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    if status >= 400 {
        assert_eq!(ct.unwrap(), "application/problem+json", "{body}");
    }
    (status, retry, body)
}

#[tokio::test]
async fn sending_faster_than_the_per_user_rate_gets_429_with_retry_after_and_appends_nothing() {
    let app = spawn_app_with(|s| s.command.limits.send_per_user = Rate::per_minute(5)).await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chat = app.group(&ada, &[&bob]).await;
    let path = format!("/v1/chats/{chat}/messages");
    for i in 0..5 {
        let (s, _, b) = post_raw(
            &app,
            &path,
            Some(&ada.token),
            json!({"body": format!("m{i}")}),
        )
        .await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, retry, b) = post_raw(
        &app,
        &path,
        Some(&ada.token),
        json!({"body": "one too many"}),
    )
    .await;
    assert_eq!(s, 429, "{b}");
    assert_eq!(b["status"], 429);
    let retry = retry.expect("Retry-After header");
    assert!(
        (1..=12).contains(&retry),
        "one message comes back every 12 s, got {retry}"
    );
    // Another user is not limited by ada's budget.
    let (s, _, b) = post_raw(&app, &path, Some(&bob.token), json!({"body": "hi"})).await;
    assert_eq!(s, 201, "{b}");
    // Nothing was appended for the refused send: chat created, 5 + 1 messages.
    let (s, chat_view) = app
        .get(
            &format!("/v1/chats/{chat}?min_sequence=7"),
            Some(&ada.token),
        )
        .await;
    assert_eq!(s, 200, "{chat_view}");
    assert_eq!(chat_view["last_sequence"], 7);
}

#[tokio::test]
async fn one_body_flooded_across_chats_is_refused_as_spam() {
    let app = spawn_app_with(|s| s.command.limits.flood_max_chats = 2).await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let spam = json!({"body": "limited offer, click the link below now"});
    let mut chats = Vec::new();
    for _ in 0..3 {
        chats.push(app.group(&ada, &[&bob]).await);
    }
    for chat in &chats[..2] {
        let (s, _, b) = post_raw(
            &app,
            &format!("/v1/chats/{chat}/messages"),
            Some(&ada.token),
            spam.clone(),
        )
        .await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, retry, b) = post_raw(
        &app,
        &format!("/v1/chats/{}/messages", chats[2]),
        Some(&ada.token),
        spam,
    )
    .await;
    assert_eq!(s, 429, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("spam"), "{b}");
    assert!(retry.is_some());
}

#[tokio::test]
async fn log_in_attempts_per_handle_are_limited_even_with_the_right_password() {
    let app = spawn_app_with(|s| s.command.limits.login_per_handle = Rate::per_minute(3)).await;
    app.signup("ada").await; // the first attempt
    for _ in 0..2 {
        let (s, _, b) = post_raw(
            &app,
            "/v1/sessions",
            None,
            json!({"handle": "ada", "password": "wrong password", "device_name": "x"}),
        )
        .await;
        assert_eq!(s, 401, "{b}");
    }
    let (s, retry, b) = post_raw(
        &app,
        "/v1/sessions",
        None,
        json!({"handle": "ada", "password": "correct horse", "device_name": "x"}),
    )
    .await;
    assert_eq!(s, 429, "{b}");
    assert!(retry.unwrap() >= 1);
    // Other handles are unaffected.
    app.signup("bob").await;
}

#[tokio::test]
async fn sign_ups_per_address_are_limited() {
    let app = spawn_app_with(|s| s.command.limits.signup_per_ip = Rate::per_minute(2)).await;
    for h in ["ada", "bob"] {
        let (s, _, b) = post_raw(
            &app,
            "/v1/users",
            None,
            json!({"handle": h, "display_name": h, "password": "12345678"}),
        )
        .await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, retry, b) = post_raw(
        &app,
        "/v1/users",
        None,
        json!({"handle": "cyd", "display_name": "c", "password": "12345678"}),
    )
    .await;
    assert_eq!(s, 429, "{b}");
    assert!(retry.is_some());
    // The refused sign-up created nobody: "cyd" cannot log in.
    let (s, _, b) = post_raw(
        &app,
        "/v1/sessions",
        None,
        json!({"handle": "cyd", "password": "12345678", "device_name": "x"}),
    )
    .await;
    assert_eq!(s, 401, "{b}");
}
