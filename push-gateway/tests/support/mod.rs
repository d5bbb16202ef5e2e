//! Test harness for the gateway: a real NATS server and PostgreSQL database (TestStack), the
//! router served on a free port, sessions in the KV bucket, chat events written like the real
//! system writes them (JetStream `chats.<id>` and/or the read models), and a WebSocket client
//! whose every wait has a deadline.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use chrono::Utc;
use futures::{SinkExt, StreamExt};
use parley_platform::{SessionRecord, token_key};
use parley_push_gateway::{GatewayConfig, router};
use parley_schemas::cloudevent::encode;
use parley_schemas::events::{ChatCreated, MemberRole, MessageSent, ParticipantsModified};
use parley_schemas::frames::{ChatItem, render};
use parley_schemas::{
    ChatEvent, ChatId, ChatKind, DeviceId, EventId, EventMeta, MessageId, Role, StoredEvent, UserId,
};
use parley_test_support::TestStack;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(10);

pub struct Harness {
    pub stack: TestStack,
    pub addr: SocketAddr,
}

pub struct Device {
    pub user: UserId,
    pub device: DeviceId,
    pub token: String,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::with_config(GatewayConfig::default()).await
    }

    pub async fn with_config(config: GatewayConfig) -> Harness {
        let stack = TestStack::start().await;
        let app = router(&stack.infra, config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = stack.infra.shutdown.clone();
        tokio::spawn(async move {
            // With the peer address, as `parley` serves it: the per-address limit needs it.
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .unwrap();
        });
        Harness { stack, addr }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// A logged-in device of a fresh user.
    pub async fn login(&self) -> Device {
        self.login_as(UserId::new()).await
    }

    pub async fn login_as(&self, user: UserId) -> Device {
        let device = DeviceId::new();
        let token = format!("token-{}", uuid::Uuid::now_v7().simple());
        let record = serde_json::to_vec(&SessionRecord {
            user_id: user,
            device_id: device,
        })
        .unwrap();
        self.stack
            .infra
            .buckets
            .sessions
            .put(token_key(&token), record.into())
            .await
            .unwrap();
        Device {
            user,
            device,
            token,
        }
    }

    /// Connects with `Authorization: Bearer` and waits for `ready`.
    pub async fn connect(&self, device: &Device) -> Client {
        let mut client = self.connect_raw(Some(&device.token)).await.unwrap();
        let ready = client.next_json().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        client
    }

    pub async fn connect_raw(&self, token: Option<&str>) -> Result<Client, tungstenite::Error> {
        self.connect_from(token, None).await
    }

    /// As `connect_raw`, with an `Origin` header as a browser would send.
    pub async fn connect_from(
        &self,
        token: Option<&str>,
        origin: Option<&str>,
    ) -> Result<Client, tungstenite::Error> {
        let mut request = self.url().into_client_request().unwrap();
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Client { ws })
    }

    // ---- chats ----

    /// A group created by `creator` with `others` (sequence 1), in NATS and PostgreSQL.
    pub async fn create_chat(&self, creator: UserId, others: &[UserId]) -> Chat {
        let chat = Chat { id: ChatId::new() };
        let mut members = vec![MemberRole {
            user_id: creator,
            role: Role::Admin,
        }];
        members.extend(others.iter().map(|&u| MemberRole {
            user_id: u,
            role: Role::Member,
        }));
        let created = chat.event(
            1,
            creator,
            ChatEvent::Created(ChatCreated {
                chat_id: chat.id,
                kind: ChatKind::Group,
                title: Some("test".into()),
                members,
                visibility: Default::default(),
            }),
        );
        self.publish(&created).await;
        chat
    }

    /// Stores an event the way the system does: projected into PostgreSQL and in the stream.
    pub async fn publish(&self, event: &StoredEvent<ChatEvent>) {
        self.to_pg(event).await;
        self.to_nats(event).await;
    }

    /// Appends to the CHATS stream only (the projector has not applied it yet).
    pub async fn to_nats(&self, event: &StoredEvent<ChatEvent>) {
        let subject = format!("chats.{}", event.meta.subject);
        self.stack
            .infra
            .js
            .publish(subject, encode(&event.meta, &event.event).into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Applies the event to the read models only, as the projectors would (its live copy lost).
    pub async fn to_pg(&self, event: &StoredEvent<ChatEvent>) {
        let pg = &self.stack.infra.pg;
        let chat = uuid::Uuid::parse_str(&event.meta.subject).unwrap();
        let seq = event.meta.sequence as i64;
        match &event.event {
            ChatEvent::Created(c) => {
                sqlx::query(
                    "INSERT INTO chats (chat_id, kind, title, created_at, last_sequence, last_activity_at)
                     VALUES ($1, $2, $3, $4, 0, $4)",
                )
                .bind(chat)
                .bind(c.kind.as_str())
                .bind(&c.title)
                .bind(event.meta.time)
                .execute(pg)
                .await
                .unwrap();
                for m in &c.members {
                    sqlx::query(
                        "INSERT INTO members (chat_id, user_id, role, joined_seq) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(chat)
                    .bind(m.user_id.as_uuid())
                    .bind(m.role.as_str())
                    .bind(seq)
                    .execute(pg)
                    .await
                    .unwrap();
                }
            }
            ChatEvent::ParticipantsModified(p) => {
                for u in &p.added {
                    sqlx::query(
                        "INSERT INTO members (chat_id, user_id, role, joined_seq) VALUES ($1, $2, 'member', $3)
                         ON CONFLICT (chat_id, user_id) DO UPDATE SET joined_seq = $3, left_seq = NULL",
                    )
                    .bind(chat)
                    .bind(u.as_uuid())
                    .bind(seq)
                    .execute(pg)
                    .await
                    .unwrap();
                }
                for u in &p.removed {
                    sqlx::query(
                        "UPDATE members SET left_seq = $3 WHERE chat_id = $1 AND user_id = $2",
                    )
                    .bind(chat)
                    .bind(u.as_uuid())
                    .bind(seq)
                    .execute(pg)
                    .await
                    .unwrap();
                }
            }
            // Messages go in below; changes to messages are covered by the e2e tests.
            ChatEvent::MessageSent(_)
            | ChatEvent::MessageSentV2(_)
            | ChatEvent::MessageEdited(_)
            | ChatEvent::MessageDeleted(_)
            | ChatEvent::ReactionAdded(_)
            | ChatEvent::ReactionRemoved(_)
            | ChatEvent::TitleChanged(_)
            | ChatEvent::RoleChanged(_) => {}
        }
        match render(event) {
            ChatItem::Message(m) => {
                sqlx::query(
                    "INSERT INTO messages (chat_id, sequence, message_id, sender_id, body, reply_to, sent_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(chat)
                .bind(seq)
                .bind(m.message_id.as_uuid())
                .bind(m.sender_id.as_uuid())
                .bind(&m.body)
                .bind(m.reply_to.map(|r| *r.as_uuid()))
                .bind(m.sent_at)
                .execute(pg)
                .await
                .unwrap();
            }
            ChatItem::Update(u) => {
                sqlx::query(
                    r#"INSERT INTO chat_updates (chat_id, sequence, "update") VALUES ($1, $2, $3)"#,
                )
                .bind(chat)
                .bind(seq)
                .bind(serde_json::to_value(&u).unwrap())
                .execute(pg)
                .await
                .unwrap();
            }
        }
        sqlx::query(
            "UPDATE chats SET last_sequence = GREATEST(last_sequence, $2) WHERE chat_id = $1",
        )
        .bind(chat)
        .bind(seq)
        .execute(pg)
        .await
        .unwrap();
    }

    /// Appends a raw CloudEvent (say, of a type this build does not know) to the CHATS stream.
    pub async fn raw_to_nats(&self, chat: &Chat, event: &Value) {
        self.stack
            .infra
            .js
            .publish(format!("chats.{}", chat.id), event.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Writes a `chat_updates` row as a projector would, whatever its kind.
    pub async fn update_to_pg(&self, chat: &Chat, sequence: u64, update: &Value) {
        let pg = &self.stack.infra.pg;
        sqlx::query(
            r#"INSERT INTO chat_updates (chat_id, sequence, "update") VALUES ($1, $2, $3)"#,
        )
        .bind(chat.id.as_uuid())
        .bind(sequence as i64)
        .bind(update)
        .execute(pg)
        .await
        .unwrap();
        sqlx::query(
            "UPDATE chats SET last_sequence = GREATEST(last_sequence, $2) WHERE chat_id = $1",
        )
        .bind(chat.id.as_uuid())
        .bind(sequence as i64)
        .execute(pg)
        .await
        .unwrap();
    }

    /// Sets a device's cumulative ack, as the receipts projector would.
    pub async fn set_cursor(&self, device: &Device, chat: &Chat, acked: u64) {
        sqlx::query(
            "INSERT INTO device_cursors (device_id, chat_id, acked_up_to) VALUES ($1, $2, $3)
             ON CONFLICT (device_id, chat_id) DO UPDATE SET acked_up_to = GREATEST(device_cursors.acked_up_to, $3)",
        )
        .bind(device.device.as_uuid())
        .bind(chat.id.as_uuid())
        .bind(acked as i64)
        .execute(&self.stack.infra.pg)
        .await
        .unwrap();
    }

    /// Core NATS publish, flushed.
    pub async fn notify(&self, subject: String, payload: Value) {
        let nats = &self.stack.infra.nats;
        nats.publish(subject, serde_json::to_vec(&payload).unwrap().into())
            .await
            .unwrap();
        nats.flush().await.unwrap();
    }
}

pub struct Chat {
    pub id: ChatId,
}

impl Chat {
    pub fn event(&self, sequence: u64, actor: UserId, event: ChatEvent) -> StoredEvent<ChatEvent> {
        StoredEvent {
            meta: EventMeta {
                id: EventId::new(),
                subject: self.id.to_string(),
                time: Utc::now(),
                sequence,
                actor,
            },
            event,
        }
    }

    pub fn message(&self, sequence: u64, sender: UserId, body: &str) -> StoredEvent<ChatEvent> {
        self.event(
            sequence,
            sender,
            ChatEvent::MessageSent(MessageSent {
                message_id: MessageId::new(),
                sender_id: sender,
                body: body.into(),
                reply_to: None,
                attachments: vec![],
                thread_root: None,
                mentions: vec![],
            }),
        )
    }

    pub fn participants(
        &self,
        sequence: u64,
        actor: UserId,
        added: &[UserId],
        removed: &[UserId],
    ) -> StoredEvent<ChatEvent> {
        self.event(
            sequence,
            actor,
            ChatEvent::ParticipantsModified(ParticipantsModified {
                added: added.to_vec(),
                removed: removed.to_vec(),
                promoted: vec![],
            }),
        )
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection ended, seen from the client.
#[derive(Debug)]
pub enum Ended {
    Close(Option<CloseFrame>),
    /// The socket ended without a close frame (reset or EOF).
    Abrupt(String),
}

impl Client {
    pub async fn send_json(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// The next text frame as JSON, `presence` frames aside (they come whenever a co-member
    /// connects, which these tests do not look at); panics on close or after [`WAIT`].
    pub async fn next_json(&mut self) -> Value {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        if v["type"] != "presence" {
                            return v;
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    other => panic!("expected a text frame, got {other:?}"),
                }
            }
        })
        .await
        .expect("a frame in time")
    }

    /// The next `newMessage`/`chatUpdate` frame, skipping typing frames.
    pub async fn next_event(&mut self) -> Value {
        loop {
            let v = self.next_json().await;
            match v["type"].as_str() {
                Some("newMessage" | "chatUpdate") => return v,
                Some("typing") => continue,
                _ => panic!("expected a chat event, got {v}"),
            }
        }
    }

    /// The sequences of the next `n` chat events of `chat`.
    pub async fn sequences(&mut self, chat: &Chat, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        while out.len() < n {
            let v = self.next_event().await;
            assert_eq!(v["chat_id"], chat.id.to_string(), "{v}");
            out.push(v["sequence"].as_u64().unwrap());
        }
        out
    }

    /// Sends a ping and returns every frame received before the pong.
    pub async fn until_pong(&mut self) -> Vec<Value> {
        self.send_json(serde_json::json!({"type": "ping"})).await;
        let mut seen = Vec::new();
        loop {
            let v = self.next_json().await;
            if v["type"] == "pong" {
                return seen;
            }
            seen.push(v);
        }
    }

    /// Reads (and discards) until the connection ends; returns how, and how many text frames
    /// came before.
    pub async fn until_closed(&mut self, deadline: Duration) -> (Ended, usize) {
        let mut frames = 0;
        let ended = tokio::time::timeout(deadline, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(frame))) => return Ended::Close(frame),
                    Some(Ok(Message::Text(_))) => frames += 1,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ended::Abrupt(e.to_string()),
                    None => return Ended::Abrupt("end of stream".into()),
                }
            }
        })
        .await
        .expect("the server closes the connection in time");
        (ended, frames)
    }

    pub async fn close_code(&mut self) -> u16 {
        match self.until_closed(WAIT).await.0 {
            Ended::Close(Some(frame)) => u16::from(frame.code),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}
