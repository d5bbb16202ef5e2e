//! Authentication and authorisation: 401 without a good token, 404 for chats that are not the
//! caller's (exactly like unknown ones), 404 for ids that cannot name anything, and
//! problem+json for unknown routes.

use parley_schemas::ChatId;
use reqwest::StatusCode;

use crate::helpers::{assert_problem, spawn_app};

fn chat_routes(chat: &str) -> [String; 3] {
    [
        format!("/v1/chats/{chat}"),
        format!("/v1/chats/{chat}/messages"),
        format!("/v1/chats/{chat}/messages?before=5&limit=10"),
    ]
}

#[tokio::test]
async fn chat_routes_return_404_when_caller_is_not_a_member_exactly_as_for_unknown_chats() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let mallory = app.user("mallory").await;
    let token = app.login(mallory, "laptop").await;
    let chat = app
        .chat("group", Some("private"), &[(alice, "admin")])
        .await;
    app.message(chat, alice, "secret").await;

    for (route, unknown) in chat_routes(&chat.to_string())
        .into_iter()
        .zip(chat_routes(&ChatId::new().to_string()))
    {
        let hidden = assert_problem(app.get(&route, &token).await, StatusCode::NOT_FOUND).await;
        let absent = assert_problem(app.get(&unknown, &token).await, StatusCode::NOT_FOUND).await;
        assert_eq!(hidden, absent, "{route}");
    }
    let list = app.get_json("/v1/chats", &token).await;
    assert_eq!(list["chats"], serde_json::json!([]));
}

#[tokio::test]
async fn chat_routes_return_404_when_caller_has_left_the_chat() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let token = app.login(bob, "phone").await;
    let chat = app
        .chat("group", None, &[(alice, "admin"), (bob, "member")])
        .await;
    app.get_json(&format!("/v1/chats/{chat}"), &token).await;
    let left = app.bump(chat).await;
    sqlx::query("UPDATE members SET left_seq = $3 WHERE chat_id = $1 AND user_id = $2")
        .bind(chat.as_uuid())
        .bind(bob.as_uuid())
        .bind(left)
        .execute(app.pg())
        .await
        .unwrap();

    for route in chat_routes(&chat.to_string()) {
        assert_problem(app.get(&route, &token).await, StatusCode::NOT_FOUND).await;
    }
    let list = app.get_json("/v1/chats", &token).await;
    assert_eq!(list["chats"], serde_json::json!([]));
}

#[tokio::test]
async fn chat_routes_return_404_for_chat_ids_that_are_not_canonical_uuids() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let token = app.login(alice, "phone").await;
    let chat = app.chat("group", None, &[(alice, "admin")]).await;
    let braced = format!("{{{chat}}}");
    let simple = chat.as_uuid().simple().to_string();

    for id in [
        "abc",
        "*",
        "a.b",
        ">",
        "%20",
        braced.as_str(),
        simple.as_str(),
    ] {
        for route in chat_routes(id) {
            assert_problem(app.get(&route, &token).await, StatusCode::NOT_FOUND).await;
        }
    }
}

#[tokio::test]
async fn every_route_returns_401_without_a_valid_bearer_token() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    app.login(alice, "phone").await;
    let chat = app.chat("group", None, &[(alice, "admin")]).await;
    let routes = [
        "/v1/me".to_string(),
        "/v1/chats".to_string(),
        format!("/v1/chats/{chat}"),
        format!("/v1/chats/{chat}/messages"),
        // Authentication comes first: a junk id tells an anonymous caller nothing either.
        "/v1/chats/abc/messages".to_string(),
    ];

    for route in &routes {
        let url = format!("{}{route}", app.base);
        let none = app.http.get(&url).send().await.unwrap();
        assert_problem(none, StatusCode::UNAUTHORIZED).await;
        let bad = app
            .http
            .get(&url)
            .bearer_auth("not-a-token")
            .send()
            .await
            .unwrap();
        assert_problem(bad, StatusCode::UNAUTHORIZED).await;
        let basic = app
            .http
            .get(&url)
            .header("authorization", "Basic YWxpY2U6cHc=")
            .send()
            .await
            .unwrap();
        assert_problem(basic, StatusCode::UNAUTHORIZED).await;
    }
}

#[tokio::test]
async fn a_revoked_token_stops_working() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let token = app.login(alice, "phone").await;
    app.get_json("/v1/me", &token).await;

    app.stack
        .infra
        .buckets
        .sessions
        .delete(parley_platform::token_key(&token))
        .await
        .unwrap();

    parley_test_support::eventually(
        std::time::Duration::from_secs(5),
        "the revoked token to be refused",
        || async {
            (app.get("/v1/me", &token).await.status() == StatusCode::UNAUTHORIZED).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_problem_json() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let token = app.login(alice, "phone").await;

    for route in ["/v1/nope", "/", "/v1/chats/x/y/z"] {
        assert_problem(app.get(route, &token).await, StatusCode::NOT_FOUND).await;
    }
    let res = app
        .http
        .delete(format!("{}/v1/me", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_problem(res, StatusCode::METHOD_NOT_ALLOWED).await;
}
