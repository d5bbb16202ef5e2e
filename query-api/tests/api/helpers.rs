//! `spawn_app`: the query router on a free port over a fresh `TestStack`, plus seeding of the
//! read models and tokens, and assertions on problem+json answers.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, TimeZone, Utc};
use parley_platform::{SessionRecord, token_key};
use parley_query_api::QueryConfig;
use parley_schemas::{ChatId, DeviceId, MessageId, UserId};
use parley_test_support::TestStack;
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::PgPool;

pub struct TestApp {
    pub stack: TestStack,
    pub base: String,
    pub http: reqwest::Client,
    /// A fake clock: every seeded timestamp is one second after the previous one, so orders
    /// by time are deterministic.
    clock: AtomicI64,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(QueryConfig::default()).await
}

pub async fn spawn_app_with(config: QueryConfig) -> TestApp {
    let stack = TestStack::start().await;
    let app = parley_query_api::router(&stack.infra, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    TestApp {
        stack,
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        clock: AtomicI64::new(0),
    }
}

impl TestApp {
    pub fn pg(&self) -> &PgPool {
        &self.stack.infra.pg
    }

    pub fn tick(&self) -> DateTime<Utc> {
        let n = self.clock.fetch_add(1, Ordering::SeqCst);
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(n)
    }

    /// A projected user.
    pub async fn user(&self, handle: &str) -> UserId {
        let id = UserId::new();
        sqlx::query(
            "INSERT INTO users (user_id, handle, display_name, created_at, version) \
             VALUES ($1, $2, $3, $4, 1)",
        )
        .bind(id.as_uuid())
        .bind(handle)
        .bind(format!("{handle} display"))
        .bind(self.tick())
        .execute(self.pg())
        .await
        .unwrap();
        id
    }

    /// A token for a new device of `user`, with its projected device row.
    pub async fn login(&self, user: UserId, device_name: &str) -> String {
        let device = DeviceId::new();
        sqlx::query(
            "INSERT INTO devices (device_id, user_id, device_name, platform, created_at) \
             VALUES ($1, $2, $3, 'ios', $4)",
        )
        .bind(device.as_uuid())
        .bind(user.as_uuid())
        .bind(device_name)
        .bind(self.tick())
        .execute(self.pg())
        .await
        .unwrap();
        self.token_for(user, device).await
    }

    /// A token for `user` and `device`, without touching the read models.
    pub async fn token_for(&self, user: UserId, device: DeviceId) -> String {
        let token = format!("tok-{}", uuid::Uuid::now_v7().simple());
        let record = SessionRecord {
            user_id: user,
            device_id: device,
        };
        self.stack
            .infra
            .buckets
            .sessions
            .put(
                token_key(&token),
                serde_json::to_vec(&record).unwrap().into(),
            )
            .await
            .unwrap();
        token
    }

    /// A chat at sequence 1 (its creation) with `members` as (user, role).
    pub async fn chat(
        &self,
        kind: &str,
        title: Option<&str>,
        members: &[(UserId, &str)],
    ) -> ChatId {
        let chat = ChatId::new();
        let at = self.tick();
        sqlx::query(
            "INSERT INTO chats (chat_id, kind, title, created_at, last_sequence, last_activity_at) \
             VALUES ($1, $2, $3, $4, 1, $4)",
        )
        .bind(chat.as_uuid())
        .bind(kind)
        .bind(title)
        .bind(at)
        .execute(self.pg())
        .await
        .unwrap();
        for (user, role) in members {
            self.join(chat, *user, role, 1).await;
        }
        chat
    }

    pub async fn join(&self, chat: ChatId, user: UserId, role: &str, joined_seq: i64) {
        sqlx::query(
            "INSERT INTO members (chat_id, user_id, role, joined_seq) VALUES ($1, $2, $3, $4)",
        )
        .bind(chat.as_uuid())
        .bind(user.as_uuid())
        .bind(role)
        .bind(joined_seq)
        .execute(self.pg())
        .await
        .unwrap();
    }

    /// Records a non-message event: the chat's sequence moves on, nothing else.
    pub async fn bump(&self, chat: ChatId) -> i64 {
        sqlx::query_scalar(
            "UPDATE chats SET last_sequence = last_sequence + 1 WHERE chat_id = $1 \
             RETURNING last_sequence",
        )
        .bind(chat.as_uuid())
        .fetch_one(self.pg())
        .await
        .unwrap()
    }

    /// Appends a message from `sender` as the chat's next event; returns its sequence.
    pub async fn message(&self, chat: ChatId, sender: UserId, body: &str) -> i64 {
        let at = self.tick();
        let mut tx = self.pg().begin().await.unwrap();
        let seq: i64 = sqlx::query_scalar(
            "UPDATE chats SET last_sequence = last_sequence + 1, last_activity_at = $2, \
             last_message_seq = last_sequence + 1 WHERE chat_id = $1 RETURNING last_sequence",
        )
        .bind(chat.as_uuid())
        .bind(at)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO messages (chat_id, sequence, message_id, sender_id, body, sent_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(chat.as_uuid())
        .bind(seq)
        .bind(MessageId::new().as_uuid())
        .bind(sender.as_uuid())
        .bind(body)
        .bind(at)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        seq
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str, token: &str) -> Value {
        let res = self.get(path, token).await;
        assert_eq!(res.status(), StatusCode::OK, "GET {path}");
        res.json().await.unwrap()
    }
}

/// Asserts an RFC 9457 answer with `status` and returns its body.
pub async fn assert_problem(res: reqwest::Response, status: StatusCode) -> Value {
    let url = res.url().clone();
    assert_eq!(res.status(), status, "status of {url}");
    assert_eq!(
        res.headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "content type of {url}"
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16(), "{body}");
    for field in ["type", "title", "detail"] {
        assert!(body[field].is_string(), "{field} missing in {body}");
    }
    body
}

/// The sequences of a history page, in the order given.
pub fn sequences(page: &Value) -> Vec<i64> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sequence"].as_i64().unwrap())
        .collect()
}
