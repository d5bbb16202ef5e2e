//! The public contract end to end: sign-up → chat → messages over HTTP → live frames on the
//! other member's socket → history pages; and what non-members and bad input get.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::spawn_app;
use serde_json::json;

#[tokio::test]
async fn hundred_messages_arrive_live_in_order_and_read_back_complete_through_history() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let eve = app.signup("eve").await;
    let mut bob_ws = app.socket(&bob.token).await;
    let mut eve_ws = app.socket(&eve.token).await;
    let chat = app.group(&ada, &[&bob]).await;

    let mut last_seq = 0;
    for i in 0..100 {
        let (s, body) = app
            .post(
                &format!("/v1/chats/{chat}/messages"),
                Some(&ada.token),
                json!({"body": format!("message {i}")}),
            )
            .await;
        assert_eq!(s, 201, "{body}");
        last_seq = body["sequence"].as_u64().unwrap();
    }
    assert_eq!(last_seq, 101, "created is 1, then 100 messages");

    // Bob's socket: the chat's creation, then the 100 messages, contiguous and in order.
    let mut expected = 1;
    while expected <= 101 {
        let f = bob_ws
            .next_event(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("frame {expected} never arrived"));
        assert_eq!(f["chat_id"], chat.as_str());
        let seq = f["sequence"].as_u64().unwrap();
        if seq < expected {
            continue; // a duplicate is allowed; clients drop them
        }
        assert_eq!(seq, expected, "gap or reorder: {f}");
        if expected == 1 {
            assert_eq!(f["type"], "chatUpdate");
            assert_eq!(f["update"]["kind"], "created");
        } else {
            assert_eq!(f["type"], "newMessage");
            assert_eq!(f["message"]["body"], format!("message {}", expected - 2));
            assert_eq!(f["message"]["sender_id"], ada.user_id.as_str());
        }
        expected += 1;
    }

    // History, paged backwards 30 at a time, holds all 100 exactly once, in order.
    let mut bodies = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let q = match before {
            Some(b) => format!("before={b}&limit=30&min_sequence=101"),
            None => "limit=30&min_sequence=101".into(),
        };
        let (s, page) = app
            .get(&format!("/v1/chats/{chat}/messages?{q}"), Some(&bob.token))
            .await;
        assert_eq!(s, 200, "{page}");
        let msgs = page["messages"].as_array().unwrap();
        let mut chunk: Vec<String> = msgs
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_owned())
            .collect();
        chunk.extend(bodies);
        bodies = chunk;
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        before = msgs.first().map(|m| m["sequence"].as_u64().unwrap());
    }
    let want: Vec<String> = (0..100).map(|i| format!("message {i}")).collect();
    assert_eq!(bodies, want);

    // Eve is not a member: 404 everywhere, and no frame of this chat ever reached her.
    for path in [
        format!("/v1/chats/{chat}"),
        format!("/v1/chats/{chat}/messages"),
    ] {
        let (s, body) = app.get(&path, Some(&eve.token)).await;
        assert_eq!(s, 404, "{path}: {body}");
    }
    let (s, _) = app
        .post(
            &format!("/v1/chats/{chat}/messages"),
            Some(&eve.token),
            json!({"body": "hi"}),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = app
        .post(
            &format!("/v1/chats/{chat}/participants"),
            Some(&eve.token),
            json!({"add": [eve.user_id]}),
        )
        .await;
    assert_eq!(s, 404);
    assert!(
        eve_ws
            .next_event(Duration::from_millis(300))
            .await
            .is_none(),
        "a non-member received a frame"
    );
}

#[tokio::test]
async fn a_member_added_later_gets_live_frames_from_the_event_that_added_them() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chat = app.group(&ada, &[]).await;
    let mut bob_ws = app.socket(&bob.token).await;
    let (s, body) = app
        .post(
            &format!("/v1/chats/{chat}/participants"),
            Some(&ada.token),
            json!({"add": [bob.user_id]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["sequence"], 2);
    app.post(
        &format!("/v1/chats/{chat}/messages"),
        Some(&ada.token),
        json!({"body": "welcome"}),
    )
    .await;
    let first = bob_ws
        .next_event(Duration::from_secs(10))
        .await
        .expect("added frame");
    assert_eq!(first["sequence"], 2);
    assert_eq!(first["update"]["kind"], "participants_modified");
    let second = bob_ws
        .next_event(Duration::from_secs(10))
        .await
        .expect("message frame");
    assert_eq!(second["sequence"], 3);
    assert_eq!(second["message"]["body"], "welcome");
}

#[tokio::test]
async fn chat_list_and_detail_reflect_members_and_unread_messages() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chat = app.group(&ada, &[&bob]).await;
    let (_, sent) = app
        .post(
            &format!("/v1/chats/{chat}/messages"),
            Some(&ada.token),
            json!({"body": "one"}),
        )
        .await;
    let seq = sent["sequence"].as_u64().unwrap();
    let (s, detail) = app
        .get(
            &format!("/v1/chats/{chat}?min_sequence={seq}"),
            Some(&bob.token),
        )
        .await;
    assert_eq!(s, 200, "{detail}");
    assert_eq!(detail["members"].as_array().unwrap().len(), 2);
    let (s, list) = app.get("/v1/chats", Some(&bob.token)).await;
    assert_eq!(s, 200);
    let entry = &list["chats"][0];
    assert_eq!(entry["chat_id"], chat.as_str());
    assert_eq!(entry["unread_count"], 1);
    assert_eq!(entry["last_message"]["body"], "one");
    let (s, me) = app.get("/v1/me", Some(&bob.token)).await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(me["handle"], "bob");
}

#[tokio::test]
async fn a_sender_sees_sent_then_delivered_then_read() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chat = app.group(&ada, &[&bob]).await;
    let mut bob_ws = app.socket(&bob.token).await;
    let (_, sent) = app
        .post(
            &format!("/v1/chats/{chat}/messages"),
            Some(&ada.token),
            json!({"body": "ping"}),
        )
        .await;
    let seq = sent["sequence"].as_u64().unwrap();
    let message = sent["message_id"].as_str().unwrap().to_owned();
    let receipts = format!("/v1/chats/{chat}/messages/{message}/receipts?min_sequence={seq}");
    let (s, r) = app.get(&receipts, Some(&ada.token)).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r, json!({"delivered_to": [], "read_by": []}), "sent only");

    // Bob's device gets the message and acks it: delivered.
    loop {
        let f = bob_ws
            .next_event(Duration::from_secs(10))
            .await
            .expect("message frame");
        if f["sequence"].as_u64() == Some(seq) {
            break;
        }
    }
    bob_ws
        .send(json!({"type": "ack", "chat_id": chat, "sequence": seq}))
        .await;
    let delivered =
        parley_test_support::eventually(Duration::from_secs(10), "delivered receipt", || async {
            let (_, r) = app.get(&receipts, Some(&ada.token)).await;
            (r["delivered_to"] == json!([bob.user_id])).then_some(r)
        })
        .await;
    assert_eq!(delivered["read_by"], json!([]));

    // Bob reads: read, and his unread count drops to zero.
    let (_, list) = app.get("/v1/chats", Some(&bob.token)).await;
    assert_eq!(list["chats"][0]["unread_count"], 1);
    app.read_up_to(&bob, &chat, seq).await;
    parley_test_support::eventually(Duration::from_secs(10), "read receipt", || async {
        let (_, r) = app.get(&receipts, Some(&ada.token)).await;
        (r["read_by"] == json!([bob.user_id])).then_some(())
    })
    .await;
    let (_, list) = app.get("/v1/chats", Some(&bob.token)).await;
    assert_eq!(list["chats"][0]["unread_count"], 0);

    // Reading past the end, or a chat one is not in, is refused.
    let (s, _) = app
        .post(
            &format!("/v1/chats/{chat}/read"),
            Some(&bob.token),
            json!({"up_to": seq + 5}),
        )
        .await;
    assert_eq!(s, 422);
    let eve = app.signup("eve").await;
    let (s, _) = app
        .post(
            &format!("/v1/chats/{chat}/read"),
            Some(&eve.token),
            json!({"up_to": 1}),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = app.get(&receipts, Some(&eve.token)).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn min_sequence_beyond_the_chat_is_422_for_a_member_and_never_a_5xx() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chat = app.group(&ada, &[&bob]).await;
    let (s, _) = app
        .get(
            &format!("/v1/chats/{chat}?min_sequence=1"),
            Some(&ada.token),
        )
        .await;
    assert_eq!(s, 200);
    // Larger than any bigint: invalid at once.
    let (s, b) = app
        .get(
            &format!("/v1/chats/{chat}/messages?min_sequence=9223372036854775808"),
            Some(&ada.token),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    // A sequence the chat never reached: after the wait, 422 rather than "retry later".
    let (s, b) = app
        .get(
            &format!("/v1/chats/{chat}?min_sequence=999"),
            Some(&ada.token),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("beyond"), "{b}");
    // A chat that has no events at all is simply unknown: 404, as without min_sequence.
    let unknown = uuid::Uuid::now_v7();
    let (s, b) = app
        .get(
            &format!("/v1/chats/{unknown}?min_sequence=5"),
            Some(&ada.token),
        )
        .await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = app
        .get(
            &format!("/v1/chats?chat_id={unknown}&min_sequence=5"),
            Some(&ada.token),
        )
        .await;
    assert_eq!(s, 200, "the list shows nothing of it: {b}");
}
