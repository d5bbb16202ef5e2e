//! `GET /v1/me`.

use parley_schemas::{DeviceId, UserId};
use reqwest::StatusCode;

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test]
async fn me_returns_the_caller_with_active_devices_only() {
    let app = spawn_app().await;
    let alice = app.user("alice").await;
    let token = app.login(alice, "phone").await;
    app.login(alice, "laptop").await;
    app.login(alice, "old tablet").await;
    sqlx::query("UPDATE devices SET removed_at = now() WHERE device_name = 'old tablet'")
        .execute(app.pg())
        .await
        .unwrap();

    let me = app.get_json("/v1/me", &token).await;

    assert_eq!(me["user_id"], alice.to_string());
    assert_eq!(me["handle"], "alice");
    assert_eq!(me["display_name"], "alice display");
    let names: Vec<&str> = me["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["phone", "laptop"]);
    let phone = &me["devices"][0];
    assert_eq!(phone["platform"], "ios");
    assert_eq!(phone["device_id"].as_str().unwrap().len(), 36);
    assert!(phone["created_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn me_returns_404_when_the_user_is_not_projected_yet() {
    let app = spawn_app().await;
    let token = app.token_for(UserId::new(), DeviceId::new()).await;

    assert_problem(app.get("/v1/me", &token).await, StatusCode::NOT_FOUND).await;
}
