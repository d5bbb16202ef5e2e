//! The delivery guarantee through the whole system (real projector, real gateway): offline
//! devices catch up in order with no gap at the seam, acks are per device.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Socket, spawn_app};
use serde_json::json;

/// Reads frames until every chat in `want` reached its last sequence; asserts per-chat order
/// with no gap (duplicates of already-seen sequences are allowed and dropped).
async fn drain_in_order(
    ws: &mut Socket,
    next: &mut HashMap<String, u64>,
    want: &HashMap<String, u64>,
) {
    while want
        .iter()
        .any(|(c, last)| next.get(c).copied().unwrap_or(1) <= *last)
    {
        let f = ws
            .next_event(Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("stalled at {next:?}, want {want:?}"));
        let chat = f["chat_id"].as_str().unwrap().to_owned();
        let seq = f["sequence"].as_u64().unwrap();
        let expected = next.entry(chat.clone()).or_insert(1);
        if seq < *expected {
            continue;
        }
        assert_eq!(seq, *expected, "gap or reorder in {chat}: {f}");
        *expected += 1;
    }
}

#[tokio::test]
async fn an_offline_device_gets_all_500_messages_of_3_chats_in_order_then_live_with_no_gap() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chats = [
        app.group(&ada, &[&bob]).await,
        app.group(&ada, &[&bob]).await,
        app.group(&ada, &[&bob]).await,
    ];
    // Bob is offline while Ada sends 500 messages across the three chats.
    let mut last: HashMap<String, u64> = HashMap::new();
    for i in 0..500 {
        let chat = &chats[i % 3];
        let (s, b) = app
            .post(
                &format!("/v1/chats/{chat}/messages"),
                Some(&ada.token),
                json!({"body": format!("m{i}")}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        last.insert(chat.clone(), b["sequence"].as_u64().unwrap());
    }
    let mut ws = app.socket(&bob.token).await;
    let mut next = HashMap::new();
    drain_in_order(&mut ws, &mut next, &last).await;
    let total: u64 = last.values().map(|l| l - 1).sum();
    assert_eq!(total, 500, "every message counted once");

    // Then live, continuing each chat's sequence with no gap at the seam.
    let (_, b) = app
        .post(
            &format!("/v1/chats/{}/messages", chats[1]),
            Some(&ada.token),
            json!({"body": "live"}),
        )
        .await;
    let live_seq = b["sequence"].as_u64().unwrap();
    assert_eq!(live_seq, last[&chats[1]] + 1);
    last.insert(chats[1].clone(), live_seq);
    drain_in_order(&mut ws, &mut next, &last).await;
}

#[tokio::test]
async fn acks_are_per_device_and_acked_events_are_not_sent_again() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob_phone = app.signup("bob").await;
    let bob_laptop = app.login("bob").await;
    let chat = app.group(&ada, &[&bob_phone]).await;
    let mut last = 1;
    for i in 0..5 {
        let (_, b) = app
            .post(
                &format!("/v1/chats/{chat}/messages"),
                Some(&ada.token),
                json!({"body": format!("m{i}")}),
            )
            .await;
        last = b["sequence"].as_u64().unwrap();
    }
    let want = HashMap::from([(chat.clone(), last)]);

    // The phone reads everything and acks it all, then disconnects.
    let mut phone = app.socket(&bob_phone.token).await;
    drain_in_order(&mut phone, &mut HashMap::new(), &want).await;
    phone
        .send(json!({"type": "ack", "chat_id": chat, "sequence": last}))
        .await;
    parley_test_support::eventually(
        Duration::from_secs(10),
        "the phone's ack to be recorded",
        || async {
            let (_, r) = app
                .get(
                    &format!("/v1/chats/{chat}/messages?limit=1"),
                    Some(&ada.token),
                )
                .await;
            let msg = r["messages"][0]["message_id"].as_str()?.to_owned();
            let (_, rec) = app
                .get(
                    &format!("/v1/chats/{chat}/messages/{msg}/receipts"),
                    Some(&ada.token),
                )
                .await;
            (rec["delivered_to"] == json!([bob_phone.user_id])).then_some(())
        },
    )
    .await;
    drop(phone);

    // The laptop still gets everything: the phone's ack is the phone's.
    let mut laptop = app.socket(&bob_laptop.token).await;
    drain_in_order(&mut laptop, &mut HashMap::new(), &want).await;

    // The phone reconnects: nothing it acked comes again; the next message does.
    let mut phone = app.socket(&bob_phone.token).await;
    let (_, b) = app
        .post(
            &format!("/v1/chats/{chat}/messages"),
            Some(&ada.token),
            json!({"body": "new"}),
        )
        .await;
    let f = phone
        .next_event(Duration::from_secs(10))
        .await
        .expect("the new message");
    assert_eq!(
        f["sequence"], b["sequence"],
        "acked events were sent again: {f}"
    );
}

#[tokio::test]
async fn a_gateway_restarted_mid_stream_loses_nothing_after_reconnect() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chat = app.group(&ada, &[&bob]).await;
    let (port, stop) = app.spawn_gateway().await;
    let mut ws = app.socket_at(port, &bob.token).await;
    let mut next = HashMap::new();
    let send = |i: usize| {
        let chat = chat.clone();
        let token = ada.token.clone();
        let app = &app;
        async move {
            let (s, b) = app
                .post(
                    &format!("/v1/chats/{chat}/messages"),
                    Some(&token),
                    json!({"body": format!("m{i}")}),
                )
                .await;
            assert_eq!(s, 201, "{b}");
            b["sequence"].as_u64().unwrap()
        }
    };
    let mut last = 0;
    for i in 0..50 {
        last = send(i).await;
    }
    drain_in_order(&mut ws, &mut next, &HashMap::from([(chat.clone(), 20)])).await;
    // The gateway dies mid-stream while messages keep coming; the device never acked.
    stop.cancel();
    for i in 50..100 {
        last = send(i).await;
    }
    let (port, _stop) = app.spawn_gateway().await;
    let mut ws = app.socket_at(port, &bob.token).await;
    // After reconnecting it continues where it was (duplicates allowed, gaps not).
    for i in 100..120 {
        last = send(i).await;
    }
    drain_in_order(&mut ws, &mut next, &HashMap::from([(chat.clone(), last)])).await;
    assert_eq!(last, 121);
}
