//! Parley's public HTTP and WebSocket API as the benchmark's clients use it: sign-ups, chats,
//! sends, and sockets whose frames are timestamped on arrival.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{SinkExt, StreamExt, stream};
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Bytes a bench socket reads at most per `read`. tungstenite's 128 KiB default is zeroed
/// before every read, whatever arrives: with thousands of sockets that memset was a quarter of
/// the bench's CPU during a channel fan-out (docs/benchmarks.md, "Session 19"), taken from the
/// same two cores as the servers measured. Server frames are a few hundred bytes; a larger one
/// still grows the buffer.
const SOCKET_READ_BUFFER: usize = 8 * 1024;

/// Opens a WebSocket the way every client of the bench does, Parley's and the floors' alike:
/// a read buffer sized for the frames, and `TCP_NODELAY`, as browsers set on their sockets.
pub async fn connect_ws(
    req: impl IntoClientRequest + Unpin,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let config = WebSocketConfig::default().read_buffer_size(SOCKET_READ_BUFFER);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true).await?;
    Ok(ws)
}

#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub token: String,
}

/// sendMessage for a closed-loop client (one request at a time): one keep-alive HTTP/1.1
/// connection of its own, driven inside the caller's task. The server gets the same requests
/// as from [`Api::send`]; the client spends less on each (no pool checkout, no URL parsing, no
/// hop to a connection task), which matters where the load generator shares two cores with
/// the system it measures (docs/benchmarks.md, "Session 10"). A connection that breaks is
/// replaced on the next send, as a pooled client would.
pub struct Sender {
    port: u16,
    host: HeaderValue,
    conn: Option<Conn>,
}

/// A connection's request handle and the future that drives it.
type Conn = (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    std::pin::Pin<
        Box<hyper::client::conn::http1::Connection<TokioIo<tokio::net::TcpStream>, Full<Bytes>>>,
    >,
);

impl Sender {
    /// sendMessage; the status code (201 when accepted), after reading the answer.
    pub async fn send(&mut self, user: &User, chat: &str, body: &str) -> anyhow::Result<u16> {
        let req = http::Request::post(format!("/v1/chats/{chat}/messages"))
            .header(HOST, &self.host)
            .header(AUTHORIZATION, format!("Bearer {}", user.token))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(
                &json!({ "body": body }),
            )?)))?;
        let (conn, driver) = match &mut self.conn {
            Some(c) => c,
            None => self.conn.insert(connect(self.port).await?),
        };
        let exchange = async move {
            conn.ready().await?;
            let res = conn.send_request(req).await?;
            let status = res.status().as_u16();
            // Read the answer, so the connection is ready for the next request.
            res.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        };
        let answered = tokio::select! {
            r = exchange => r.map_err(anyhow::Error::from),
            r = driver => Err(anyhow::anyhow!("connection closed: {r:?}")),
        };
        if answered.is_err() {
            self.conn = None;
        }
        answered
    }
}

/// A keep-alive HTTP/1.1 connection to Parley on `port`.
async fn connect(port: u16) -> anyhow::Result<Conn> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    // As reqwest (and any serious client) does: no Nagle delay on small requests.
    tcp.set_nodelay(true)?;
    let (conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    Ok((conn, Box::pin(driver)))
}

/// A keep-alive HTTP client on one Parley.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub port: u16,
}

impl Api {
    pub fn new(base: &str, port: u16) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Api {
            http,
            base: base.to_owned(),
            port,
        })
    }

    async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// `n` users signed up and logged in (one device each), `concurrency` at a time; handles
    /// are `<prefix>_<i>`.
    pub async fn users(
        &self,
        prefix: &str,
        n: usize,
        concurrency: usize,
    ) -> anyhow::Result<Vec<User>> {
        let results: Vec<anyhow::Result<User>> = stream::iter(0..n)
            .map(|i| async move {
                let handle = format!("{prefix}_{i}");
                let (s, body) = self
                    .post(
                        "/v1/users",
                        None,
                        json!({"handle": handle, "display_name": handle, "password": "correct horse"}),
                    )
                    .await?;
                if s != 201 {
                    bail!("sign-up {handle}: {s} {body}");
                }
                let (s, body) = self
                    .post(
                        "/v1/sessions",
                        None,
                        json!({"handle": handle, "password": "correct horse", "device_name": "bench"}),
                    )
                    .await?;
                if s != 201 {
                    bail!("log-in {handle}: {s} {body}");
                }
                Ok(User {
                    id: body["user_id"].as_str().context("user_id")?.to_owned(),
                    token: body["token"].as_str().context("token")?.to_owned(),
                })
            })
            .buffered(concurrency)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// A chat of `kind` created by `admin` with `members` (the others); returns its id.
    pub async fn create_chat(
        &self,
        admin: &User,
        kind: &str,
        members: &[&str],
    ) -> anyhow::Result<String> {
        let (s, body) = self
            .post(
                "/v1/chats",
                Some(&admin.token),
                json!({"kind": kind, "title": "bench", "members": members}),
            )
            .await?;
        if s != 201 {
            bail!("create {kind}: {s} {body}");
        }
        Ok(body["chat_id"].as_str().context("chat_id")?.to_owned())
    }

    /// A group of `users[0]` (its admin) and `users[1]`; its id.
    pub async fn group_of_two(&self, users: &[User]) -> anyhow::Result<String> {
        self.create_chat(&users[0], "group", &[&users[1].id]).await
    }

    pub async fn add_members(&self, admin: &User, chat: &str, ids: &[&str]) -> anyhow::Result<()> {
        let (s, body) = self
            .post(
                &format!("/v1/chats/{chat}/participants"),
                Some(&admin.token),
                json!({ "add": ids }),
            )
            .await?;
        if s != 200 {
            bail!("add members: {s} {body}");
        }
        Ok(())
    }

    /// sendMessage; the status code (201 when accepted).
    pub async fn send(&self, user: &User, chat: &str, body: &str) -> anyhow::Result<u16> {
        let res = self
            .http
            .post(format!("{}/v1/chats/{chat}/messages", self.base))
            .bearer_auth(&user.token)
            .json(&json!({ "body": body }))
            .send()
            .await?;
        let status = res.status().as_u16();
        // Read the body so the connection goes back to the pool.
        let _ = res.bytes().await;
        Ok(status)
    }

    /// A [`Sender`] on a connection of its own, made now.
    pub async fn sender(&self) -> anyhow::Result<Sender> {
        Ok(Sender {
            port: self.port,
            host: HeaderValue::from_str(&format!("127.0.0.1:{}", self.port))?,
            conn: Some(connect(self.port).await?),
        })
    }

    /// GET `path`; the status code, after reading the body.
    pub async fn get(&self, user: &User, path: &str) -> anyhow::Result<u16> {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&user.token)
            .send()
            .await?;
        let status = res.status().as_u16();
        let _ = res.bytes().await?;
        Ok(status)
    }

    /// A socket on `/v1/ws`, after its `ready` frame.
    pub async fn socket(&self, token: &str) -> anyhow::Result<Ws> {
        let mut req = format!("ws://127.0.0.1:{}/v1/ws", self.port).into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let mut ws = connect_ws(req).await?;
        let ready = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("no ready frame within 30 s")?
            .context("socket closed before ready")??;
        match ready {
            Message::Text(t) if t.contains("\"ready\"") => Ok(ws),
            other => bail!("expected ready, got {other:?}"),
        }
    }
}

/// A frame that arrived on a socket: what it carried and when (µs since the bench's epoch).
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub socket: usize,
    /// The message's index, from its body (`b<index>`).
    pub index: u64,
    /// Chat and sequence, when the frame carries them (Parley frames).
    pub chat: u64,
    pub sequence: u64,
    pub at_us: u64,
}

/// Every arrival of every socket, appended as frames come.
pub type Arrivals = Arc<Mutex<Vec<Arrival>>>;

/// The bench's clock: every timestamp is µs since this instant.
#[derive(Clone, Copy)]
pub struct Clock(pub Instant);

impl Clock {
    pub fn now_us(&self) -> u64 {
        self.0.elapsed().as_micros() as u64
    }
}

/// Reads Parley frames from `ws` until `stop`, recording every `newMessage` whose body is
/// `b<index>`; acks each chat's highest sequence every 250 ms and pings every 20 s, as a real
/// client does (the gateway closes silent sockets). `chat_keys` maps chat ids to small keys.
/// What a reader takes from a frame, borrowed where it can: the load generator shares the two
/// cores with what it measures, and a `serde_json::Value` per frame (every field, allocated)
/// cost it more than the floor's readers spend on theirs.
#[derive(serde::Deserialize)]
struct NewMessageFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    chat_id: Option<Cow<'a, str>>,
    sequence: Option<u64>,
    #[serde(borrow)]
    message: Option<FrameMessage<'a>>,
}

#[derive(serde::Deserialize)]
struct FrameMessage<'a> {
    #[serde(borrow)]
    body: Option<Cow<'a, str>>,
}

/// A `newMessage` frame's chat, sequence, and the bench's index from its body (`b<index>`,
/// absent for messages the bench did not number); `None` for any other frame.
fn new_message(text: &str) -> Option<(Cow<'_, str>, u64, Option<u64>)> {
    let frame = serde_json::from_str::<NewMessageFrame>(text).ok()?;
    if frame.kind != "newMessage" {
        return None;
    }
    let index = frame
        .message
        .and_then(|m| m.body)
        .and_then(|b| b.strip_prefix('b').and_then(|i| i.parse().ok()));
    Some((frame.chat_id?, frame.sequence?, index))
}

/// `receipt` frames every Parley reader of this process has read: what a busy group's acks
/// cost its members' sockets (a diagnostic of the delivery scenarios).
pub static RECEIPT_FRAMES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether a frame is a `receipt` (the gateway writes the `type` tag first).
fn is_receipt(text: &str) -> bool {
    text.starts_with(r#"{"type":"receipt""#)
}

pub fn spawn_parley_reader(
    socket: usize,
    mut ws: Ws,
    clock: Clock,
    arrivals: Arrivals,
    chat_keys: Arc<HashMap<String, u64>>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut acks: HashMap<String, u64> = HashMap::new();
        let mut ack_tick = tokio::time::interval(Duration::from_millis(250));
        let mut ping_tick = tokio::time::interval(Duration::from_secs(20));
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = ack_tick.tick() => {
                    for (chat, seq) in acks.drain() {
                        let frame = json!({"type": "ack", "chat_id": chat, "sequence": seq});
                        if ws.send(Message::text(frame.to_string())).await.is_err() {
                            return;
                        }
                    }
                }
                _ = ping_tick.tick() => {
                    if ws.send(Message::text(r#"{"type":"ping"}"#)).await.is_err() {
                        return;
                    }
                }
                msg = ws.next() => {
                    let at_us = clock.now_us();
                    let Some(Ok(msg)) = msg else { return };
                    let Message::Text(text) = msg else { continue };
                    if is_receipt(&text) {
                        RECEIPT_FRAMES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    let Some((chat, sequence, index)) = new_message(&text) else {
                        continue;
                    };
                    if let Some(index) = index {
                        let key = chat_keys.get(chat.as_ref()).copied().unwrap_or(u64::MAX);
                        if let Ok(mut a) = arrivals.lock() {
                            a.push(Arrival { socket, index, chat: key, sequence, at_us });
                        }
                    }
                    match acks.get_mut(chat.as_ref()) {
                        Some(high) => *high = (*high).max(sequence),
                        None => {
                            acks.insert(chat.into_owned(), sequence);
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::new_message;

    #[test]
    fn a_new_message_frame_gives_its_chat_sequence_and_index() {
        let frame = r#"{"type":"newMessage","chat_id":"c1","sequence":7,"message":{"message_id":"m","sender_id":"u","body":"b42","sent_at":"2026-11-23T00:00:00Z","reactions":{}}}"#;
        let (chat, sequence, index) = new_message(frame).expect("a newMessage");
        assert_eq!((chat.as_ref(), sequence, index), ("c1", 7, Some(42)));
    }

    #[test]
    fn escapes_other_bodies_and_other_frames_are_read_right() {
        let escaped = r#"{"type":"newMessage","chat_id":"c\u0031","sequence":1,"message":{"body":"hi \"there\""}}"#;
        let (chat, _, index) = new_message(escaped).expect("a newMessage");
        assert_eq!((chat.as_ref(), index), ("c1", None));
        assert!(new_message(r#"{"type":"receipt","chat_id":"c1","sequence":3}"#).is_none());
        assert!(new_message("not json").is_none());
    }

    #[test]
    fn a_receipt_frame_as_the_gateway_writes_it_is_counted_and_nothing_else() {
        use parley_schemas::frames::ServerFrame;
        use parley_schemas::{ChatId, UserId};
        let receipt = ServerFrame::Receipt {
            chat_id: ChatId::new(),
            user_id: UserId::new(),
            delivered_up_to: Some(3),
            read_up_to: None,
        }
        .to_json();
        assert!(super::is_receipt(&receipt), "{receipt}");
        let typing = ServerFrame::Typing {
            chat_id: ChatId::new(),
            user_id: UserId::new(),
        }
        .to_json();
        assert!(!super::is_receipt(&typing));
        assert!(!super::is_receipt(
            r#"{"type":"newMessage","body":"{\"type\":\"receipt\""}"#
        ));
    }
}
