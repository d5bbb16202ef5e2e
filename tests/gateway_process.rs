//! The push gateway as a real process (the `parley` binary, `parley push-gateway`), next to a
//! `parley up` child that serves commands, queries and runs the projectors: a gateway killed
//! with SIGKILL mid-stream loses nothing once restarted, and a client that stops reading is cut
//! off without the gateway's memory growing past a bound; its admission settings come from
//! the environment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use parley_test_support::{Api, NatsServer, ParleyChild, TestDb, eventually, proc_status_kib};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const WAIT: Duration = Duration::from_secs(20);

/// `parley <role>` as a child process of this test.
async fn parley(nats: &NatsServer, db: &TestDb, role: &str) -> ParleyChild {
    ParleyChild::start(env!("CARGO_BIN_EXE_parley"), role, &nats.url(), &db.url).await
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(port: u16, token: &str) -> Ws {
    let mut req = format!("ws://127.0.0.1:{port}/v1/ws")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket");
    let ready = next_json(&mut ws, WAIT).await.expect("ready frame");
    assert_eq!(ready["type"], "ready", "{ready}");
    ws
}

/// The next JSON text frame; `None` when the socket ends or nothing comes within `wait`.
async fn next_json(ws: &mut Ws, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.ok()?? {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// NATS, a database, and a `parley up` child (commands, queries, projectors) on them.
async fn stack() -> (NatsServer, TestDb, ParleyChild, Api) {
    let nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let up = parley(&nats, &db, "up").await;
    let api = Api::new(up.base());
    (nats, db, up, api)
}

/// What a device has of one chat: the next sequence it expects, and each message's body.
struct Received {
    next: u64,
    bodies: HashMap<u64, String>,
}

impl Received {
    /// Takes one frame: a duplicate of what it holds is dropped (the contract allows it);
    /// anything but the next sequence is a gap or reorder and fails the test.
    fn take(&mut self, chat: &str, f: &Value) {
        if f["type"] != "newMessage" && f["type"] != "chatUpdate" {
            return;
        }
        assert_eq!(f["chat_id"], chat, "{f}");
        let seq = f["sequence"].as_u64().unwrap();
        if seq < self.next {
            return;
        }
        assert_eq!(seq, self.next, "gap or reorder: {f}");
        if let Some(body) = f["message"]["body"].as_str() {
            self.bodies.insert(seq, body.to_owned());
        }
        self.next += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_process_killed_with_sigkill_mid_stream_loses_nothing_after_restart() {
    let (nats, db, _up, api) = stack().await;
    let ada = api.signup("ada").await;
    let bob = api.signup("bob").await;
    let chat = api.group(&ada, &[&bob]).await;
    let mut gateway = parley(&nats, &db, "push-gateway").await;
    let mut ws = connect(gateway.port(), &bob.token).await;

    const MESSAGES: usize = 300;
    let sender = {
        let (api, ada, chat) = (api.clone(), ada.clone(), chat.clone());
        tokio::spawn(async move {
            let mut last = 0;
            for i in 0..MESSAGES {
                last = api.send_message(&ada, &chat, &format!("m{i}")).await.1;
                // Keeps the stream flowing across the kill and the restart.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            last
        })
    };

    let mut got = Received {
        next: 1,
        bodies: HashMap::new(),
    };
    while got.next <= 60 {
        let f = next_json(&mut ws, WAIT)
            .await
            .unwrap_or_else(|| panic!("stalled at {}", got.next));
        got.take(&chat, &f);
        if got.next.is_multiple_of(10) {
            let acked = got.next - 1;
            let ack = json!({"type": "ack", "chat_id": chat, "sequence": acked});
            ws.send(Message::text(ack.to_string())).await.unwrap();
        }
    }
    assert!(!sender.is_finished(), "the kill must come mid-stream");
    gateway.kill();
    // Whatever the dead socket still holds is read; then it ends without a close frame.
    while let Some(f) = next_json(&mut ws, Duration::from_secs(5)).await {
        got.take(&chat, &f);
    }
    let killed_at = got.next;

    let gateway = parley(&nats, &db, "push-gateway").await;
    let mut ws = connect(gateway.port(), &bob.token).await;
    let last = sender.await.unwrap();
    assert_eq!(last, MESSAGES as u64 + 1, "created, then every message");
    while got.next <= last {
        let f = next_json(&mut ws, WAIT)
            .await
            .unwrap_or_else(|| panic!("stalled at {} of {last} (killed at {killed_at})", got.next));
        got.take(&chat, &f);
    }
    for i in 0..MESSAGES {
        let seq = i as u64 + 2;
        assert_eq!(
            got.bodies.get(&seq).map(String::as_str),
            Some(format!("m{i}").as_str())
        );
    }
}

/// Documented in docs/delivery.md ("Limits"): what one connection that stops reading may cost
/// the gateway before it is cut off.
const RSS_GROWTH_BOUND_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_the_gateway_memory_stays_bounded() {
    let (nats, db, _up, api) = stack().await;
    let ada = api.signup("ada").await;
    let bob = api.signup("bob").await;
    // Eight chats, so the senders never contend for one chat's sequence.
    let mut chats = Vec::new();
    for _ in 0..8 {
        chats.push(api.group(&ada, &[&bob]).await);
    }
    // Projected first, so the replay below is not a race with the projector.
    eventually(WAIT, "bob's 8 chats in the read model", || async {
        let (_, list) = api.get("/v1/chats", Some(&bob.token)).await;
        (list["chats"].as_array().map(Vec::len) == Some(8)).then_some(())
    })
    .await;
    let gateway = parley(&nats, &db, "push-gateway").await;
    let mut ws = connect(gateway.port(), &bob.token).await;
    // Bob's socket replays the eight `created` events, then Bob stops reading.
    for _ in 0..8 {
        next_json(&mut ws, WAIT).await.expect("created");
    }
    let baseline = proc_status_kib(gateway.pid(), "VmRSS:");

    const PER_CHAT: usize = 750;
    let body = "x".repeat(3500);
    let api = &api;
    let sent = futures::future::join_all(chats.iter().map(|chat| {
        let (ada, body) = (&ada, &body);
        async move {
            for _ in 0..PER_CHAT {
                api.send_message(ada, chat, body).await;
            }
        }
    }));
    sent.await;
    let total = 8 * PER_CHAT;

    // The socket holds what the kernel buffered, then ends: the gateway cut it off.
    let mut frames = 0;
    let ended = tokio::time::timeout(WAIT, async {
        while next_json(&mut ws, Duration::from_secs(10)).await.is_some() {
            frames += 1;
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was not closed");
    assert!(
        frames < total,
        "a client that did not read got all {total} frames: it was never cut off"
    );
    let peak = proc_status_kib(gateway.pid(), "VmHWM:");
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "gateway RSS: baseline {baseline} KiB, peak {peak} KiB, growth {growth} KiB; \
         {frames} of {total} frames reached the client before it was cut off"
    );
    assert!(
        growth < RSS_GROWTH_BOUND_KIB,
        "gateway RSS grew by {growth} KiB (bound {RSS_GROWTH_BOUND_KIB} KiB)"
    );
}

#[tokio::test]
async fn the_origin_allowlist_and_the_per_address_limit_come_from_the_environment() {
    let nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let up = ParleyChild::start_with(
        env!("CARGO_BIN_EXE_parley"),
        "up",
        &nats.url(),
        &db.url,
        &[
            (
                "PARLEY_WS_ALLOWED_ORIGINS",
                "https://chat.example.com, https://beta.example.com",
            ),
            ("PARLEY_WS_MAX_CONNECTIONS_PER_IP", "1"),
        ],
    )
    .await;
    let url = format!("ws://127.0.0.1:{}/v1/ws", up.port());
    let open = |origin: &'static str| {
        let url = url.clone();
        async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut().insert("origin", origin.parse().unwrap());
            tokio_tungstenite::connect_async(req).await
        }
    };
    let status = |r: Result<_, tokio_tungstenite::tungstenite::Error>| match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => res.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => 101,
    };
    assert_eq!(status(open("https://evil.example").await), 403);
    // Not yet authenticated, from the second listed origin: it holds the address's one slot.
    let (_held, _) = open("https://beta.example.com").await.unwrap();
    assert_eq!(status(open("https://chat.example.com").await), 429);
}
