//! The connection contract of `GET /v1/ws`: authentication, limits, client frames, revocation,
//! slow consumers, idle and shutdown — against a real NATS server and PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures::SinkExt;
use parley_push_gateway::GatewayConfig;
use serde_json::json;
use support::{Ended, Harness, WAIT};
use tokio_tungstenite::tungstenite::{self, Message};

#[tokio::test]
async fn header_auth_gets_ready_with_the_user_and_device() {
    let h = Harness::start().await;
    let d = h.login().await;
    let mut c = h.connect_raw(Some(&d.token)).await.unwrap();
    let ready = c.next_json().await;
    assert_eq!(
        ready,
        json!({"type": "ready", "user_id": d.user, "device_id": d.device})
    );
}

#[tokio::test]
async fn first_frame_auth_gets_ready_with_the_user_and_device() {
    let h = Harness::start().await;
    let d = h.login().await;
    let mut c = h.connect_raw(None).await.unwrap();
    c.send_json(json!({"type": "auth", "token": d.token})).await;
    let ready = c.next_json().await;
    assert_eq!(
        ready,
        json!({"type": "ready", "user_id": d.user, "device_id": d.device})
    );
}

#[tokio::test]
async fn a_bad_header_token_is_refused_with_401_problem_json_before_upgrading() {
    let h = Harness::start().await;
    let err = h.connect_raw(Some("not-a-token")).await.err().unwrap();
    let tungstenite::Error::Http(response) = err else {
        panic!("expected an HTTP refusal, got {err:?}");
    };
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: serde_json::Value =
        serde_json::from_slice(response.body().as_ref().unwrap()).unwrap();
    assert_eq!(body["status"], 401);
}

#[tokio::test]
async fn a_bad_first_frame_token_gets_an_unauthorized_error_and_close_4401() {
    let h = Harness::start().await;
    let mut c = h.connect_raw(None).await.unwrap();
    c.send_json(json!({"type": "auth", "token": "nope"})).await;
    let err = c.next_json().await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "unauthorized");
    assert_eq!(c.close_code().await, 4401);
}

#[tokio::test]
async fn a_first_frame_that_is_not_auth_gets_unauthorized_and_close_4401() {
    let h = Harness::start().await;
    let mut c = h.connect_raw(None).await.unwrap();
    c.send_json(json!({"type": "ping"})).await;
    assert_eq!(c.next_json().await["code"], "unauthorized");
    assert_eq!(c.close_code().await, 4401);
}

#[tokio::test]
async fn no_auth_frame_within_the_auth_timeout_closes_with_4401() {
    let h = Harness::with_config(GatewayConfig {
        auth_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let mut c = h.connect_raw(None).await.unwrap();
    assert_eq!(c.next_json().await["code"], "unauthorized");
    assert_eq!(c.close_code().await, 4401);
}

#[tokio::test]
async fn ping_is_answered_with_pong() {
    let h = Harness::start().await;
    let d = h.login().await;
    let mut c = h.connect(&d).await;
    c.send_json(json!({"type": "ping"})).await;
    assert_eq!(c.next_json().await, json!({"type": "pong"}));
}

#[tokio::test]
async fn malformed_unknown_and_binary_frames_get_bad_frame_errors_and_the_connection_stays_open() {
    let h = Harness::start().await;
    let d = h.login().await;
    let mut c = h.connect(&d).await;
    for bad in [
        Message::text("{not json"),
        Message::text(r#"{"type":"dance"}"#),
        Message::text(r#"{"type":"ack","chat_id":"x","sequence":1}"#),
        Message::binary(vec![1u8, 2, 3]),
    ] {
        c.send(bad).await;
        let err = c.next_json().await;
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["code"], "bad_frame", "{err}");
        assert!(err["detail"].is_string());
    }
    c.send_json(json!({"type": "ping"})).await;
    assert_eq!(c.next_json().await["type"], "pong");
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let h = Harness::with_config(GatewayConfig {
        max_frame_bytes: 1024,
        ..Default::default()
    })
    .await;
    let d = h.login().await;
    let mut c = h.connect(&d).await;
    c.send(Message::text("x".repeat(4096))).await;
    let (ended, _) = c.until_closed(WAIT).await;
    match ended {
        Ended::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }
}

#[tokio::test]
async fn a_frame_many_times_the_read_buffer_but_within_the_limit_is_read_whole() {
    // The socket reads through a 1 KiB buffer; a 32 KiB frame (limit 64 KiB) must arrive
    // whole: a ping padded with an extra field is parsed as one ping and answered, and the
    // socket stays usable.
    let h = Harness::start().await;
    let d = h.login().await;
    let mut c = h.connect(&d).await;
    let padded = json!({"type": "ping", "padding": "x".repeat(32 * 1024)});
    c.send(Message::text(padded.to_string())).await;
    assert_eq!(c.next_json().await["type"], "pong");
    c.send_json(json!({"type": "ping"})).await;
    assert_eq!(c.next_json().await["type"], "pong");
}

#[tokio::test]
async fn a_revoked_device_is_closed_with_4401_and_other_devices_stay() {
    let h = Harness::start().await;
    let d = h.login().await;
    let other = h.login_as(d.user).await;
    let mut c = h.connect(&d).await;
    let mut o = h.connect(&other).await;
    h.notify(
        "notify.devices.revoked".into(),
        json!({"device_id": d.device}),
    )
    .await;
    assert_eq!(c.close_code().await, 4401);
    o.send_json(json!({"type": "ping"})).await;
    assert_eq!(o.next_json().await["type"], "pong");
}

#[tokio::test]
async fn connections_over_the_per_user_limit_get_429_with_retry_after() {
    let h = Harness::with_config(GatewayConfig {
        max_connections_per_user: 1,
        ..Default::default()
    })
    .await;
    let d = h.login().await;
    let _first = h.connect(&d).await;
    let err = h.connect_raw(Some(&d.token)).await.err().unwrap();
    let tungstenite::Error::Http(response) = err else {
        panic!("expected an HTTP refusal, got {err:?}");
    };
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    // Another user is not affected.
    let someone = h.login().await;
    h.connect(&someone).await;
}

/// The refusal of an upgrade: its status and problem+json body.
fn refusal(err: tungstenite::Error) -> (u16, serde_json::Value) {
    let tungstenite::Error::Http(response) = err else {
        panic!("expected an HTTP refusal, got {err:?}");
    };
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body = serde_json::from_slice(response.body().as_ref().unwrap()).unwrap();
    (response.status().as_u16(), body)
}

#[tokio::test]
async fn connections_over_the_per_address_limit_get_429_authenticated_or_not() {
    let h = Harness::with_config(GatewayConfig {
        max_connections_per_ip: Some(2),
        ..Default::default()
    })
    .await;
    let (ada, bob) = (h.login().await, h.login().await);
    // A socket that has not authenticated yet holds a slot of its address too.
    let unauthenticated = h.connect_raw(None).await.unwrap();
    let _ada = h.connect(&ada).await;
    let (status, body) = refusal(h.connect_raw(Some(&bob.token)).await.err().unwrap());
    assert_eq!(status, 429);
    assert_eq!(body["detail"], "this address has too many open connections");
    let (status, _) = refusal(h.connect_raw(None).await.err().unwrap());
    assert_eq!(status, 429, "unauthenticated sockets are refused as well");

    // Closing one frees its slot (once the server has seen the close).
    drop(unauthenticated);
    let (h, bob) = (&h, &bob);
    parley_test_support::eventually(WAIT, "a freed address slot", || async move {
        let mut c = h.connect_raw(Some(&bob.token)).await.ok()?;
        (c.next_json().await["type"] == "ready").then_some(())
    })
    .await;
}

#[tokio::test]
async fn only_allowed_origins_may_open_a_socket_and_native_clients_send_none() {
    let h = Harness::with_config(GatewayConfig {
        allowed_origins: Some(vec!["https://chat.example.com".into()]),
        ..Default::default()
    })
    .await;
    let d = h.login().await;
    let (status, body) = refusal(
        h.connect_from(Some(&d.token), Some("https://evil.example"))
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(status, 403);
    assert_eq!(body["status"], 403);
    // Refused before authenticating: a bad token from a bad origin is still a 403.
    let (status, _) = refusal(
        h.connect_from(Some("not-a-token"), Some("https://evil.example"))
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(status, 403);

    for origin in [
        Some("https://chat.example.com"),
        Some("HTTPS://Chat.Example.COM"),
        None,
    ] {
        let mut c = h.connect_from(Some(&d.token), origin).await.unwrap();
        assert_eq!(c.next_json().await["type"], "ready", "origin {origin:?}");
    }
}

#[tokio::test]
async fn a_connection_without_client_frames_is_closed_after_the_idle_timeout() {
    let h = Harness::with_config(GatewayConfig {
        idle_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let d = h.login().await;
    let mut c = h.connect(&d).await;
    assert_eq!(c.close_code().await, 4408);
}

#[tokio::test]
async fn client_frames_keep_a_connection_open_past_the_idle_timeout_until_they_stop() {
    let timeout = Duration::from_millis(400);
    let h = Harness::with_config(GatewayConfig {
        idle_timeout: timeout,
        ..Default::default()
    })
    .await;
    let d = h.login().await;
    let mut c = h.connect(&d).await;
    let opened = std::time::Instant::now();
    // A ping every quarter of the timeout, for three timeouts: each one is answered, so the
    // timer that first fires at 400 ms is pushed back past every frame, not obeyed.
    while opened.elapsed() < timeout * 3 {
        c.send_json(json!({"type": "ping"})).await;
        assert_eq!(c.next_json().await, json!({"type": "pong"}));
        tokio::time::sleep(timeout / 4).await;
    }
    // Then silence: closed as idle, a timeout after the last frame.
    let quiet = std::time::Instant::now();
    assert_eq!(c.close_code().await, 4408);
    assert!(
        quiet.elapsed() >= timeout / 2,
        "closed {:?} after the last frame, well before the {timeout:?} timeout",
        quiet.elapsed()
    );
}

#[tokio::test]
async fn shutdown_closes_sockets_with_going_away() {
    let h = Harness::start().await;
    let d = h.login().await;
    let mut c = h.connect(&d).await;
    h.stack.infra.shutdown.cancel();
    assert_eq!(c.close_code().await, 1001);
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_as_a_slow_consumer() {
    let h = Harness::with_config(GatewayConfig {
        queue_frames: 4,
        ..Default::default()
    })
    .await;
    let alice = h.login().await;
    let chat = h.create_chat(alice.user, &[]).await;
    let mut c = h.connect(&alice).await;
    // Far more than the socket buffers hold; the client reads nothing meanwhile.
    let body = "x".repeat(3000);
    let total = 3000u64;
    for seq in 2..=total {
        h.to_nats(&chat.message(seq, alice.user, &body)).await;
    }
    let (ended, frames) = c.until_closed(Duration::from_secs(30)).await;
    assert!(
        (frames as u64) < total,
        "the server cut the client off instead of buffering (got {frames} frames)"
    );
    if let Ended::Close(Some(frame)) = &ended {
        assert_eq!(u16::from(frame.code), 1008);
        assert_eq!(frame.reason.as_str(), "slow consumer");
    }
}

#[tokio::test]
async fn a_client_that_sends_without_reading_stops_being_read_and_is_closed_when_idle() {
    let h = Harness::with_config(GatewayConfig {
        queue_frames: 4,
        idle_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let d = h.login().await;
    let mut c = h.connect(&d).await;
    // Every frame is answered with an error frame quoting it, which this client never reads.
    // Once the socket buffers and the server's outbox are full, the server stops reading the
    // client too (instead of queueing answers without bound), so the client's writes stall,
    // no frame resets the idle timer, and the connection is closed; the stalled write fails.
    let junk = Message::text(format!(r#"{{"type":"{}"}}"#, "x".repeat(190)));
    let sent = tokio::time::timeout(Duration::from_secs(60), async {
        let mut sent = 0u64;
        while c.ws.send(junk.clone()).await.is_ok() {
            sent += 1;
        }
        sent
    })
    .await
    .expect("the server ends a connection that never reads within the deadline");
    assert!(
        sent > 4,
        "the server read frames before it stopped ({sent})"
    );
}
