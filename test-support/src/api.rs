//! A JSON HTTP client of one running Parley, for tests that drive it through its public API:
//! the calls they all make (any request, sign-up, log-in, a group, a message), each returning
//! status and body or asserting success.

use serde_json::{Value, json};

/// The password every test user signs up with.
const PASSWORD: &str = "correct horse";

/// A base URL and a keep-alive client.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

/// A signed-up user's logged-in device.
#[derive(Clone, Debug)]
pub struct User {
    pub user_id: String,
    pub token: String,
    pub device_id: String,
    pub handle: String,
}

impl Api {
    pub fn new(base: impl Into<String>) -> Api {
        Api {
            base: base.into(),
            http: reqwest::Client::new(),
        }
    }

    /// Any method; `body` is sent as JSON when given. The body answered, or `null`.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.expect("request");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    /// Signs `handle` up and logs it in.
    pub async fn signup(&self, handle: &str) -> User {
        let (s, body) = self
            .post(
                "/v1/users",
                None,
                json!({"handle": handle, "display_name": handle.to_uppercase(), "password": PASSWORD}),
            )
            .await;
        assert_eq!(s, 201, "signup {handle}: {body}");
        self.login(handle).await
    }

    /// A new device of `handle`.
    pub async fn login(&self, handle: &str) -> User {
        let (s, body) = self
            .post(
                "/v1/sessions",
                None,
                json!({"handle": handle, "password": PASSWORD, "device_name": "laptop", "platform": "web"}),
            )
            .await;
        assert_eq!(s, 201, "login {handle}: {body}");
        User {
            user_id: body["user_id"].as_str().expect("user_id").to_owned(),
            token: body["token"].as_str().expect("token").to_owned(),
            device_id: body["device_id"].as_str().expect("device_id").to_owned(),
            handle: handle.to_owned(),
        }
    }

    /// A group "team" of `admin` and `others`; its id.
    pub async fn group(&self, admin: &User, others: &[&User]) -> String {
        let members: Vec<&str> = others.iter().map(|u| u.user_id.as_str()).collect();
        let (s, body) = self
            .post(
                "/v1/chats",
                Some(&admin.token),
                json!({"kind": "group", "title": "team", "members": members}),
            )
            .await;
        assert_eq!(s, 201, "create group: {body}");
        body["chat_id"].as_str().expect("chat_id").to_owned()
    }

    /// Marks `chat` read by `user` up to `up_to`; panics unless answered 204.
    pub async fn read_up_to(&self, user: &User, chat: &str, up_to: u64) {
        let (s, b) = self
            .post(
                &format!("/v1/chats/{chat}/read"),
                Some(&user.token),
                json!({ "up_to": up_to }),
            )
            .await;
        assert_eq!(s, 204, "read: {b}");
    }

    /// Sends `body` to `chat`; the message id and its chat sequence.
    pub async fn send_message(&self, user: &User, chat: &str, body: &str) -> (String, u64) {
        let (s, res) = self
            .post(
                &format!("/v1/chats/{chat}/messages"),
                Some(&user.token),
                json!({ "body": body }),
            )
            .await;
        assert_eq!(s, 201, "send: {res}");
        (
            res["message_id"].as_str().expect("message_id").to_owned(),
            res["sequence"].as_u64().expect("sequence"),
        )
    }
}
