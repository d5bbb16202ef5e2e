//! Boots a whole Parley (`parley up` in-process) on a private NATS server and a fresh
//! database, and talks to it only through HTTP and WebSocket.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use parley::{App, Role, Settings};
#[allow(unused_imports)] // not every test binary names it
pub use parley_test_support::User;
use parley_test_support::{Api, NatsServer, TestDb};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    /// The HTTP calls (`app.post(…)`, `app.signup(…)`, `app.http`, `app.base` through `Deref`).
    pub api: Api,
    pub port: u16,
    pub shutdown: CancellationToken,
    pub nats: NatsServer,
    pub db: TestDb,
}

impl std::ops::Deref for TestApp {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A whole Parley with abuse limits off (tests send in bursts); `spawn_app_with` tunes it.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// `spawn_app` with settings adjusted by `adjust` (limits, say) after the test defaults.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let mut settings = Settings::default();
    settings.infra.nats_url = nats.url();
    settings.infra.database_url = db.url.clone();
    settings.infra.pg_max_connections = 16;
    settings.command.max_group_members = 5;
    settings.command.limits = parley_command_api::LimitsConfig::off();
    settings.command.password_cost = parley_test_support::CHEAP_PASSWORD_HASHES.parse().unwrap();
    adjust(&mut settings);
    let shutdown = CancellationToken::new();
    let port = App::spawn_on_loopback(settings, Role::All, shutdown.clone())
        .await
        .expect("build app");
    TestApp {
        api: Api::new(format!("http://127.0.0.1:{port}")),
        port,
        shutdown,
        nats,
        db,
    }
}

impl TestApp {
    /// `call` with a token.
    pub async fn call_as(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call(method, path, Some(token), body).await
    }

    /// The type of the last event stored on `subject` (`users.<id>`, `chats.<id>`) in `stream`.
    pub async fn last_event_type(&self, stream: &str, subject: &str) -> String {
        let event = self.last_event(stream, subject).await;
        event["type"].as_str().expect("type").to_owned()
    }

    /// The last CloudEvent stored on `subject` in `stream`, straight from JetStream (what the
    /// write side holds, whatever the projectors have applied so far).
    pub async fn last_event(&self, stream: &str, subject: &str) -> Value {
        let client = async_nats::connect(self.nats.url()).await.expect("nats");
        let js = async_nats::jetstream::new(client);
        let msg = parley_test_support::last_stored(&js, stream, subject)
            .await
            .expect("last message");
        serde_json::from_slice(&msg.payload).expect("cloudevent")
    }

    /// A gateway of its own (as `parley push-gateway`) on this app's NATS and database; stop
    /// it by cancelling the returned token.
    pub async fn spawn_gateway(&self) -> (u16, CancellationToken) {
        let mut settings = Settings::default();
        settings.infra.nats_url = self.nats.url();
        settings.infra.database_url = self.db.url.clone();
        settings.infra.pg_max_connections = 4;
        let stop = CancellationToken::new();
        let port = App::spawn_on_loopback(settings, Role::PushGateway, stop.clone())
            .await
            .expect("build gateway");
        (port, stop)
    }

    pub async fn socket(&self, token: &str) -> Socket {
        self.socket_at(self.port, token).await
    }

    pub async fn socket_at(&self, port: u16, token: &str) -> Socket {
        let mut req = format!("ws://127.0.0.1:{port}/v1/ws")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("websocket");
        let mut socket = Socket { ws };
        let ready = socket
            .next_frame(Duration::from_secs(5))
            .await
            .expect("ready frame");
        assert_eq!(ready["type"], "ready", "{ready}");
        socket
    }
}

pub struct Socket {
    pub ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Socket {
    /// The next JSON text frame, or `None` if none arrives within `wait`.
    pub async fn next_frame(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??
                .ok()?;
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).ok(),
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// The next chat event frame with this `sequence` (earlier ones are skipped).
    pub async fn event_at(&mut self, sequence: u64, wait: Duration) -> Value {
        loop {
            let f = self
                .next_event(wait)
                .await
                .unwrap_or_else(|| panic!("no frame with sequence {sequence}"));
            if f["sequence"].as_u64() == Some(sequence) {
                return f;
            }
        }
    }

    /// The next frame that is a chat event (`newMessage` / `chatUpdate`).
    pub async fn next_event(&mut self, wait: Duration) -> Option<Value> {
        loop {
            let f = self.next_frame(wait).await?;
            if f["type"] == "newMessage" || f["type"] == "chatUpdate" {
                return Some(f);
            }
        }
    }

    /// The next frame of type `ty`, skipping others; `None` if none arrives within `wait`.
    pub async fn next_of_type(&mut self, ty: &str, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.next_frame(left).await?;
            if f["type"] == ty {
                return Some(f);
            }
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send frame");
    }
}
