//! Threads, titles and roles, per-member settings, mentions, public channels and blocks through
//! the public HTTP, WebSocket and stream contract: the happy paths, who may do what (a
//! non-member gets 404), the limits, and that refused commands append nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::{Socket, TestApp, User, spawn_app, spawn_app_with};
use parley_test_support::eventually;
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

fn is_problem(body: &Value) -> bool {
    body["type"].is_string() && body["status"].is_u64() && body["detail"].is_string()
}

async fn send(app: &TestApp, chat: &str, who: &User, body: Value) -> (u16, Value) {
    app.post(
        &format!("/v1/chats/{chat}/messages"),
        Some(&who.token),
        body,
    )
    .await
}

/// The chat's events on `ws` up to and including `last`, one per sequence, in order; panics on
/// a gap or when one does not come in time.
async fn events_up_to(ws: &mut Socket, chat: &str, last: u64) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    while out.len() < last as usize {
        let f = ws
            .next_event(WAIT)
            .await
            .unwrap_or_else(|| panic!("event {} never arrived", out.len() + 1));
        if f["chat_id"] != chat {
            continue;
        }
        let seq = f["sequence"].as_u64().unwrap();
        if seq <= out.len() as u64 {
            continue; // a duplicate; clients drop them
        }
        assert_eq!(seq, out.len() as u64 + 1, "gap or reorder: {f}");
        out.push(f);
    }
    out
}

async fn join(app: &TestApp, chat: &str, who: &User, add: &[&User]) -> (u16, Value) {
    let add: Vec<&str> = add.iter().map(|u| u.user_id.as_str()).collect();
    app.post(
        &format!("/v1/chats/{chat}/participants"),
        Some(&who.token),
        json!({ "add": add }),
    )
    .await
}

/// The chat's sequence as the `CHATS` stream holds it: what was appended, projected or not.
async fn last_sequence(app: &TestApp, chat: &str) -> u64 {
    let event = app.last_event("CHATS", &format!("chats.{chat}")).await;
    event["sequence"].as_u64().unwrap()
}

#[tokio::test]
async fn thread_replies_are_listed_oldest_first_and_the_root_shows_their_count() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let eve = app.signup("eve").await;
    let mut bob_ws = app.socket(&bob.token).await;
    let chat = app.group(&ada, &[&bob]).await;
    let (s, root) = send(&app, &chat, &ada, json!({"body": "root"})).await;
    assert_eq!(s, 201, "{root}");
    let root = root["message_id"].as_str().unwrap().to_owned();
    let mut replies = Vec::new();
    for i in 0..3 {
        let (s, r) = send(
            &app,
            &chat,
            &bob,
            json!({"body": format!("reply {i}"), "thread_root": root}),
        )
        .await;
        assert_eq!(s, 201, "{r}");
        replies.push(r);
    }

    // Live: thread replies are ordinary chat events carrying their root.
    let frames = events_up_to(&mut bob_ws, &chat, 5).await;
    assert_eq!(frames[1]["message"]["thread_root"], Value::Null);
    for f in &frames[2..] {
        assert_eq!(f["type"], "newMessage");
        assert_eq!(f["message"]["thread_root"], root.as_str());
    }

    let thread = format!("/v1/chats/{chat}/messages/{root}/thread");
    let (s, page) = app
        .get(
            &format!("{thread}?limit=2&min_sequence=5"),
            Some(&bob.token),
        )
        .await;
    assert_eq!(s, 200, "{page}");
    let bodies = |p: &Value| -> Vec<String> {
        p["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(bodies(&page), ["reply 0", "reply 1"]);
    assert_eq!(page["has_more"], true);
    assert_eq!(page["root"]["message_id"], root.as_str());
    assert_eq!(page["root"]["thread_reply_count"], 3);
    let after = page["messages"][1]["sequence"].as_u64().unwrap();
    let (_, rest) = app
        .get(&format!("{thread}?after={after}&limit=2"), Some(&bob.token))
        .await;
    assert_eq!(bodies(&rest), ["reply 2"]);
    assert_eq!(rest["has_more"], false);

    // History keeps the replies, marked, and shows the summary on the root.
    let (_, history) = app
        .get(
            &format!("/v1/chats/{chat}/messages?min_sequence=5"),
            Some(&ada.token),
        )
        .await;
    let msgs = history["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 4);
    assert_eq!(msgs[0]["thread_reply_count"], 3);
    assert_eq!(msgs[0]["last_reply_at"], msgs[3]["sent_at"]);
    assert_eq!(msgs[3]["message_id"], replies[2]["message_id"]);
    assert!(msgs[1..].iter().all(|m| m["thread_root"] == root.as_str()));

    // Who may see it, and what is no thread.
    let (s, b) = app.get(&thread, Some(&eve.token)).await;
    assert_eq!(s, 404, "a non-member: {b}");
    let a_reply = replies[0]["message_id"].as_str().unwrap();
    let (s, _) = app
        .get(
            &format!("/v1/chats/{chat}/messages/{a_reply}/thread"),
            Some(&bob.token),
        )
        .await;
    assert_eq!(s, 404, "a reply starts no thread");
    let (s, b) = app
        .get(&format!("{thread}?limit=0"), Some(&bob.token))
        .await;
    assert_eq!(s, 422, "{b}");
}

#[tokio::test]
async fn replies_and_thread_replies_across_chats_or_to_a_reply_are_refused_and_append_nothing() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let one = app.group(&ada, &[]).await;
    let two = app.group(&ada, &[]).await;
    let (_, root) = send(&app, &one, &ada, json!({"body": "root"})).await;
    let root = root["message_id"].as_str().unwrap().to_owned();
    let (s, reply) = send(&app, &one, &ada, json!({"body": "r", "thread_root": root})).await;
    assert_eq!(s, 201, "{reply}");
    let reply = reply["message_id"].as_str().unwrap().to_owned();
    for (chat, body) in [
        (&two, json!({"body": "x", "thread_root": root})),
        (&two, json!({"body": "x", "reply_to": root})),
        (&one, json!({"body": "x", "thread_root": reply})),
        (
            &one,
            json!({"body": "x", "thread_root": "0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3f"}),
        ),
    ] {
        let (s, b) = send(&app, chat, &ada, body.clone()).await;
        assert_eq!(s, 422, "{body} -> {b}");
        assert!(is_problem(&b), "{b}");
    }
    let (s, _) = send(
        &app,
        &one,
        &ada,
        json!({"body": "x", "thread_root": "nope"}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(last_sequence(&app, &two).await, 1, "nothing appended");
    assert_eq!(last_sequence(&app, &one).await, 3, "nothing appended");
}

#[tokio::test]
async fn an_admin_renames_a_group_and_members_see_title_changed_but_nobody_else_may() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let eve = app.signup("eve").await;
    let mut bob_ws = app.socket(&bob.token).await;
    let chat = app.group(&ada, &[&bob]).await;
    let path = format!("/v1/chats/{chat}");
    let title = |t: &str| Some(json!({ "title": t }));
    let (s, b) = app
        .call_as(Method::PATCH, &path, &bob.token, title("mine"))
        .await;
    assert_eq!(s, 403, "a member: {b}");
    assert!(is_problem(&b));
    let (s, _) = app
        .call_as(Method::PATCH, &path, &eve.token, title("mine"))
        .await;
    assert_eq!(s, 404, "a non-member");
    let (s, _) = app
        .call_as(Method::PATCH, &path, &ada.token, title(""))
        .await;
    assert_eq!(s, 422, "an empty title");
    let (s, b) = app
        .call_as(Method::PATCH, &path, &ada.token, title("renamed"))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["sequence"], 2);

    let frames = events_up_to(&mut bob_ws, &chat, 2).await;
    assert_eq!(frames[1]["type"], "chatUpdate");
    assert_eq!(frames[1]["update"]["kind"], "title_changed");
    assert_eq!(frames[1]["update"]["title"], "renamed");
    assert_eq!(frames[1]["update"]["actor"], ada.user_id.as_str());
    let (_, detail) = app
        .get(&format!("{path}?min_sequence=2"), Some(&bob.token))
        .await;
    assert_eq!(detail["title"], "renamed");

    let (_, dm) = app
        .post(
            "/v1/chats",
            Some(&ada.token),
            json!({"kind": "dm", "members": [bob.user_id]}),
        )
        .await;
    let dm = dm["chat_id"].as_str().unwrap();
    let (s, b) = app
        .call_as(
            Method::PATCH,
            &format!("/v1/chats/{dm}"),
            &ada.token,
            title("x"),
        )
        .await;
    assert_eq!(s, 422, "a dm has no title: {b}");
    assert_eq!(last_sequence(&app, &chat).await, 2);
}

#[tokio::test]
async fn admins_change_roles_and_a_chat_always_keeps_an_admin() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let eve = app.signup("eve").await;
    let mut bob_ws = app.socket(&bob.token).await;
    let chat = app.group(&ada, &[&bob]).await;
    let role = |user: &User| format!("/v1/chats/{chat}/members/{}/role", user.user_id);
    let admin = Some(json!({"role": "admin"}));
    let member = Some(json!({"role": "member"}));
    let (s, _) = app
        .call_as(Method::PUT, &role(&bob), &bob.token, admin.clone())
        .await;
    assert_eq!(s, 403, "a member cannot promote");
    let (s, _) = app
        .call_as(Method::PUT, &role(&bob), &eve.token, admin.clone())
        .await;
    assert_eq!(s, 404, "a non-member");
    let (s, _) = app
        .call_as(Method::PUT, &role(&eve), &ada.token, admin.clone())
        .await;
    assert_eq!(s, 404, "the target is not a member");
    let (s, b) = app
        .call_as(Method::PUT, &role(&ada), &ada.token, member.clone())
        .await;
    assert_eq!(s, 422, "the last admin stays: {b}");
    let (s, _) = app
        .call_as(
            Method::PUT,
            &role(&bob),
            &ada.token,
            Some(json!({"role": "owner"})),
        )
        .await;
    assert_eq!(s, 400, "no such role");
    assert_eq!(last_sequence(&app, &chat).await, 1, "nothing appended");

    let (s, b) = app
        .call_as(Method::PUT, &role(&bob), &ada.token, admin.clone())
        .await;
    assert_eq!(s, 200, "{b}");
    let frames = events_up_to(&mut bob_ws, &chat, 2).await;
    assert_eq!(frames[1]["update"]["kind"], "role_changed");
    assert_eq!(frames[1]["update"]["user_id"], bob.user_id.as_str());
    assert_eq!(frames[1]["update"]["role"], "admin");
    // Bob, now admin, demotes Ada, who then may no longer rename.
    let (s, _) = app
        .call_as(Method::PUT, &role(&ada), &bob.token, member.clone())
        .await;
    assert_eq!(s, 200);
    let (s, _) = app
        .call_as(
            Method::PATCH,
            &format!("/v1/chats/{chat}"),
            &ada.token,
            Some(json!({"title": "x"})),
        )
        .await;
    assert_eq!(s, 403);
    let (_, detail) = app
        .get(
            &format!("/v1/chats/{chat}?min_sequence=3"),
            Some(&ada.token),
        )
        .await;
    let roles: Vec<(String, String)> = detail["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().unwrap().to_owned(),
                m["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        vec![
            (ada.user_id.clone(), "member".to_owned()),
            (bob.user_id.clone(), "admin".to_owned())
        ]
    );
}

#[tokio::test]
async fn chat_settings_are_the_callers_own_take_no_chat_sequence_and_show_in_the_chat_list() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let eve = app.signup("eve").await;
    let mut ada_ws = app.socket(&ada.token).await;
    let chat = app.group(&ada, &[&bob]).await;
    let path = format!("/v1/chats/{chat}/settings");
    let (s, _) = app
        .call_as(Method::PUT, &path, &eve.token, Some(json!({"muted": true})))
        .await;
    assert_eq!(s, 404, "a non-member");
    let (s, b) = app
        .call_as(
            Method::PUT,
            &path,
            &bob.token,
            Some(json!({"notify": "loud"})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = app
        .call_as(
            Method::PUT,
            &path,
            &bob.token,
            Some(json!({"muted": true, "notify": "mentions"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b,
        json!({"chat_id": chat, "muted": true, "notify": "mentions"})
    );
    let (s, b) = app
        .call_as(
            Method::PUT,
            &path,
            &bob.token,
            Some(json!({"notify": "none"})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(b["muted"], true, "absent fields keep their value");
    assert_eq!(b["notify"], "none");
    assert_eq!(
        app.last_event_type("USERS", &format!("users.{}", bob.user_id))
            .await,
        "parley.user.chat_settings_changed.v1"
    );

    // No chat event: the next message is sequence 2, and Ada's socket sees nothing between.
    let (_, sent) = send(&app, &chat, &ada, json!({"body": "after"})).await;
    assert_eq!(sent["sequence"], 2);
    let frames = events_up_to(&mut ada_ws, &chat, 2).await;
    assert_eq!(frames[1]["type"], "newMessage");

    let mine = |list: &Value| {
        list["chats"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["chat_id"] == chat.as_str())
            .cloned()
            .unwrap()
    };
    eventually(WAIT, "bob's chat list shows his settings", || async {
        let (_, list) = app.get("/v1/chats", Some(&bob.token)).await;
        let c = mine(&list);
        (c["muted"] == true && c["notify"] == "none").then_some(())
    })
    .await;
    let (_, list) = app.get("/v1/chats", Some(&ada.token)).await;
    assert_eq!(
        mine(&list)["muted"],
        false,
        "Ada's own settings are untouched"
    );
    assert_eq!(mine(&list)["notify"], "all");
}

#[tokio::test]
async fn mentions_record_the_members_a_message_names_by_handle() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    app.signup("cat").await; // exists, but is not in the chat
    let mut bob_ws = app.socket(&bob.token).await;
    let chat = app.group(&ada, &[&bob]).await;
    let (s, b) = send(
        &app,
        &chat,
        &ada,
        json!({"body": "hi @bob, @cat and @nobody; mail ada@bob.io or @ada"}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let frames = events_up_to(&mut bob_ws, &chat, 2).await;
    assert_eq!(frames[1]["message"]["mentions"], json!([bob.user_id]));
    let (_, history) = app
        .get(
            &format!("/v1/chats/{chat}/messages?min_sequence=2"),
            Some(&bob.token),
        )
        .await;
    assert_eq!(history["messages"][0]["mentions"], json!([bob.user_id]));
}

#[tokio::test]
async fn anyone_joins_a_public_channel_by_adding_themselves_but_not_a_private_one() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let eve = app.signup("eve").await;
    let create = |body: Value| app.post("/v1/chats", Some(&ada.token), body);
    let (s, public) = create(
        json!({"kind": "channel", "title": "Rust news", "members": [], "visibility": "public"}),
    )
    .await;
    assert_eq!(s, 201, "{public}");
    let public = public["chat_id"].as_str().unwrap().to_owned();
    let (s, private) =
        create(json!({"kind": "channel", "title": "Rust staff", "members": []})).await;
    assert_eq!(s, 201);
    let private = private["chat_id"].as_str().unwrap().to_owned();
    let (s, b) =
        create(json!({"kind": "group", "title": "g", "members": [], "visibility": "public"})).await;
    assert_eq!(s, 422, "only channels are public: {b}");

    // Discovery lists the public channel only.
    let found = eventually(WAIT, "the public channel is listed", || async {
        let (_, list) = app.get("/v1/channels?q=RUST", Some(&eve.token)).await;
        let channels = list["channels"].as_array().cloned().unwrap_or_default();
        (!channels.is_empty()).then_some(channels)
    })
    .await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["chat_id"], public.as_str());
    assert_eq!(found[0]["is_member"], false);
    assert_eq!(found[0]["member_count"], 1);

    let (s, _) = join(&app, &private, &eve, &[&eve]).await;
    assert_eq!(s, 404, "a private channel is not the stranger's to see");
    let (s, _) = join(&app, &public, &eve, &[&bob]).await;
    assert_eq!(s, 404, "a stranger brings nobody else");
    let (s, _) = join(&app, &public, &eve, &[&eve, &bob]).await;
    assert_eq!(s, 404);

    let mut eve_ws = app.socket(&eve.token).await;
    let (s, b) = join(&app, &public, &eve, &[&eve]).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["sequence"], 2);
    let (_, sent) = send(&app, &public, &ada, json!({"body": "welcome"})).await;
    assert_eq!(sent["sequence"], 3);
    // Eve's cursor starts just before the event that made her a member.
    let first = eve_ws.next_event(WAIT).await.expect("join frame");
    assert_eq!(first["sequence"], 2, "{first}");
    assert_eq!(first["update"]["kind"], "participants_modified");
    assert_eq!(first["update"]["added"], json!([eve.user_id]));
    let second = eve_ws.next_event(WAIT).await.expect("message frame");
    assert_eq!(second["sequence"], 3);
    assert_eq!(second["message"]["body"], "welcome");
    let (s, detail) = app
        .get(
            &format!("/v1/chats/{public}?min_sequence=3"),
            Some(&eve.token),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(detail["visibility"], "public");
    // A plain member of a public channel still cannot add others.
    let (s, _) = join(&app, &public, &eve, &[&bob]).await;
    assert_eq!(s, 403);
}

#[tokio::test]
async fn a_channel_over_its_member_limit_is_refused_at_creation_and_on_join() {
    let app = spawn_app_with(|s| s.command.max_channel_members = 2).await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let cat = app.signup("cat").await;
    let (s, b) = app
        .post(
            "/v1/chats",
            Some(&ada.token),
            json!({"kind": "channel", "title": "c", "members": [bob.user_id, cat.user_id]}),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    let (s, chat) = app
        .post(
            "/v1/chats",
            Some(&ada.token),
            json!({"kind": "channel", "title": "c", "members": [bob.user_id], "visibility": "public"}),
        )
        .await;
    assert_eq!(s, 201);
    let chat = chat["chat_id"].as_str().unwrap();
    let (s, b) = app
        .post(
            &format!("/v1/chats/{chat}/participants"),
            Some(&cat.token),
            json!({"add": [cat.user_id]}),
        )
        .await;
    assert_eq!(s, 422, "full: {b}");
    assert!(is_problem(&b));
}

#[tokio::test]
async fn a_blocked_user_can_neither_open_a_dm_with_nor_add_the_blocker_until_unblocked() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let cat = app.signup("cat").await;
    let block = format!("/v1/users/{}/block", ada.user_id);
    for _ in 0..2 {
        let (s, b) = app.call_as(Method::POST, &block, &bob.token, None).await;
        assert_eq!(s, 204, "blocking is idempotent: {b}");
    }
    let bob_events = format!("users.{}", bob.user_id);
    assert_eq!(
        app.last_event_type("USERS", &bob_events).await,
        "parley.user.user_blocked.v1"
    );
    let (s, b) = app
        .call_as(
            Method::POST,
            &format!("/v1/users/{}/block", bob.user_id),
            &bob.token,
            None,
        )
        .await;
    assert_eq!(s, 422, "blocking yourself: {b}");
    let (s, _) = app
        .call_as(
            Method::POST,
            "/v1/users/0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3f/block",
            &bob.token,
            None,
        )
        .await;
    assert_eq!(s, 404, "unknown user");

    let dm = json!({"kind": "dm", "members": [bob.user_id]});
    let (s, b) = app.post("/v1/chats", Some(&ada.token), dm.clone()).await;
    assert_eq!(s, 404, "{b}");
    assert!(is_problem(&b));
    let (s, _) = app
        .post(
            "/v1/chats",
            Some(&ada.token),
            json!({"kind": "group", "title": "g", "members": [cat.user_id, bob.user_id]}),
        )
        .await;
    assert_eq!(s, 404);
    let group = app.group(&ada, &[&cat]).await;
    let (s, _) = app
        .post(
            &format!("/v1/chats/{group}/participants"),
            Some(&ada.token),
            json!({"add": [bob.user_id]}),
        )
        .await;
    assert_eq!(s, 404);
    assert_eq!(last_sequence(&app, &group).await, 1, "nothing appended");
    // Others are not affected by Bob's block.
    let (s, _) = app
        .post(
            &format!("/v1/chats/{group}/participants"),
            Some(&cat.token),
            json!({"remove": [cat.user_id]}),
        )
        .await;
    assert_eq!(s, 200);

    let (s, _) = app.call_as(Method::DELETE, &block, &bob.token, None).await;
    assert_eq!(s, 204);
    assert_eq!(
        app.last_event_type("USERS", &bob_events).await,
        "parley.user.user_unblocked.v1"
    );
    let (s, b) = app.post("/v1/chats", Some(&ada.token), dm).await;
    assert_eq!(s, 201, "{b}");
}

#[tokio::test]
async fn asking_again_for_a_dm_with_someone_who_since_blocked_you_is_refused() {
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
    assert_eq!(s, 201);
    let (s, _) = app
        .call_as(
            Method::POST,
            &format!("/v1/users/{}/block", ada.user_id),
            &bob.token,
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = app
        .post(
            "/v1/chats",
            Some(&ada.token),
            json!({"kind": "dm", "members": [bob.user_id]}),
        )
        .await;
    assert_eq!(s, 404);
    // The blocker may still reach the dm they share.
    let (s, again) = app
        .post(
            "/v1/chats",
            Some(&bob.token),
            json!({"kind": "dm", "members": [ada.user_id]}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(again["chat_id"], first["chat_id"]);
}
