//! `parley projections status` and `parley projections rebuild`: a rebuild under concurrent
//! queries ends with a read model equal to the live one and no failed or differing answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{TestApp, User, expect_exit, spawn_app};

/// A bit of everything: users with devices (one removed), two chats, members added and
/// removed, messages, read and delivered receipts. Returns the admin and the queries to hammer.
async fn populate(app: &TestApp) -> (User, Vec<String>) {
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let carol = app.signup("carol").await;
    let team = app.group(&ada, &[&bob, &carol]).await;
    let pair = app.group(&bob, &[&ada]).await;
    for i in 0..30 {
        app.message(&ada, &team, &format!("team {i}")).await;
        if i % 3 == 0 {
            app.message(&bob, &pair, &format!("pair {i}")).await;
        }
    }
    let (s, b) = app
        .post(
            &format!("/v1/chats/{team}/participants"),
            Some(&ada.token),
            json!({"remove": [carol.user_id]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let last = app.message(&bob, &team, "after carol left").await;
    app.read_up_to(&bob, &team, last).await;
    app.deliver(&bob, &team, last).await;
    app.deliver(&ada, &pair, 4).await;
    app.every_feature(&ada, &bob, &carol, &team).await;
    let (s, _) = app
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/devices/{}", carol.device_id),
            Some(&carol.token),
            None,
        )
        .await;
    assert_eq!(s, 204);
    app.settled().await;
    let (_, page) = app
        .get(
            &format!("/v1/chats/{team}/messages?limit=5"),
            Some(&ada.token),
        )
        .await;
    let message = page["messages"][0]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let queries = vec![
        "/v1/me".to_owned(),
        "/v1/chats".to_owned(),
        format!("/v1/chats/{team}"),
        format!("/v1/chats/{pair}"),
        format!("/v1/chats/{team}/messages?limit=200"),
        format!("/v1/chats/{pair}/messages?after=1&limit=3"),
        format!("/v1/chats/{team}/messages/{message}/receipts"),
        format!("/v1/chats/{team}/stats?{}", crate::stats::around_now()),
    ];
    (ada, queries)
}

/// Every row of the projection's tables, as ordered JSON text: the read model to compare.
async fn dump(app: &TestApp, projection: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for table in parley_projectors::rebuild::find(projection).unwrap().tables {
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT to_jsonb(t)::text AS r FROM public.{table} t ORDER BY r"
        ))
        .fetch_all(&app.pg)
        .await
        .unwrap();
        out.push((table.to_string(), rows));
    }
    out
}

/// The rebuild's JSON report, checked to have changed no row.
fn assert_unchanged(report: &Value) {
    for t in report["tables"].as_array().unwrap() {
        assert_eq!(
            (t["removed"].as_u64(), t["added"].as_u64()),
            (Some(0), Some(0)),
            "{t}"
        );
    }
}

#[tokio::test]
async fn status_shows_each_projectors_checkpoint_and_no_lag_once_caught_up() {
    let app = spawn_app().await;
    populate(&app).await;
    let out = app.parley(&["projections", "status", "--json"]).await;
    let rows: Vec<Value> = serde_json::from_str(&expect_exit(&out, 0)).unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["projector"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["chats", "users", "receipts", "activity-receipts"]);
    for r in &rows {
        assert_eq!(r["lag_events"], 0, "{r}");
        assert_eq!(r["lag_seconds"], 0.0, "{r}");
        assert_eq!(r["acked"], r["stream_last"], "{r}");
        assert_eq!(r["checkpoint"], r["stream_last"], "{r}");
    }
    let out = app.parley(&["projections", "status"]).await;
    let table = expect_exit(&out, 0);
    assert!(table.starts_with("PROJECTOR"), "{table}");
    assert_eq!(table.lines().count(), 5, "{table}");
}

#[tokio::test]
async fn status_counts_the_events_a_stopped_projector_has_not_applied() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let chat = app.group(&ada, &[]).await;
    app.settled().await;
    // Stop every projector, then write: the lag is what they have not seen.
    app.shutdown.cancel();
    let js = &app.js;
    let before = app.stored("CHATS").await.len() as u64;
    for i in 0..3 {
        let subject = format!("chats.{chat}");
        // Not a decodable event: the status counts stream messages, whatever they hold.
        js.publish(subject, format!("{{\"n\":{i}}}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let out = app.parley(&["projections", "status", "--json"]).await;
    let rows: Vec<Value> = serde_json::from_str(&expect_exit(&out, 0)).unwrap();
    let chats_row = rows.iter().find(|r| r["projector"] == "chats").unwrap();
    assert_eq!(chats_row["stream_last"], before + 3);
    assert_eq!(chats_row["checkpoint"], before);
    assert_eq!(chats_row["lag_events"], 3, "{chats_row}");
    assert!(chats_row["lag_seconds"].as_f64().unwrap() >= 0.0);
    let users_row = rows.iter().find(|r| r["projector"] == "users").unwrap();
    assert_eq!(users_row["lag_events"], 0);
}

/// Runs `rebuild` while a task asks every query again and again, comparing each answer with
/// the one given before the rebuild. Returns the rebuild's report.
async fn rebuild_under_queries(
    app: &TestApp,
    token: &str,
    queries: &[String],
    projection: &str,
) -> Value {
    let mut baseline = Vec::new();
    for q in queries {
        let (s, body) = app.get(q, Some(token)).await;
        assert_eq!(s, 200, "{q}: {body}");
        baseline.push(body);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let asked = Arc::new(AtomicU64::new(0));
    let hammer = {
        let (stop, asked) = (stop.clone(), asked.clone());
        let (http, base, token) = (app.http.clone(), app.base.clone(), token.to_owned());
        let queries = queries.to_vec();
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for (q, want) in queries.iter().zip(&baseline) {
                    let res = http
                        .get(format!("{base}{q}"))
                        .bearer_auth(&token)
                        .send()
                        .await;
                    asked.fetch_add(1, Ordering::SeqCst);
                    match res {
                        Ok(r) if r.status() == 200 => {
                            let got: Value = r.json().await.unwrap_or(Value::Null);
                            if &got != want {
                                failures.push(format!("{q} answered differently: {got}"));
                            }
                        }
                        Ok(r) => failures.push(format!("{q}: {}", r.status())),
                        Err(e) => failures.push(format!("{q}: {e}")),
                    }
                }
            }
            failures
        })
    };
    let out = app
        .parley(&["projections", "rebuild", projection, "--json"])
        .await;
    let report: Value = serde_json::from_str(&expect_exit(&out, 0)).unwrap();
    // Keep asking a little after the swap too.
    let after = asked.load(Ordering::SeqCst) + queries.len() as u64;
    parley_test_support::eventually(Duration::from_secs(10), "queries after the swap", || {
        let asked = asked.clone();
        async move { (asked.load(Ordering::SeqCst) >= after).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let failures = hammer.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} failed or differing queries: {failures:#?}",
        failures.len()
    );
    assert!(
        asked.load(Ordering::SeqCst) > queries.len() as u64,
        "the queries ran"
    );
    report
}

#[tokio::test]
async fn rebuilding_under_concurrent_queries_gives_an_identical_read_model_and_no_failed_query() {
    let app = spawn_app().await;
    let (ada, queries) = populate(&app).await;
    for projection in ["read-models", "activity"] {
        let before = dump(&app, projection).await;
        assert!(
            before.iter().all(|(_, rows)| !rows.is_empty()),
            "{projection} is populated"
        );
        let report = rebuild_under_queries(&app, &ada.token, &queries, projection).await;
        assert_unchanged(&report);
        assert_eq!(
            dump(&app, projection).await,
            before,
            "{projection} after the rebuild"
        );
    }
    // The scratch schemas are gone.
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'parley_rebuild%'",
    )
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn a_rebuild_repairs_a_damaged_read_model() {
    let app = spawn_app().await;
    populate(&app).await;
    let before = (
        dump(&app, "read-models").await,
        dump(&app, "activity").await,
    );
    sqlx::query("DELETE FROM messages WHERE sequence = 5")
        .execute(&app.pg)
        .await
        .unwrap();
    sqlx::query("UPDATE chats SET title = 'vandalised'")
        .execute(&app.pg)
        .await
        .unwrap();
    sqlx::query("UPDATE members SET read_up_to = 0")
        .execute(&app.pg)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO users (user_id, handle, display_name, created_at, version) \
                 VALUES (gen_random_uuid(), 'ghost', 'Ghost', now(), 1)",
    )
    .execute(&app.pg)
    .await
    .unwrap();
    sqlx::query("DELETE FROM activity_messages")
        .execute(&app.pg)
        .await
        .unwrap();
    assert_ne!(dump(&app, "read-models").await, before.0);
    for projection in ["read-models", "activity"] {
        let out = app.parley(&["projections", "rebuild", projection]).await;
        let text = expect_exit(&out, 0);
        assert!(
            text.starts_with(&format!("rebuilt {projection} from ")),
            "{text}"
        );
    }
    assert_eq!(dump(&app, "read-models").await, before.0);
    assert_eq!(dump(&app, "activity").await, before.1);
}

#[tokio::test]
async fn a_rebuild_while_messages_keep_coming_leaves_nothing_for_the_next_rebuild_to_fix() {
    let app = spawn_app().await;
    let (ada, _) = populate(&app).await;
    let chat = app.group(&ada, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let (http, base, token) = (app.http.clone(), app.base.clone(), ada.token.clone());
        tokio::spawn(async move {
            let mut sent = 0;
            while !stop.load(Ordering::SeqCst) {
                let res = http
                    .post(format!("{base}/v1/chats/{chat}/messages"))
                    .bearer_auth(&token)
                    .json(&json!({"body": format!("during {sent}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
                sent += 1;
            }
            sent
        })
    };
    let out = app
        .parley(&["projections", "rebuild", "read-models", "--json"])
        .await;
    expect_exit(&out, 0);
    stop.store(true, Ordering::SeqCst);
    let sent = writer.await.unwrap();
    assert!(sent > 0);
    app.settled().await;
    for projection in ["read-models", "activity"] {
        let out = app
            .parley(&["projections", "rebuild", projection, "--json"])
            .await;
        let report: Value = serde_json::from_str(&expect_exit(&out, 0)).unwrap();
        assert_unchanged(&report);
    }
}

#[tokio::test]
async fn a_rebuild_of_an_unknown_projection_or_a_second_concurrent_one_exits_2_and_changes_nothing()
{
    let app = spawn_app().await;
    populate(&app).await;
    let before = dump(&app, "read-models").await;
    let out = app.parley(&["projections", "rebuild", "chats"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown projection") && err.contains("read-models"),
        "{err}"
    );

    // Another rebuild holds the lock.
    let mut other = app.pg.acquire().await.unwrap();
    let held: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('parley.projections.rebuild'))")
            .fetch_one(&mut *other)
            .await
            .unwrap();
    assert!(held);
    sqlx::query("UPDATE chats SET title = 'changed by hand'")
        .execute(&app.pg)
        .await
        .unwrap();
    let damaged = dump(&app, "read-models").await;
    assert_ne!(damaged, before);
    let out = app.parley(&["projections", "rebuild", "read-models"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    assert_eq!(dump(&app, "read-models").await, damaged, "nothing changed");
    sqlx::query("SELECT pg_advisory_unlock(hashtext('parley.projections.rebuild'))")
        .execute(&mut *other)
        .await
        .unwrap();
}
