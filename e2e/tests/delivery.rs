//! The delivery guarantee through the whole system (real projector, real gateway): offline
//! devices catch up in order with no gap at the seam, acks are per device; receipt and
//! presence frames; the HTTP inbox.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Socket, TestApp, User, spawn_app, spawn_app_with};
use parley_test_support::eventually;
use serde_json::{Value, json};

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

// The laptop's device is added before the chat exists, so it must get the chat's `created`
// whichever of the users and chats projections applies its event first (this once caught a
// cursor started at the chat's sequence *at projection time*).
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

async fn send_message(app: &TestApp, from: &User, chat: &str, body: &str) -> u64 {
    app.send_message(from, chat, body).await.1
}

/// Reads chat events until `seq` of `chat`, returning every frame seen on the way (of any type).
async fn frames_until(ws: &mut Socket, chat: &str, seq: u64) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let f = ws
            .next_frame(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("sequence {seq} never arrived; saw {seen:?}"));
        let done = f["chat_id"] == chat && f["sequence"].as_u64() == Some(seq);
        seen.push(f);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn the_sender_sees_delivered_then_read_receipt_frames_and_the_reader_gets_none_of_its_own() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chat = app.group(&ada, &[&bob]).await;
    let mut ada_ws = app.socket(&ada.token).await;
    let mut bob_ws = app.socket(&bob.token).await;
    let seq = send_message(&app, &ada, &chat, "hello").await;
    frames_until(&mut bob_ws, &chat, seq).await;
    // Ada's socket may have opened before the new group was projected; receipts reach it once
    // it follows the chat, which it shows by delivering the message (docs/delivery.md).
    frames_until(&mut ada_ws, &chat, seq).await;

    bob_ws
        .send(json!({"type": "ack", "chat_id": chat, "sequence": seq}))
        .await;
    let delivered = ada_ws
        .next_of_type("receipt", Duration::from_secs(10))
        .await
        .expect("a delivered receipt frame");
    assert_eq!(
        delivered,
        json!({"type": "receipt", "chat_id": chat, "user_id": bob.user_id, "delivered_up_to": seq})
    );

    app.read_up_to(&bob, &chat, seq).await;
    let read = ada_ws
        .next_of_type("receipt", Duration::from_secs(10))
        .await
        .expect("a read receipt frame");
    assert_eq!(
        read,
        json!({"type": "receipt", "chat_id": chat, "user_id": bob.user_id, "read_up_to": seq})
    );

    // Both receipts were fanned out before this message reached the chat's live feed, so Bob's
    // socket would have them ahead of it.
    let next = send_message(&app, &ada, &chat, "after the receipts").await;
    let bobs = frames_until(&mut bob_ws, &chat, next).await;
    assert!(
        !bobs.iter().any(|f| f["type"] == "receipt"),
        "bob got receipts about himself: {bobs:?}"
    );
}

#[tokio::test]
async fn presence_goes_online_then_offline_after_the_ttl_and_a_co_member_gets_both_frames() {
    let app = spawn_app_with(|s| s.infra.jetstream.presence_ttl = Duration::from_secs(2)).await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let eve = app.signup("eve").await;
    let chat = app.group(&ada, &[&bob]).await;
    let presence_of_ada = format!("/v1/users/{}/presence", ada.user_id);
    // Contacts come from the read model: Bob's socket must find the group there.
    eventually(
        Duration::from_secs(10),
        "the group in bob's chats",
        || async {
            let (_, b) = app.get("/v1/chats", Some(&bob.token)).await;
            (b["chats"][0]["chat_id"] == chat.as_str()).then_some(())
        },
    )
    .await;
    let (s, never) = app.get(&presence_of_ada, Some(&bob.token)).await;
    assert_eq!(
        (s, never),
        (200, json!({"online": false, "last_seen_at": null}))
    );
    let (s, _) = app.get(&presence_of_ada, Some(&eve.token)).await;
    assert_eq!(s, 404, "eve shares no chat with ada");
    let (s, _) = app
        .get(
            &format!("/v1/users/{}/presence", uuid::Uuid::now_v7()),
            Some(&bob.token),
        )
        .await;
    assert_eq!(s, 404, "an unknown user looks like a stranger");

    let mut bob_ws = app.socket(&bob.token).await;
    let ada_ws = app.socket(&ada.token).await;
    let online = bob_ws
        .next_of_type("presence", Duration::from_secs(10))
        .await
        .expect("ada's online frame");
    assert_eq!(online["user_id"], ada.user_id.as_str());
    assert_eq!(online["online"], true, "{online}");
    let (_, now) = app.get(&presence_of_ada, Some(&bob.token)).await;
    assert_eq!(now["online"], true, "{now}");
    let (s, own) = app.get(&presence_of_ada, Some(&ada.token)).await;
    assert_eq!((s, &own["online"]), (200, &json!(true)), "{own}");

    drop(ada_ws);
    let offline = bob_ws
        .next_of_type("presence", Duration::from_secs(10))
        .await
        .expect("ada's offline frame, once her heartbeat is older than the TTL");
    assert_eq!(offline["user_id"], ada.user_id.as_str());
    assert_eq!(offline["online"], false, "{offline}");
    assert!(offline["last_seen_at"].is_string(), "{offline}");
    let (_, after) = app.get(&presence_of_ada, Some(&bob.token)).await;
    assert_eq!(after["online"], false, "{after}");
    assert!(
        after["last_seen_at"].is_string(),
        "last seen survives: {after}"
    );
}

async fn inbox(app: &TestApp, user: &User, query: &str) -> Value {
    let (s, b) = app
        .get(&format!("/v1/inbox{query}"), Some(&user.token))
        .await;
    assert_eq!(s, 200, "{b}");
    b
}

fn sequences(page: &Value) -> Vec<u64> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn the_http_inbox_pages_unacked_events_and_an_ack_removes_them_from_inbox_and_socket() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let eve = app.signup("eve").await;
    let chat = app.group(&ada, &[&bob]).await;
    let not_bobs = app.group(&ada, &[&eve]).await;
    let mut last = 0;
    for i in 0..5 {
        last = send_message(&app, &ada, &chat, &format!("m{i}")).await;
    }
    assert_eq!(last, 6);
    eventually(
        Duration::from_secs(10),
        "all 6 events in bob's inbox",
        || async { (sequences(&inbox(&app, &bob, "?limit=500").await).len() == 6).then_some(()) },
    )
    .await;

    // Paged: the same frames the socket sends, in order, with no overlap.
    let first = inbox(&app, &bob, "?limit=4").await;
    assert_eq!(sequences(&first), vec![1, 2, 3, 4]);
    assert_eq!(first["has_more"], true);
    assert_eq!(first["events"][0]["type"], "chatUpdate");
    assert_eq!(first["events"][1]["type"], "newMessage");
    assert_eq!(first["events"][1]["message"]["body"], "m0");
    let next = first["next"].as_str().unwrap();
    let second = inbox(&app, &bob, &format!("?limit=4&after={next}")).await;
    assert_eq!(sequences(&second), vec![5, 6]);
    assert_eq!(second["has_more"], false);
    assert!(second["next"].is_null());

    // Acks are validated like the ack frame.
    let ack = |chat: &str, sequence: u64| json!({"chat_id": chat, "sequence": sequence});
    let (s, _) = app
        .post("/v1/inbox/ack", Some(&bob.token), ack(&chat, 99))
        .await;
    assert_eq!(s, 422, "beyond the chat's last sequence");
    let (s, _) = app
        .post("/v1/inbox/ack", Some(&bob.token), ack(&chat, 0))
        .await;
    assert_eq!(s, 422);
    let (s, _) = app
        .post("/v1/inbox/ack", Some(&bob.token), ack(&not_bobs, 1))
        .await;
    assert_eq!(s, 404, "not bob's chat");
    let (s, _) = app.get("/v1/inbox?limit=0", Some(&bob.token)).await;
    assert_eq!(s, 422);

    let (s, b) = app
        .post("/v1/inbox/ack", Some(&bob.token), ack(&chat, 4))
        .await;
    assert_eq!(s, 204, "{b}");
    assert_eq!(sequences(&inbox(&app, &bob, "").await), vec![5, 6]);
    let (s, _) = app
        .post("/v1/inbox/ack", Some(&bob.token), ack(&chat, last))
        .await;
    assert_eq!(s, 204);
    let empty = inbox(&app, &bob, "").await;
    assert_eq!(
        (sequences(&empty), &empty["has_more"]),
        (vec![], &json!(false))
    );

    // A socket of the same device resends nothing acked: the first event is the next message.
    let mut ws = app.socket(&bob.token).await;
    let new = send_message(&app, &ada, &chat, "new").await;
    let f = ws
        .next_event(Duration::from_secs(10))
        .await
        .expect("the new message");
    assert_eq!(f["sequence"], new, "acked events were sent again: {f}");
}
