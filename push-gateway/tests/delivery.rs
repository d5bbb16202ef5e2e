//! The delivery guarantee: every event above the device's cursor, in order, once per connection,
//! across the replay/live seam, gaps, projection lag, acks and membership changes — against a
//! real NATS server and PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use parley_push_gateway::GatewayConfig;
use parley_schemas::cloudevent::decode;
use parley_schemas::{ReceiptEvent, UserId};
use parley_test_support::{eventually, last_stored};
use serde_json::json;
use support::{Chat, Device, Harness};

#[tokio::test]
async fn live_messages_arrive_in_order_as_new_message_frames() {
    let h = Harness::start().await;
    let alice = h.login().await;
    let bob = UserId::new();
    let chat = h.create_chat(alice.user, &[bob]).await;
    let mut c = h.connect(&alice).await;
    let created = c.next_event().await;
    assert_eq!(created["type"], "chatUpdate");
    assert_eq!(created["sequence"], 1);
    assert_eq!(created["update"]["kind"], "created");

    for seq in 2..=6 {
        h.publish(&chat.message(seq, bob, &format!("hello {seq}")))
            .await;
    }
    for seq in 2..=6u64 {
        let v = c.next_event().await;
        assert_eq!(v["type"], "newMessage");
        assert_eq!(v["chat_id"], chat.id.to_string());
        assert_eq!(v["sequence"], seq);
        assert_eq!(v["message"]["sequence"], seq);
        assert_eq!(v["message"]["sender_id"], bob.to_string());
        assert_eq!(v["message"]["body"], format!("hello {seq}"));
        assert_eq!(v["message"]["deleted"], false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_events_replay_from_postgres_then_live_with_no_gap_or_duplicate_at_the_seam() {
    let h = Harness::start().await;
    let alice = h.login().await;
    let bob = UserId::new();
    let chat = h.create_chat(alice.user, &[bob]).await;
    h.set_cursor(&alice, &chat, 1).await;
    for seq in 2..=51 {
        h.publish(&chat.message(seq, bob, "missed")).await;
    }
    // Events keep coming while the device connects and replays.
    let publisher = {
        let chat = Chat { id: chat.id };
        let h = &h;
        async move {
            for seq in 52..=81 {
                h.publish(&chat.message(seq, bob, "live")).await;
            }
        }
    };
    let connect = async {
        let mut c = h.connect(&alice).await;
        let seqs = c.sequences(&chat, 80).await;
        (c, seqs)
    };
    let ((mut c, seqs), ()) = tokio::join!(connect, publisher);
    assert_eq!(seqs, (2..=81).collect::<Vec<u64>>());
    // Nothing more, not a duplicate either.
    let extra = c.until_pong().await;
    assert!(extra.is_empty(), "unexpected frames: {extra:?}");
}

#[tokio::test]
async fn a_skipped_live_sequence_is_filled_from_postgres_in_order() {
    let h = Harness::start().await;
    let alice = h.login().await;
    let bob = UserId::new();
    let chat = h.create_chat(alice.user, &[bob]).await;
    let mut c = h.connect(&alice).await;
    assert_eq!(c.sequences(&chat, 1).await, vec![1]);
    // Sequence 2's live copy is lost; only the projector saw it.
    h.to_pg(&chat.message(2, bob, "lost live")).await;
    h.publish(&chat.message(3, bob, "three")).await;
    let a = c.next_event().await;
    let b = c.next_event().await;
    assert_eq!(
        (a["sequence"].as_u64(), b["sequence"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(a["message"]["body"], "lost live");
    assert_eq!(b["message"]["body"], "three");
}

#[tokio::test]
async fn a_gap_waits_for_the_projector_and_then_delivers_in_order() {
    let h = Harness::start().await;
    let alice = h.login().await;
    let bob = UserId::new();
    let chat = h.create_chat(alice.user, &[bob]).await;
    let mut c = h.connect(&alice).await;
    assert_eq!(c.sequences(&chat, 1).await, vec![1]);
    // Live 2 is due: sent before the projector has it.
    h.to_nats(&chat.message(2, bob, "two")).await;
    assert_eq!(c.sequences(&chat, 1).await, vec![2]);
    // 3's live copy is lost and it is not projected yet; 4 arrives live, not projected either.
    let three = chat.message(3, bob, "three");
    h.to_nats(&chat.message(4, bob, "four")).await;
    let early = c.until_pong().await;
    assert!(early.is_empty(), "4 must wait for 3: {early:?}");
    h.to_pg(&three).await;
    assert_eq!(c.sequences(&chat, 2).await, vec![3, 4]);
}

#[tokio::test]
async fn an_event_stored_before_connecting_but_not_yet_projected_is_delivered_once_projected() {
    let h = Harness::start().await;
    let alice = h.login().await;
    let bob = UserId::new();
    let chat = h.create_chat(alice.user, &[bob]).await;
    let two = chat.message(2, bob, "lagging");
    h.to_nats(&two).await;
    let mut c = h.connect(&alice).await;
    assert_eq!(c.sequences(&chat, 1).await, vec![1]);
    h.to_pg(&two).await;
    let v = c.next_event().await;
    assert_eq!(v["sequence"], 2);
    assert_eq!(v["message"]["body"], "lagging");
}

#[tokio::test]
async fn acks_become_delivered_receipts_and_acked_events_are_not_resent_after_reconnect() {
    let h = Harness::start().await;
    let alice = h.login().await;
    let bob = UserId::new();
    let chat = h.create_chat(alice.user, &[bob]).await;
    for seq in 2..=4 {
        h.publish(&chat.message(seq, bob, "m")).await;
    }
    let mut c = h.connect(&alice).await;
    assert_eq!(c.sequences(&chat, 4).await, vec![1, 2, 3, 4]);
    c.send_json(json!({"type": "ack", "chat_id": chat.id, "sequence": 2}))
        .await;
    c.send_json(json!({"type": "ack", "chat_id": chat.id, "sequence": 3}))
        .await;

    let receipt = wait_for_receipt(&h, &alice, &chat, 3).await;
    let ReceiptEvent::Delivered(d) = receipt.event else {
        panic!("expected a delivered receipt");
    };
    assert_eq!(
        (d.user_id, d.device_id, d.up_to),
        (alice.user, alice.device, 3)
    );
    assert_eq!(receipt.meta.sequence, 3);
    assert_eq!(receipt.meta.actor, alice.user);
    assert_eq!(receipt.meta.subject, chat.id.to_string());

    // The receipts projector's part, then reconnect.
    h.set_cursor(&alice, &chat, 3).await;
    drop(c);
    h.publish(&chat.message(5, bob, "m")).await;
    let mut c = h.connect(&alice).await;
    assert_eq!(c.sequences(&chat, 2).await, vec![4, 5]);
}

/// Two members' devices that ack within one flush interval make one event for the chat: a
/// `parley.receipt.delivered_batch.v1` holding both, whose actor is no single user.
#[tokio::test]
async fn acks_of_several_devices_in_one_interval_are_one_batch_event_for_the_chat() {
    let h = Harness::with_config(GatewayConfig {
        // No flush but the one at shutdown: both acks are surely in the same interval.
        ack_flush: Duration::from_secs(3600),
        ..GatewayConfig::default()
    })
    .await;
    let (alice, bob) = (h.login().await, h.login().await);
    let chat = h.create_chat(alice.user, &[bob.user]).await;
    h.publish(&chat.message(2, bob.user, "m")).await;
    let mut a = h.connect(&alice).await;
    let mut b = h.connect(&bob).await;
    assert_eq!(a.sequences(&chat, 2).await, vec![1, 2]);
    assert_eq!(b.sequences(&chat, 2).await, vec![1, 2]);
    a.send_json(json!({"type": "ack", "chat_id": chat.id, "sequence": 2}))
        .await;
    b.send_json(json!({"type": "ack", "chat_id": chat.id, "sequence": 1}))
        .await;
    // A connection handles its frames in order: after the pong, its ack is recorded.
    a.until_pong().await;
    b.until_pong().await;
    h.stack.infra.shutdown.cancel();

    let subject = format!("receipts.{}", chat.id);
    let msg = eventually(Duration::from_secs(10), "the flush at shutdown", || {
        last_stored(&h.stack.infra.js, "RECEIPTS", &subject)
    })
    .await;
    let event = decode::<ReceiptEvent>(&msg.payload).unwrap();
    let ReceiptEvent::DeliveredBatch(batch) = &event.event else {
        panic!("expected one batch event, got {:?}", event.event);
    };
    let mut got: Vec<_> = batch
        .receipts
        .iter()
        .map(|d| (d.user_id, d.device_id, d.up_to))
        .collect();
    got.sort();
    let mut want = vec![(alice.user, alice.device, 2), (bob.user, bob.device, 1)];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(event.meta.sequence, 2, "the highest watermark of the batch");
    assert_eq!(event.meta.actor, parley_schemas::events::SYSTEM_ACTOR);
    let msg_id = msg.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned();
    assert!(
        msg_id.starts_with(&format!("batch:{}:", chat.id)),
        "{msg_id}"
    );
}

#[tokio::test]
async fn an_ack_beyond_what_was_sent_is_refused_and_publishes_nothing() {
    let h = Harness::start().await;
    let alice = h.login().await;
    let bob = UserId::new();
    let chat = h.create_chat(alice.user, &[bob]).await;
    h.publish(&chat.message(2, bob, "m")).await;
    let mut c = h.connect(&alice).await;
    assert_eq!(c.sequences(&chat, 2).await, vec![1, 2]);

    c.send_json(json!({"type": "ack", "chat_id": chat.id, "sequence": 9}))
        .await;
    let err = c.next_json().await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("bad_ack"))
    );
    let elsewhere = parley_schemas::ChatId::new();
    c.send_json(json!({"type": "ack", "chat_id": elsewhere, "sequence": 1}))
        .await;
    assert_eq!(c.next_json().await["code"], "bad_ack");

    // A valid ack afterwards is the only receipt ever published for the chat.
    c.send_json(json!({"type": "ack", "chat_id": chat.id, "sequence": 2}))
        .await;
    wait_for_receipt(&h, &alice, &chat, 2).await;
    let mut stream = h.stack.infra.js.get_stream("RECEIPTS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}

#[tokio::test]
async fn a_removed_member_gets_its_removal_then_nothing_more_of_that_chat() {
    let h = Harness::start().await;
    let alice = UserId::new();
    let bob = h.login().await;
    let chat = h.create_chat(alice, &[bob.user]).await;
    let other = h.create_chat(alice, &[bob.user]).await;
    let mut c = h.connect(&bob).await;
    let firsts = [c.next_event().await, c.next_event().await];
    assert!(firsts.iter().all(|v| v["sequence"] == 1), "{firsts:?}");

    h.publish(&chat.participants(2, alice, &[], &[bob.user]))
        .await;
    let removal = c.next_event().await;
    assert_eq!(removal["chat_id"], chat.id.to_string());
    assert_eq!(removal["sequence"], 2);
    assert_eq!(removal["update"]["kind"], "participants_modified");
    assert_eq!(removal["update"]["removed"], json!([bob.user]));

    h.publish(&chat.message(3, alice, "after bob left")).await;
    h.publish(&other.message(2, alice, "sentinel")).await;
    let next = c.next_event().await;
    assert_eq!(next["chat_id"], other.id.to_string(), "{next}");
    let rest = c.until_pong().await;
    assert!(rest.is_empty(), "nothing after the removal: {rest:?}");

    // The removal can still be acked; what came after it cannot.
    c.send_json(json!({"type": "ack", "chat_id": chat.id, "sequence": 2}))
        .await;
    c.send_json(json!({"type": "ack", "chat_id": chat.id, "sequence": 3}))
        .await;
    assert_eq!(c.next_json().await["code"], "bad_ack");

    // A new connection that has not acked the removal gets it again, and still nothing after.
    let mut again = h.connect(&bob).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let v = again.next_event().await;
        seen.push((
            v["chat_id"].as_str().unwrap().to_owned(),
            v["sequence"].as_u64().unwrap(),
        ));
    }
    seen.sort();
    let mut want = vec![
        (chat.id.to_string(), 1),
        (chat.id.to_string(), 2),
        (other.id.to_string(), 1),
        (other.id.to_string(), 2),
    ];
    want.sort();
    assert_eq!(seen, want);
    assert!(again.until_pong().await.is_empty());
}

#[tokio::test]
async fn a_member_added_while_connected_receives_from_its_addition_on() {
    let h = Harness::start().await;
    let alice = UserId::new();
    let bob = h.login().await;
    let chat = h.create_chat(alice, &[]).await;
    for seq in 2..=3 {
        h.publish(&chat.message(seq, alice, "before bob")).await;
    }
    let mut c = h.connect(&bob).await;
    assert!(c.until_pong().await.is_empty(), "not a member yet");

    h.publish(&chat.participants(4, alice, &[bob.user], &[]))
        .await;
    h.notify(
        format!("notify.user.{}", bob.user),
        json!({"chat_id": chat.id, "sequence": 4, "change": "added"}),
    )
    .await;
    let added = c.next_event().await;
    assert_eq!(added["sequence"], 4);
    assert_eq!(added["update"]["added"], json!([bob.user]));
    h.publish(&chat.message(5, alice, "welcome")).await;
    let v = c.next_event().await;
    assert_eq!(v["sequence"], 5);
    assert_eq!(v["message"]["body"], "welcome");
}

#[tokio::test]
async fn typing_reaches_other_members_but_not_the_typer() {
    let h = Harness::start().await;
    let alice = h.login().await;
    let bob = h.login().await;
    let chat = h.create_chat(alice.user, &[bob.user]).await;
    let mut a = h.connect(&alice).await;
    let mut b = h.connect(&bob).await;
    a.sequences(&chat, 1).await;
    b.sequences(&chat, 1).await;
    a.send_json(json!({"type": "typing", "chat_id": chat.id}))
        .await;
    let t = b.next_json().await;
    assert_eq!(
        t,
        json!({"type": "typing", "chat_id": chat.id, "user_id": alice.user})
    );
    assert!(a.until_pong().await.is_empty());
}

#[tokio::test]
async fn a_receipt_notice_becomes_a_receipt_frame_for_other_members_only() {
    let h = Harness::start().await;
    let alice = h.login().await;
    let bob = h.login().await;
    let chat = h.create_chat(alice.user, &[bob.user]).await;
    let mut a = h.connect(&alice).await;
    let mut b = h.connect(&bob).await;
    a.sequences(&chat, 1).await;
    b.sequences(&chat, 1).await;
    h.notify(
        format!("live.receipts.{}", chat.id),
        json!({"chat_id": chat.id, "user_id": bob.user, "read_up_to": 1}),
    )
    .await;
    let r = a.next_json().await;
    assert_eq!(
        r,
        json!({"type": "receipt", "chat_id": chat.id, "user_id": bob.user, "read_up_to": 1})
    );
    // Bob's socket had the notice queued ahead of this event, had it been for him.
    h.publish(&chat.message(2, alice.user, "after")).await;
    assert_eq!(
        b.sequences(&chat, 1).await,
        vec![2],
        "no receipt about himself"
    );
}

#[tokio::test]
async fn a_non_member_never_sees_a_frame_of_the_chat() {
    let h = Harness::start().await;
    let alice = h.login().await;
    let mallory = h.login().await;
    let chat = h.create_chat(alice.user, &[]).await;
    let mut m = h.connect(&mallory).await;
    let mut a = h.connect(&alice).await;
    a.sequences(&chat, 1).await;
    h.publish(&chat.message(2, alice.user, "private")).await;
    a.send_json(json!({"type": "typing", "chat_id": chat.id}))
        .await;
    m.send_json(json!({"type": "typing", "chat_id": chat.id}))
        .await;
    assert_eq!(a.sequences(&chat, 1).await, vec![2]);
    // Mallory's typing for a chat not hers is refused with an error frame; nothing else comes.
    let to_mallory = m.until_pong().await;
    assert_eq!(to_mallory.len(), 1, "{to_mallory:?}");
    assert_eq!(to_mallory[0]["type"], "error", "{to_mallory:?}");
    assert!(
        a.until_pong().await.is_empty(),
        "mallory's typing is not relayed"
    );
}

#[tokio::test]
async fn a_member_removed_and_added_back_gets_nothing_from_in_between() {
    let h = Harness::start().await;
    let alice = UserId::new();
    let bob = h.login().await;
    let chat = h.create_chat(alice, &[bob.user]).await;
    let mut c = h.connect(&bob).await;
    assert_eq!(c.sequences(&chat, 1).await, vec![1]);
    h.publish(&chat.participants(2, alice, &[], &[bob.user]))
        .await;
    assert_eq!(c.sequences(&chat, 1).await, vec![2]);
    h.publish(&chat.message(3, alice, "while bob was away"))
        .await;
    h.publish(&chat.participants(4, alice, &[bob.user], &[]))
        .await;
    h.notify(
        format!("notify.user.{}", bob.user),
        json!({"chat_id": chat.id, "sequence": 4, "change": "added"}),
    )
    .await;
    h.publish(&chat.message(5, alice, "welcome back")).await;
    assert_eq!(c.sequences(&chat, 2).await, vec![4, 5]);
    assert!(c.until_pong().await.is_empty());
}

#[tokio::test]
async fn an_event_type_this_build_cannot_render_is_delivered_as_the_projector_rendered_it() {
    let h = Harness::start().await;
    let alice = h.login().await;
    let chat = h.create_chat(alice.user, &[]).await;
    let mut c = h.connect(&alice).await;
    assert_eq!(c.sequences(&chat, 1).await, vec![1]);
    let at = "2026-11-21T10:00:00Z";
    h.raw_to_nats(
        &chat,
        &json!({
            "specversion": "1.0", "id": uuid::Uuid::now_v7(), "source": "/parley/chats",
            "type": "parley.chat.title_changed.v1", "subject": chat.id, "time": at,
            "datacontenttype": "application/json", "sequence": 2, "actor": alice.user,
            "data": {"title": "renamed"}
        }),
    )
    .await;
    let update =
        json!({"kind": "title_changed", "title": "renamed", "actor": alice.user, "at": at});
    h.update_to_pg(&chat, 2, &update).await;
    h.publish(&chat.message(3, alice.user, "after the rename"))
        .await;
    let v = c.next_event().await;
    assert_eq!(
        v,
        json!({"type": "chatUpdate", "chat_id": chat.id, "sequence": 2, "update": update})
    );
    assert_eq!(c.sequences(&chat, 1).await, vec![3]);
}

async fn wait_for_receipt(
    h: &Harness,
    device: &Device,
    chat: &Chat,
    up_to: u64,
) -> parley_schemas::StoredEvent<ReceiptEvent> {
    let subject = format!("receipts.{}", chat.id);
    eventually(Duration::from_secs(5), "a delivered receipt", || async {
        let msg = last_stored(&h.stack.infra.js, "RECEIPTS", &subject).await?;
        let event = decode::<ReceiptEvent>(&msg.payload).unwrap();
        if event.meta.sequence != up_to {
            return None;
        }
        let header = |name: &str| msg.headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(
            header("Nats-Msg-Id"),
            Some(format!("{}:{}:{up_to}", device.device, chat.id))
        );
        assert_eq!(
            header("Content-Type").as_deref(),
            Some("application/cloudevents+json")
        );
        Some(event)
    })
    .await
}
