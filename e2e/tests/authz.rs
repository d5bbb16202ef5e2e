//! The authorization matrix: every chat- or resource-scoped route, and every client frame, is
//! denied to a caller without a token, with a malformed or revoked token, to a user who is not
//! a member, to a removed member, and (for per-user resources) to another user's device; a
//! denial is 401 or 404 (never a leak of existence) and changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::spawn_app;
use futures::SinkExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Routes that are the caller's own by construction (no chat or other user's resource in the
/// path), so "someone else's" does not apply; they still need a valid token.
const SELF_SCOPED: &[&str] = &[
    "/v1/attachments",
    "/v1/channels",
    "/v1/chats",
    "/v1/inbox",
    "/v1/inbox/ack",
    "/v1/me",
    "/v1/search",
    "/v1/users/{user_id}/block",
    "/v1/ws",
];
/// Routes anyone may call without a token.
const PUBLIC: &[&str] = &["/v1/users", "/v1/sessions"];

#[tokio::test]
async fn every_scoped_route_and_frame_is_denied_to_every_kind_of_stranger() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let eve = app.signup("eve").await; // never a member
    let rem = app.signup("rem").await; // a member, then removed
    let chat = app.group(&ada, &[&bob, &rem]).await;
    let (message, _) = app.send_message(&ada, &chat, "secret plans").await;
    let (s, b) = app
        .post(
            &format!("/v1/chats/{chat}/participants"),
            Some(&ada.token),
            json!({"remove": [rem.user_id]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    // An attachment carried by a message of the chat.
    let png = [&b"\x89PNG\r\n\x1a\n"[..], &[0u8; 64]].concat();
    let up = app
        .http
        .post(format!("{}/v1/attachments?filename=a.png", app.base))
        .bearer_auth(&ada.token)
        .header("content-type", "image/png")
        .body(png)
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 201);
    let attachment = up.json::<Value>().await.unwrap()["attachment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, sent) = app
        .post(
            &format!("/v1/chats/{chat}/messages"),
            Some(&ada.token),
            json!({"body": "see attached", "attachments": [attachment]}),
        )
        .await;
    assert_eq!(s, 201, "{sent}");
    let last = sent["sequence"].as_u64().unwrap();
    // A revoked token: ada's second device, removed.
    let second = app.login("ada").await;
    let (s, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/devices/{}", second.device_id),
            Some(&ada.token),
            None,
        )
        .await;
    assert_eq!(s, 204);
    // Wait until the read model holds everything, so a 404 below is a denial, not lag.
    let (s, _) = app
        .get(
            &format!("/v1/chats/{chat}?min_sequence={last}"),
            Some(&ada.token),
        )
        .await;
    assert_eq!(s, 200);

    let m = format!("/v1/chats/{chat}/messages/{message}");
    let scoped: Vec<(Method, String, &str, Option<Value>)> = vec![
        (
            Method::GET,
            format!("/v1/chats/{chat}"),
            "/v1/chats/{chat_id}",
            None,
        ),
        (
            Method::PATCH,
            format!("/v1/chats/{chat}"),
            "/v1/chats/{chat_id}",
            Some(json!({"title": "x"})),
        ),
        (
            Method::PUT,
            format!("/v1/chats/{chat}/members/{}/role", bob.user_id),
            "/v1/chats/{chat_id}/members/{user_id}/role",
            Some(json!({"role": "admin"})),
        ),
        (
            Method::GET,
            format!("/v1/chats/{chat}/messages"),
            "/v1/chats/{chat_id}/messages",
            None,
        ),
        (
            Method::POST,
            format!("/v1/chats/{chat}/messages"),
            "/v1/chats/{chat_id}/messages",
            Some(json!({"body": "hi"})),
        ),
        (
            Method::PATCH,
            m.clone(),
            "/v1/chats/{chat_id}/messages/{message_id}",
            Some(json!({"body": "x"})),
        ),
        (
            Method::DELETE,
            m.clone(),
            "/v1/chats/{chat_id}/messages/{message_id}",
            None,
        ),
        (
            Method::PUT,
            format!("{m}/reactions/%F0%9F%91%8D"),
            "/v1/chats/{chat_id}/messages/{message_id}/reactions/{emoji}",
            None,
        ),
        (
            Method::DELETE,
            format!("{m}/reactions/%F0%9F%91%8D"),
            "/v1/chats/{chat_id}/messages/{message_id}/reactions/{emoji}",
            None,
        ),
        (
            Method::GET,
            format!("{m}/receipts"),
            "/v1/chats/{chat_id}/messages/{message_id}/receipts",
            None,
        ),
        (
            Method::GET,
            format!("{m}/thread"),
            "/v1/chats/{chat_id}/messages/{message_id}/thread",
            None,
        ),
        (
            Method::POST,
            format!("/v1/chats/{chat}/participants"),
            "/v1/chats/{chat_id}/participants",
            Some(json!({"add": [eve.user_id]})),
        ),
        (
            Method::POST,
            format!("/v1/chats/{chat}/read"),
            "/v1/chats/{chat_id}/read",
            Some(json!({"up_to": 1})),
        ),
        (
            Method::PUT,
            format!("/v1/chats/{chat}/settings"),
            "/v1/chats/{chat_id}/settings",
            Some(json!({"muted": true})),
        ),
        (
            Method::GET,
            format!("/v1/chats/{chat}/stats"),
            "/v1/chats/{chat_id}/stats",
            None,
        ),
        (
            Method::GET,
            format!("/v1/attachments/{attachment}"),
            "/v1/attachments/{attachment_id}",
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/devices/{}", ada.device_id),
            "/v1/devices/{device_id}",
            None,
        ),
        (
            Method::GET,
            format!("/v1/users/{}/presence", ada.user_id),
            "/v1/users/{user_id}/presence",
            None,
        ),
    ];

    // Every path of the OpenAPI document is covered here, or is self-scoped or public.
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    let covered: BTreeSet<&str> = scoped.iter().map(|(_, _, t, _)| *t).collect();
    for path in doc["paths"].as_object().unwrap().keys() {
        assert!(
            covered.contains(path.as_str())
                || SELF_SCOPED.contains(&path.as_str())
                || PUBLIC.contains(&path.as_str()),
            "{path} is missing from the authorization matrix"
        );
    }

    let strangers: [(&str, Option<String>, u16); 5] = [
        ("no token", None, 401),
        ("malformed token", Some("not a token at all".into()), 401),
        ("revoked token", Some(second.token.clone()), 401),
        ("non-member", Some(eve.token.clone()), 404),
        ("removed member", Some(rem.token.clone()), 404),
    ];
    let mut denied = 0;
    for (who, token, want) in &strangers {
        for (method, path, template, body) in &scoped {
            let (s, b) = app
                .call(method.clone(), path, token.as_deref(), body.clone())
                .await;
            assert_eq!(s, *want, "{who}: {method} {template} -> {s} {b}");
            assert_eq!(
                b["status"], *want,
                "{who}: {method} {template}: not problem+json: {b}"
            );
            denied += 1;
        }
    }
    // Another user's device: bob (a member) cannot remove ada's device.
    let (s, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/devices/{}", ada.device_id),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(s, 404, "another user's device");

    // Nothing changed: the chat is where it was, the message intact, ada's device alive.
    let (s, v) = app
        .get(&format!("/v1/chats/{chat}"), Some(&ada.token))
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["last_sequence"], last, "{v}");
    let (s, v) = app
        .get(&format!("/v1/chats/{chat}/messages"), Some(&ada.token))
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["messages"][0]["body"], "secret plans", "{v}");
    let (s, _) = app.get("/v1/me", Some(&ada.token)).await;
    assert_eq!(s, 200);

    // Frames: a non-member's ack and typing for the chat get an error frame and no effect.
    let mut socket = app.socket(&eve.token).await;
    for frame in [
        json!({"type": "ack", "chat_id": chat, "sequence": 1}),
        json!({"type": "typing", "chat_id": chat}),
    ] {
        socket
            .ws
            .send(Message::text(frame.to_string()))
            .await
            .unwrap();
        let answer = socket
            .next_frame(Duration::from_secs(5))
            .await
            .expect("an answer");
        assert_eq!(answer["type"], "error", "{frame} -> {answer}");
    }
    // Bad tokens cannot open a socket at all.
    for token in ["not a token at all", second.token.as_str()] {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://127.0.0.1:{}/v1/ws", app.port),
            )
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let err = tokio_tungstenite::connect_async(req)
            .await
            .expect_err("a bad token connects");
        assert!(err.to_string().contains("401"), "{err}");
    }
    eprintln!(
        "authorization matrix: {denied} denials over {} routes",
        scoped.len()
    );
}
