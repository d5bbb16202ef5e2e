//! A whole Parley in-process (`parley up` on a private nats-server and a fresh database), HTTP
//! and WebSocket helpers to populate it, and `parley(…)`: the built binary run against it.

use std::process::Output;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use parley::{App, Role, Settings};
pub use parley_test_support::User;
use parley_test_support::{Api, NatsServer, TestDb, eventually, last_stored};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use tokio_util::sync::CancellationToken;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ack(ws: &mut Socket, chat: &str, up_to: u64) {
    ws.send(Message::text(
        json!({"type": "ack", "chat_id": chat, "sequence": up_to}).to_string(),
    ))
    .await
    .unwrap();
}

/// Reads JSON frames until one satisfies `wanted`; panics after 10 s with `what`.
async fn read_until(ws: &mut Socket, what: &str, wanted: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{what} in time"))
            .unwrap()
            .unwrap();
        let Ok(frame) = serde_json::from_str::<Value>(frame.to_text().unwrap_or("")) else {
            continue;
        };
        if wanted(&frame) {
            return;
        }
    }
}

/// The last event stored on `subject` of `RECEIPTS`, as text.
async fn last_on(js: &async_nats::jetstream::Context, subject: &str) -> Option<String> {
    let last = last_stored(js, "RECEIPTS", subject).await?;
    Some(String::from_utf8_lossy(&last.payload).into_owned())
}

pub struct TestApp {
    /// The HTTP calls (`app.post(…)`, `app.signup(…)`, `app.http`, `app.base` through `Deref`).
    pub api: Api,
    pub port: u16,
    pub shutdown: CancellationToken,
    pub js: async_nats::jetstream::Context,
    pub pg: sqlx::PgPool,
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

/// The settings of a test Parley on `nats` and `db`.
fn settings(nats: &NatsServer, db: &TestDb) -> Settings {
    let mut settings = Settings::default();
    settings.infra.nats_url = nats.url();
    settings.infra.database_url = db.url.clone();
    settings.infra.pg_max_connections = 16;
    // Tests send in bursts; the limits have their own tests.
    settings.command.limits = parley_command_api::LimitsConfig::off();
    settings.command.password_cost = parley_test_support::CHEAP_PASSWORD_HASHES.parse().unwrap();
    settings
}

pub async fn spawn_app() -> TestApp {
    let nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let settings = settings(&nats, &db);
    let shutdown = CancellationToken::new();
    let port = App::spawn_on_loopback(settings, Role::All, shutdown.clone())
        .await
        .expect("build app");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let pg = db.pool().await;
    TestApp {
        api: Api::new(format!("http://127.0.0.1:{port}")),
        port,
        shutdown,
        js,
        pg,
        nats,
        db,
    }
}

impl TestApp {
    /// The message id at `sequence` of `chat`, once the read model holds it.
    pub async fn message_id(&self, user: &User, chat: &str, sequence: u64) -> String {
        let (s, v) = self
            .get(
                &format!(
                    "/v1/chats/{chat}/messages?after={}&limit=1&min_sequence={sequence}",
                    sequence - 1
                ),
                Some(&user.token),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v["messages"][0]["message_id"].as_str().unwrap().to_owned()
    }

    /// One of each feature event (title, role, edit, reactions, delete, settings, blocks),
    /// leaving an edit, a reaction, a setting and a block in the read models. `chat` is a
    /// group `ada` administers with `bob` in it; `carol` is anyone.
    pub async fn every_feature(&self, ada: &User, bob: &User, carol: &User, chat: &str) {
        use reqwest::Method;
        let kept = self.message(ada, chat, "to be edited").await;
        let kept = self.message_id(ada, chat, kept).await;
        let gone = self.message(ada, chat, "to be deleted").await;
        let gone = self.message_id(ada, chat, gone).await;
        let k = format!("/v1/chats/{chat}/messages/{kept}");
        let thumbs = format!("{k}/reactions/%F0%9F%91%8D");
        let block = format!("/v1/users/{}/block", carol.user_id);
        let calls: Vec<(Method, String, &User, Option<Value>)> = vec![
            (
                Method::PATCH,
                format!("/v1/chats/{chat}"),
                ada,
                Some(json!({"title": "renamed"})),
            ),
            (
                Method::PUT,
                format!("/v1/chats/{chat}/members/{}/role", bob.user_id),
                ada,
                Some(json!({"role": "admin"})),
            ),
            (
                Method::PATCH,
                k.clone(),
                ada,
                Some(json!({"body": "edited"})),
            ),
            (Method::PUT, thumbs.clone(), bob, None),
            (Method::DELETE, thumbs.clone(), bob, None),
            (Method::PUT, thumbs, bob, None),
            (
                Method::DELETE,
                format!("/v1/chats/{chat}/messages/{gone}"),
                ada,
                None,
            ),
            (
                Method::PUT,
                format!("/v1/chats/{chat}/settings"),
                bob,
                Some(json!({"muted": true})),
            ),
            (Method::POST, block.clone(), bob, None),
            (Method::DELETE, block.clone(), bob, None),
            (Method::POST, block, bob, None),
        ];
        for (method, path, who, body) in calls {
            let (s, b) = self
                .call(method.clone(), &path, Some(&who.token), body)
                .await;
            assert!((200..300).contains(&s), "{method} {path}: {s} {b}");
        }
    }

    /// Sends a message; returns its chat sequence.
    pub async fn message(&self, from: &User, chat: &str, body: &str) -> u64 {
        self.send_message(from, chat, body).await.1
    }

    /// Connects `user`'s device to the gateway and acks everything of `chat` up to `up_to`,
    /// then waits until the delivered receipt is stored.
    pub async fn deliver(&self, user: &User, chat: &str, up_to: u64) {
        let mut ws = self.socket_up_to(self.port, user, chat, up_to).await;
        ack(&mut ws, chat, up_to).await;
        let subject = format!("receipts.{chat}");
        let device = user.device_id.clone();
        eventually(Duration::from_secs(10), "the delivered receipt", || {
            let (js, subject, device) = (self.js.clone(), subject.clone(), device.clone());
            async move {
                let text = last_on(&js, &subject).await?;
                (text.contains(&device) && text.contains(&format!("\"up_to\":{up_to}")))
                    .then_some(())
            }
        })
        .await;
        let _ = ws.close(None).await;
    }

    /// As `deliver` for several users' devices at once, through a gateway of its own that
    /// flushes acks only when it stops: their receipts are surely one
    /// `parley.receipt.delivered_batch.v1`, which this waits for.
    pub async fn deliver_in_one_batch(&self, users: &[&User], chat: &str, up_to: u64) {
        let mut settings = settings(&self.nats, &self.db);
        settings.gateway.ack_flush = Duration::from_secs(3600);
        let stop = CancellationToken::new();
        let port = App::spawn_on_loopback(settings, Role::PushGateway, stop.clone())
            .await
            .expect("build a gateway");
        let mut sockets = Vec::new();
        for user in users {
            let mut ws = self.socket_up_to(port, user, chat, up_to).await;
            ack(&mut ws, chat, up_to).await;
            sockets.push(ws);
        }
        // A connection handles its frames in order: once it answers a ping, its ack is held.
        for ws in &mut sockets {
            ws.send(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
            read_until(ws, "a pong", |f| f["type"] == "pong").await;
        }
        stop.cancel();
        let subject = format!("receipts.{chat}");
        let batch = eventually(Duration::from_secs(10), "the batch flushed at stop", || {
            let (js, subject) = (self.js.clone(), subject.clone());
            async move {
                let event: Value = serde_json::from_str(&last_on(&js, &subject).await?).ok()?;
                (event["type"] == "parley.receipt.delivered_batch.v1").then_some(event)
            }
        })
        .await;
        let receipts = batch["data"]["receipts"].as_array().unwrap();
        assert_eq!(receipts.len(), users.len(), "{batch}");
        for user in users {
            assert!(
                receipts
                    .iter()
                    .any(|r| r["device_id"] == user.device_id.as_str()),
                "{batch}"
            );
        }
    }

    /// A socket of `user`'s device on the gateway at `port`, once it has sent `chat`'s events
    /// up to `up_to` (the gateway takes acks only for what it sent on the connection).
    async fn socket_up_to(&self, port: u16, user: &User, chat: &str, up_to: u64) -> Socket {
        // The gateway learns the user's chats from the read model when the socket opens.
        self.settled().await;
        let mut req = format!("ws://127.0.0.1:{port}/v1/ws")
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", user.token).parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let ready = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("ready frame in time")
            .unwrap()
            .unwrap();
        assert!(ready.to_text().unwrap().contains("ready"), "{ready}");
        read_until(&mut ws, "the chat's events up to the ack", |f| {
            f["chat_id"] == chat && f["sequence"].as_u64() >= Some(up_to)
        })
        .await;
        ws
    }

    /// Waits until every projector has acknowledged everything in its stream.
    pub async fn settled(&self) {
        eventually(Duration::from_secs(20), "projectors caught up", || async {
            let rows = parley_projectors::status::status(&self.js, &self.pg)
                .await
                .ok()?;
            rows.iter().all(|r| r.lag_events == 0).then_some(())
        })
        .await;
    }

    /// Every stored payload of `stream`, in order, read by stream sequence.
    pub async fn stored(&self, stream: &str) -> Vec<Vec<u8>> {
        let mut s = self.js.get_stream(stream).await.unwrap();
        let last = s.info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            out.push(s.get_raw_message(seq).await.unwrap().payload.to_vec());
        }
        out
    }

    /// Runs the built `parley` binary against this app's NATS and database.
    pub async fn parley(&self, args: &[&str]) -> Output {
        let child = self.command(args).spawn().expect("run parley");
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("parley finished within 60 s")
            .expect("parley output")
    }

    /// The `parley` command, not started, with piped output.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"));
        cmd.args(args)
            .env("NATS_URL", self.nats.url())
            .env("DATABASE_URL", &self.db.url)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd
    }
}

/// Stdout as text, with stderr in the message when the exit code is not `code`.
pub fn expect_exit(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}
