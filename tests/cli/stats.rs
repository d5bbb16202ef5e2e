//! Activity rollups: `GET /v1/chats/{id}/stats` for chat admins, and `parley stats` as CSV.

use std::time::Duration;

use parley_test_support::eventually;
use serde_json::Value;

use crate::support::{expect_exit, spawn_app};

/// A window around now, well inside the 366 days one request may span.
pub fn around_now() -> String {
    let now = chrono::Utc::now();
    let day = chrono::Duration::days(1);
    let fmt =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    format!("since={}&until={}", fmt(now - day), fmt(now + day))
}

fn total(hours: &Value, field: &str) -> i64 {
    hours
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[field].as_i64().unwrap())
        .sum()
}

#[tokio::test]
async fn an_admin_reads_hourly_counts_senders_and_delivery_latency() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chat = app.group(&ada, &[&bob]).await;
    for i in 0..3 {
        app.message(&ada, &chat, &format!("a{i}")).await;
    }
    let last = app.message(&bob, &chat, "b").await;
    // Bob's device holds everything: Ada's three messages reached someone else; Bob's own
    // message reached nobody but its sender.
    app.deliver(&bob, &chat, last).await;
    let path = format!(
        "/v1/chats/{chat}/stats?{}&min_sequence={last}",
        around_now()
    );
    let stats = eventually(
        Duration::from_secs(10),
        "the delivered receipt in the rollup",
        || {
            let (app, path, token) = (&app, path.clone(), ada.token.clone());
            async move {
                let (s, body) = app.get(&path, Some(&token)).await;
                assert_eq!(s, 200, "{body}");
                (total(&body["hours"], "delivered") == 3).then_some(body)
            }
        },
    )
    .await;
    let hours = &stats["hours"];
    assert_eq!(total(hours, "messages"), 4, "{stats}");
    if hours.as_array().unwrap().len() == 1 {
        assert_eq!(hours[0]["senders"], 2, "{stats}");
        let median = hours[0]["median_delivery_ms"].as_f64().unwrap();
        assert!((0.0..60_000.0).contains(&median), "{stats}");
        assert!(
            hours[0]["hour"].as_str().unwrap().ends_with(":00:00Z"),
            "{stats}"
        );
    }

    let out = app.parley(&["stats", "--chat", &chat]).await;
    let csv = expect_exit(&out, 0);
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("hour,messages,senders,delivered,median_delivery_ms")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), hours.as_array().unwrap().len(), "{csv}");
    let sent: i64 = rows.iter().map(|r| r[1].parse::<i64>().unwrap()).sum();
    let delivered: i64 = rows.iter().map(|r| r[3].parse::<i64>().unwrap()).sum();
    assert_eq!((sent, delivered), (4, 3), "{csv}");
    let out = app
        .parley(&["stats", "--chat", &chat, "--until", "2000-01-01T00:00:00Z"])
        .await;
    assert_eq!(expect_exit(&out, 0).lines().count(), 1, "only the header");
}

#[tokio::test]
async fn stats_are_for_admins_only_and_refuse_bad_windows() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let carol = app.signup("carol").await;
    let chat = app.group(&ada, &[&bob]).await;
    let seq = app.message(&bob, &chat, "hi").await;
    let path = format!("/v1/chats/{chat}/stats?min_sequence={seq}");
    let (s, body) = app.get(&path, Some(&ada.token)).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = app.get(&path, Some(&bob.token)).await;
    assert_eq!((s, body["status"].as_u64()), (403, Some(403)), "{body}");
    let (s, _) = app.get(&path, Some(&carol.token)).await;
    assert_eq!(s, 404, "a non-member learns nothing");
    let (s, _) = app
        .get("/v1/chats/not-a-uuid/stats", Some(&ada.token))
        .await;
    assert_eq!(s, 404);
    let (s, _) = app
        .get(
            &format!("/v1/chats/{chat}/stats?since=yesterday"),
            Some(&ada.token),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = app
        .get(
            &format!(
                "/v1/chats/{chat}/stats?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z"
            ),
            Some(&ada.token),
        )
        .await;
    assert_eq!(s, 422);
    let (s, _) = app
        .get(
            &format!(
                "/v1/chats/{chat}/stats?since=2020-01-01T00:00:00Z&until=2026-01-01T00:00:00Z"
            ),
            Some(&ada.token),
        )
        .await;
    assert_eq!(s, 422, "wider than 366 days");

    for args in [
        vec!["stats", "--chat", "not-a-uuid"],
        vec![
            "stats",
            "--chat",
            chat.as_str(),
            "--since",
            "2026-02-01T00:00:00Z",
            "--until",
            "2026-01-01T00:00:00Z",
        ],
        vec!["stats"],
    ] {
        let out = app.parley(&args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
    }
}
