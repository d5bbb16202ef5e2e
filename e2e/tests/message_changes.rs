//! Edit, delete for everyone (crypto-shredded), reactions and search, end to end: over HTTP, on
//! the WebSocket, in history, in the raw `CHATS` stream and in a projection rebuilt from it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::{Socket, TestApp, User, spawn_app};
use parley_nats::MessageKeys;
use parley_projectors::chats;
use parley_projectors::runner::Delivered;
use parley_schemas::{ChatId, MessageId};
use parley_test_support::{TestDb, eventually};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

fn enc(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

fn msg_path(chat: &str, message: &str) -> String {
    format!("/v1/chats/{chat}/messages/{message}")
}

fn reaction_path(chat: &str, message: &str, emoji: &str) -> String {
    format!(
        "/v1/chats/{chat}/messages/{message}/reactions/{}",
        enc(emoji)
    )
}

async fn history(app: &TestApp, user: &User, chat: &str, min_sequence: u64) -> Vec<Value> {
    let (s, page) = app
        .get(
            &format!("/v1/chats/{chat}/messages?min_sequence={min_sequence}"),
            Some(&user.token),
        )
        .await;
    assert_eq!(s, 200, "{page}");
    page["messages"].as_array().unwrap().clone()
}

fn find<'a>(messages: &'a [Value], id: &str) -> &'a Value {
    messages
        .iter()
        .find(|m| m["message_id"] == id)
        .unwrap_or_else(|| panic!("message {id} not in history"))
}

/// ada (admin), bob and a stranger, eve; ada's and bob's sockets are open before the group
/// is created, so they follow it from its first event.
async fn group_of_ada_and_bob(app: &TestApp) -> (User, User, User, String, Socket, Socket) {
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let eve = app.signup("eve").await;
    let ada_ws = app.socket(&ada.token).await;
    let bob_ws = app.socket(&bob.token).await;
    let chat = app.group(&ada, &[&bob]).await;
    (ada, bob, eve, chat, ada_ws, bob_ws)
}

#[tokio::test]
async fn the_sender_edits_and_deletes_and_everyone_sees_it_live_and_in_history() {
    let app = spawn_app().await;
    let (ada, bob, eve, chat, _ada_ws, mut bob_ws) = group_of_ada_and_bob(&app).await;
    let (msg, seq) = app.send_message(&ada, &chat, "first words").await;
    let f = bob_ws.event_at(seq, WAIT).await;
    assert_eq!(f["message"]["body"], "first words");

    // Edit: sender only; others 403, strangers 404, bad bodies 422 — none appends anything.
    let edit = |body: &str| Some(json!({ "body": body }));
    let path = msg_path(&chat, &msg);
    let (s, _) = app
        .call(Method::PATCH, &path, Some(&bob.token), edit("mine now"))
        .await;
    assert_eq!(s, 403);
    let (s, _) = app
        .call(Method::PATCH, &path, Some(&eve.token), edit("mine now"))
        .await;
    assert_eq!(s, 404);
    let unknown = msg_path(&chat, &MessageId::new().to_string());
    let (s, _) = app
        .call(Method::PATCH, &unknown, Some(&ada.token), edit("x"))
        .await;
    assert_eq!(s, 404);
    for bad in ["", "   ", &"x".repeat(4001)] {
        let (s, body) = app
            .call(Method::PATCH, &path, Some(&ada.token), edit(bad))
            .await;
        assert_eq!(s, 422, "{body}");
    }
    let (s, res) = app
        .call(Method::PATCH, &path, Some(&ada.token), edit("better words"))
        .await;
    assert_eq!(s, 200, "{res}");
    let edit_seq = res["sequence"].as_u64().unwrap();
    assert_eq!(edit_seq, seq + 1, "the refused edits appended nothing");
    let f = bob_ws.event_at(edit_seq, WAIT).await;
    assert_eq!(f["type"], "chatUpdate");
    assert_eq!(f["update"]["kind"], "message_edited");
    assert_eq!(f["update"]["message_id"], msg.as_str());
    assert_eq!(f["update"]["body"], "better words");
    let m = find(&history(&app, &bob, &chat, edit_seq).await, &msg).clone();
    assert_eq!(m["body"], "better words");
    assert!(m["edited_at"].is_string(), "{m}");
    assert_eq!(m["deleted"], false);

    // Delete: bob is neither sender nor admin; eve is not a member.
    let (s, _) = app
        .call(Method::DELETE, &path, Some(&bob.token), None)
        .await;
    assert_eq!(s, 403);
    let (s, _) = app
        .call(Method::DELETE, &path, Some(&eve.token), None)
        .await;
    assert_eq!(s, 404);
    let (s, res) = app
        .call(Method::DELETE, &path, Some(&ada.token), None)
        .await;
    assert_eq!(s, 200, "{res}");
    let del_seq = res["sequence"].as_u64().unwrap();
    let f = bob_ws.event_at(del_seq, WAIT).await;
    assert_eq!(f["update"]["kind"], "message_deleted");
    assert_eq!(f["update"]["message_id"], msg.as_str());
    assert!(f["update"].get("body").is_none(), "{f}");
    let m = find(&history(&app, &bob, &chat, del_seq).await, &msg).clone();
    assert_eq!(
        (m["body"].clone(), m["deleted"].clone()),
        (Value::Null, json!(true))
    );
    assert_eq!(m["sequence"], seq);

    // A deleted message: deleting again, editing or reacting is a 409, and appends nothing.
    let (s, _) = app
        .call(Method::DELETE, &path, Some(&ada.token), None)
        .await;
    assert_eq!(s, 409);
    let (s, _) = app
        .call(Method::PATCH, &path, Some(&ada.token), edit("back"))
        .await;
    assert_eq!(s, 409);
    let (s, body) = app
        .call(
            Method::PUT,
            &reaction_path(&chat, &msg, "👍"),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(body["status"], 409);
    let (_, next) = app.send_message(&ada, &chat, "after").await;
    assert_eq!(next, del_seq + 1, "refused commands appended nothing");
}

#[tokio::test]
async fn an_admin_may_delete_another_members_message() {
    let app = spawn_app().await;
    let (ada, bob, _eve, chat, _ada_ws, mut bob_ws) = group_of_ada_and_bob(&app).await;
    let (msg, _) = app.send_message(&bob, &chat, "by bob").await;
    let (s, res) = app
        .call(
            Method::DELETE,
            &msg_path(&chat, &msg),
            Some(&ada.token),
            None,
        )
        .await;
    assert_eq!(s, 200, "{res}");
    let f = bob_ws
        .event_at(res["sequence"].as_u64().unwrap(), WAIT)
        .await;
    assert_eq!(f["update"]["kind"], "message_deleted");
    assert_eq!(f["update"]["actor"], ada.user_id.as_str());
}

#[tokio::test]
async fn a_deleted_body_is_in_neither_the_raw_stream_the_read_models_nor_a_rebuilt_projection() {
    let app = spawn_app().await;
    let (ada, bob, _eve, chat, _ada_ws, _bob_ws) = group_of_ada_and_bob(&app).await;
    let (msg, _) = app.send_message(&ada, &chat, "zebracorn original").await;
    let (s, _) = app
        .call(
            Method::PATCH,
            &msg_path(&chat, &msg),
            Some(&ada.token),
            Some(json!({"body": "zebracorn edited"})),
        )
        .await;
    assert_eq!(s, 200);
    let (kept, kept_seq) = app.send_message(&ada, &chat, "giraffe stays").await;
    let (s, res) = app
        .call(
            Method::DELETE,
            &msg_path(&chat, &msg),
            Some(&ada.token),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let last = res["sequence"].as_u64().unwrap();
    history(&app, &bob, &chat, last).await;

    // Every byte of the stream: the bodies were only ever stored sealed.
    let client = async_nats::connect(app.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("CHATS").await.unwrap();
    let last_seq = stream.info().await.unwrap().state.last_sequence;
    let mut raw = Vec::new();
    for seq in 1..=last_seq {
        let m = stream.direct_get(seq).await.unwrap();
        raw.push(Delivered {
            stream_seq: seq,
            payload: m.payload.clone(),
        });
    }
    let all: Vec<u8> = raw.iter().flat_map(|d| d.payload.to_vec()).collect();
    let text = String::from_utf8_lossy(&all);
    assert!(!text.contains("zebracorn"), "a body in clear in the stream");
    assert!(
        !text.contains("giraffe"),
        "bodies are sealed, deleted or not"
    );
    assert!(text.contains("parley.chat.message_sent.v2"));
    assert!(text.contains("parley.chat.message_deleted.v1"));

    // Its key is gone from the bucket, while the kept message's key is there: read by a reader
    // with nothing cached, wherever they are kept (both came from the pool, so likely slots of
    // one key block).
    let kv = js.get_key_value("message_keys").await.unwrap();
    let keys = MessageKeys::new(kv.clone(), js.clone());
    let chat_id = ChatId::from_uuid(chat.parse().unwrap());
    let msg_id = MessageId::from_uuid(msg.parse().unwrap());
    let kept_id = MessageId::from_uuid(kept.parse().unwrap());
    assert!(
        keys.get(chat_id, msg_id).await.unwrap().is_none(),
        "the deleted message's key is destroyed"
    );
    assert!(
        keys.get(chat_id, kept_id).await.unwrap().is_some(),
        "the kept message's key is there"
    );

    // The live read models hold no trace of it.
    let pg = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    for table in ["messages", "message_edits", "chat_updates", "reactions"] {
        let hits: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} t WHERE t::text LIKE '%zebracorn%'"
        ))
        .fetch_one(&pg)
        .await
        .unwrap();
        assert_eq!(hits, 0, "zebracorn in {table}");
    }

    // A projection rebuilt from the same stream into a fresh database cannot resurrect it.
    let fresh = TestDb::create().await;
    let fresh_pg = fresh.pool().await;
    parley_platform::MIGRATOR.run(&fresh_pg).await.unwrap();
    let keys = MessageKeys::new(kv.clone(), js.clone());
    chats::apply(&fresh_pg, &keys, raw, Duration::from_millis(50))
        .await
        .unwrap();
    let rows: Vec<(uuid::Uuid, Option<String>, bool, i64)> = sqlx::query_as(
        "SELECT message_id, body, deleted, sequence FROM messages ORDER BY sequence",
    )
    .fetch_all(&fresh_pg)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (msg_id.as_uuid().to_owned(), None, true, 2),
            (
                rows[1].0,
                Some("giraffe stays".into()),
                false,
                kept_seq as i64
            ),
        ]
    );
    for table in ["messages", "message_edits", "chat_updates", "reactions"] {
        let hits: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} t WHERE t::text LIKE '%zebracorn%'"
        ))
        .fetch_one(&fresh_pg)
        .await
        .unwrap();
        assert_eq!(hits, 0, "zebracorn in rebuilt {table}");
    }
    let (s, found) = app.get("/v1/search?q=zebracorn", Some(&ada.token)).await;
    assert_eq!((s, found["results"].clone()), (200, json!([])));
}

#[tokio::test]
async fn reactions_are_idempotent_bounded_live_and_in_history() {
    let app = spawn_app().await;
    let (ada, bob, eve, chat, mut ada_ws, _bob_ws) = group_of_ada_and_bob(&app).await;
    let (msg, msg_seq) = app.send_message(&ada, &chat, "react to me").await;

    let thumbs = reaction_path(&chat, &msg, "👍");
    let (s, res) = app.call(Method::PUT, &thumbs, Some(&bob.token), None).await;
    assert_eq!(s, 200, "{res}");
    let seq = res["sequence"].as_u64().unwrap();
    let (s, again) = app.call(Method::PUT, &thumbs, Some(&bob.token), None).await;
    assert_eq!(
        (s, again["sequence"].as_u64()),
        (200, Some(seq)),
        "no second event"
    );
    let f = ada_ws.event_at(seq, WAIT).await;
    assert_eq!(f["update"]["kind"], "reaction_added");
    assert_eq!(f["update"]["emoji"], "👍");
    assert_eq!(f["update"]["user_id"], bob.user_id.as_str());
    let (s, _) = app
        .call(
            Method::PUT,
            &reaction_path(&chat, &msg, "👍🏽"),
            Some(&ada.token),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let (s, res) = app.call(Method::PUT, &thumbs, Some(&ada.token), None).await;
    assert_eq!(s, 200);
    let m = find(
        &history(&app, &bob, &chat, res["sequence"].as_u64().unwrap()).await,
        &msg,
    )
    .clone();
    assert_eq!(
        m["reactions"],
        json!({"👍": [bob.user_id, ada.user_id], "👍🏽": [ada.user_id]})
    );
    // A socket opened now replays the unacked message from the read model, reactions included.
    let mut replay = app.socket(&bob.token).await;
    let f = replay.event_at(msg_seq, WAIT).await;
    assert_eq!(f["type"], "newMessage", "{f}");
    assert_eq!(f["message"]["reactions"], m["reactions"], "{f}");

    // Strangers 404; things that are not one emoji 422 — with nothing appended.
    let (s, _) = app.call(Method::PUT, &thumbs, Some(&eve.token), None).await;
    assert_eq!(s, 404);
    for bad in ["lol", "+1", "👍 👍", &"👍".repeat(9)] {
        let (s, body) = app
            .call(
                Method::PUT,
                &reaction_path(&chat, &msg, bad),
                Some(&bob.token),
                None,
            )
            .await;
        assert_eq!(s, 422, "{bad:?}: {body}");
    }

    // Removing: live, idempotent.
    let (s, res) = app
        .call(Method::DELETE, &thumbs, Some(&bob.token), None)
        .await;
    assert_eq!(s, 200);
    let removed = res["sequence"].as_u64().unwrap();
    let f = ada_ws.event_at(removed, WAIT).await;
    assert_eq!(f["update"]["kind"], "reaction_removed");
    let (s, again) = app
        .call(Method::DELETE, &thumbs, Some(&bob.token), None)
        .await;
    assert_eq!((s, again["sequence"].as_u64()), (200, Some(removed)));
    let m = find(&history(&app, &bob, &chat, removed).await, &msg).clone();
    assert_eq!(
        m["reactions"],
        json!({"👍": [ada.user_id], "👍🏽": [ada.user_id]}),
        "history drops the removed reactor"
    );

    // At most 20 distinct emoji per message (2 are on it): an 21st is refused, joining one is not.
    let faces: Vec<String> = (0..18)
        .map(|i| char::from_u32(0x1F600 + i).unwrap().to_string())
        .collect();
    for face in &faces {
        let (s, body) = app
            .call(
                Method::PUT,
                &reaction_path(&chat, &msg, face),
                Some(&bob.token),
                None,
            )
            .await;
        assert_eq!(s, 200, "{face}: {body}");
    }
    let (s, body) = app
        .call(
            Method::PUT,
            &reaction_path(&chat, &msg, "🎉"),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(s, 422, "{body}");
    let (s, body) = app
        .call(
            Method::PUT,
            &reaction_path(&chat, &msg, &faces[0]),
            Some(&ada.token),
            None,
        )
        .await;
    assert_eq!(s, 200, "{body}");
}

#[tokio::test]
async fn search_finds_the_callers_chats_only_ranked_with_snippets_and_follows_edits_and_deletes() {
    let app = spawn_app().await;
    let (ada, bob, eve, chat, _ada_ws, _bob_ws) = group_of_ada_and_bob(&app).await;
    let other = app.group(&ada, &[&eve]).await;
    let (once, _) = app.send_message(&ada, &chat, "an apple and a pear").await;
    let (thrice, _) = app.send_message(&bob, &chat, "apple apple apple pie").await;
    let (_, _) = app.send_message(&ada, &chat, "nothing to see").await;
    let (secret, _) = app.send_message(&ada, &other, "apple for eve only").await;

    let search = |user: &User, q: String| {
        let token = user.token.clone();
        let app = &app;
        async move {
            let (s, body) = app.get(&format!("/v1/search?{q}"), Some(&token)).await;
            assert_eq!(s, 200, "{q}: {body}");
            body["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["message_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let hits = eventually(WAIT, "bob finds both apples", || async {
        let hits = search(&bob, "q=apple".into()).await;
        (hits.len() == 2).then_some(hits)
    })
    .await;
    assert_eq!(
        hits,
        vec![thrice.clone(), once.clone()],
        "ranked, and never eve's chat"
    );
    let (_, body) = app.get("/v1/search?q=apple", Some(&bob.token)).await;
    let top = &body["results"][0];
    assert!(
        top["snippet"].as_str().unwrap().contains("**apple**"),
        "{top}"
    );
    assert_eq!(top["chat_id"], chat.as_str());
    assert!(top["sequence"].as_u64().is_some() && top["sent_at"].is_string());
    // The other chat's message may still be on its way into the read model.
    let in_other = eventually(WAIT, "ada finds eve's apple", || async {
        let hits = search(&ada, format!("q=apple&chat_id={other}")).await;
        (!hits.is_empty()).then_some(hits)
    })
    .await;
    assert_eq!(in_other, vec![secret]);
    assert_eq!(search(&ada, "q=apple&limit=1".into()).await.len(), 1);

    // Authorization and bad input: 404 for a chat not the caller's, 4xx never 5xx.
    let (s, _) = app
        .get(
            &format!("/v1/search?q=apple&chat_id={other}"),
            Some(&bob.token),
        )
        .await;
    assert_eq!(s, 404);
    for q in ["", "%20%20", &"a".repeat(257), "a%00b"] {
        let (s, body) = app
            .get(&format!("/v1/search?q={q}"), Some(&bob.token))
            .await;
        assert_eq!(s, 422, "{q:?}: {body}");
    }
    for q in ["limit=51&q=apple", "limit=0&q=apple"] {
        let (s, _) = app.get(&format!("/v1/search?{q}"), Some(&bob.token)).await;
        assert_eq!(s, 422, "{q}");
    }
    let (s, _) = app.get("/v1/search", Some(&bob.token)).await;
    assert_eq!(s, 400);
    for q in [
        "'%3B DROP TABLE messages%3B --",
        "apple %26 | ! (",
        "apple:* %26 !pear",
        "%22unterminated",
        "or or or -",
        "%5C%5C' OR 1=1 --",
    ] {
        let (s, body) = app
            .get(&format!("/v1/search?q={q}"), Some(&bob.token))
            .await;
        assert_eq!(s, 200, "{q:?}: {body}");
    }

    // An edit reindexes; a deletion is never found again.
    let (s, _) = app
        .call(
            Method::PATCH,
            &msg_path(&chat, &once),
            Some(&ada.token),
            Some(json!({"body": "a quince now"})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = app
        .call(
            Method::DELETE,
            &msg_path(&chat, &thrice),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(s, 200);
    eventually(WAIT, "the edit and the deletion reach search", || async {
        let apples = search(&bob, "q=apple".into()).await;
        let quinces = search(&bob, "q=quince".into()).await;
        (apples.is_empty() && quinces == vec![once.clone()]).then_some(())
    })
    .await;
}
