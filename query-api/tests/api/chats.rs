//! `GET /v1/chats` and `GET /v1/chats/{chat_id}`.

use crate::helpers::spawn_app;

#[tokio::test]
async fn chat_list_shows_current_chats_by_recent_activity_with_unread_counts_and_mute() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let token = app.login(alice, "phone").await;

    let group = app
        .chat("group", Some("team"), &[(alice, "admin"), (bob, "member")])
        .await;
    let dm = app
        .chat("dm", None, &[(alice, "member"), (bob, "member")])
        .await;
    let empty = app
        .chat("channel", Some("news"), &[(alice, "member")])
        .await;
    let left = app
        .chat("group", Some("left"), &[(alice, "member"), (bob, "admin")])
        .await;
    let others = app.chat("dm", None, &[(bob, "member")]).await;

    // group: bob 3, alice 1, one of bob's deleted; alice has read bob's first.
    let first = app.message(group, bob, "b1").await;
    app.message(group, alice, "a1").await;
    let deleted = app.message(group, bob, "b2").await;
    app.message(group, bob, "b3").await;
    sqlx::query(
        "UPDATE messages SET deleted = true, body = NULL WHERE chat_id = $1 AND sequence = $2",
    )
    .bind(group.as_uuid())
    .bind(deleted)
    .execute(app.pg())
    .await
    .unwrap();
    sqlx::query(
        "UPDATE members SET read_up_to = $3, muted = true WHERE chat_id = $1 AND user_id = $2",
    )
    .bind(group.as_uuid())
    .bind(alice.as_uuid())
    .bind(first)
    .execute(app.pg())
    .await
    .unwrap();
    // The dm is the most recent activity; the chats alice left or never joined are not hers.
    app.message(left, bob, "after alice").await;
    let last = app.message(dm, bob, "hi alice").await;
    app.message(others, bob, "not for alice").await;
    sqlx::query("UPDATE members SET left_seq = 2 WHERE chat_id = $1 AND user_id = $2")
        .bind(left.as_uuid())
        .bind(alice.as_uuid())
        .execute(app.pg())
        .await
        .unwrap();

    let list = app.get_json("/v1/chats", &token).await;

    let chats = list["chats"].as_array().unwrap();
    let ids: Vec<&str> = chats
        .iter()
        .map(|c| c["chat_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [dm.to_string(), group.to_string(), empty.to_string()]);

    let (d, g, e) = (&chats[0], &chats[1], &chats[2]);
    assert_eq!(d["kind"], "dm");
    assert_eq!(d["title"], serde_json::Value::Null);
    assert_eq!(d["last_sequence"], last);
    assert_eq!(d["last_message"]["body"], "hi alice");
    assert_eq!(d["last_message"]["sequence"], last);
    assert_eq!(d["last_message"]["sender_id"], bob.to_string());
    assert_eq!(d["unread_count"], 1);
    assert_eq!(d["muted"], false);

    assert_eq!(g["title"], "team");
    assert_eq!(
        g["unread_count"], 1,
        "b3 only: b1 is read, a1 is alice's, b2 is deleted"
    );
    assert_eq!(g["muted"], true);
    assert_eq!(g["last_message"]["body"], "b3");

    assert_eq!(e["kind"], "channel");
    assert_eq!(e["last_message"], serde_json::Value::Null);
    assert_eq!(e["unread_count"], 0);
    assert_eq!(e["last_sequence"], 1);
}

#[tokio::test]
async fn chat_list_is_empty_for_a_user_in_no_chats() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let token = app.login(alice, "phone").await;

    let list = app.get_json("/v1/chats", &token).await;

    assert_eq!(list, serde_json::json!({"chats": []}));
}

#[tokio::test]
async fn chat_detail_lists_current_members_with_names_and_roles() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let token = app.login(alice, "phone").await;
    let chat = app
        .chat("group", Some("team"), &[(alice, "admin"), (bob, "member")])
        .await;
    let seq = app.bump(chat).await;
    app.join(chat, carol, "member", seq).await;
    sqlx::query("UPDATE members SET left_seq = $3 WHERE chat_id = $1 AND user_id = $2")
        .bind(chat.as_uuid())
        .bind(bob.as_uuid())
        .bind(app.bump(chat).await)
        .execute(app.pg())
        .await
        .unwrap();

    let detail = app.get_json(&format!("/v1/chats/{chat}"), &token).await;

    assert_eq!(detail["chat_id"], chat.to_string());
    assert_eq!(detail["kind"], "group");
    assert_eq!(detail["title"], "team");
    assert_eq!(detail["last_sequence"], 3);
    assert!(detail["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        detail["members"],
        serde_json::json!([
            {"user_id": alice.to_string(), "handle": "alice", "display_name": "alice display", "role": "admin"},
            {"user_id": carol.to_string(), "handle": "carol", "display_name": "carol display", "role": "member"},
        ])
    );
}
