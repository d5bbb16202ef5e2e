//! Floors: the same work as a scenario with no business logic, measured on the same servers
//! in the same run — plain JetStream publish-and-ack, a plain pull consumer writing UNNEST
//! batches with a checkpoint, and a minimal publish → consumer → core NATS → WebSocket path.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use axum::extract::ws::{Message as AxMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::serve::ListenerExt;
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Arrival, Arrivals, Clock, Ws};

fn tag() -> String {
    uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
}

async fn stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &str,
) -> anyhow::Result<jetstream::stream::Stream> {
    Ok(js
        .get_or_create_stream(jetstream::stream::Config {
            name: name.to_owned(),
            subjects: vec![subjects.to_owned()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?)
}

fn headers(expected: u64, msg_id: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "Nats-Expected-Last-Subject-Sequence",
        expected.to_string().as_str(),
    );
    if let Some(id) = msg_id {
        h.insert("Nats-Msg-Id", id);
    }
    h
}

/// Publish-and-ack one at a time on one subject with the expected-sequence header, for
/// `duration`: (messages per second, per-publish latencies in µs).
pub async fn publish_one_at_a_time(
    js: &jetstream::Context,
    duration: Duration,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let t = tag();
    stream(js, &format!("FLOOR_ONE_{t}"), &format!("floor.one.{t}")).await?;
    let subject = format!("floor.one.{t}");
    let payload = bytes::Bytes::from(vec![b'x'; 300]);
    let mut last = 0u64;
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration {
        let t0 = Instant::now();
        let ack = js
            .publish_with_headers(subject.clone(), headers(last, None), payload.clone())
            .await?
            .await?;
        lat.push(t0.elapsed().as_micros() as f64);
        last = ack.sequence;
    }
    Ok((lat.len() as f64 / start.elapsed().as_secs_f64(), lat))
}

/// Publishes rounds of one message to each of `subjects` subjects, every message with the
/// expected-sequence and Msg-Id headers, a whole round in flight: messages per second.
pub async fn publish_pipelined(
    js: &jetstream::Context,
    subjects: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let t = tag();
    stream(js, &format!("FLOOR_PIPE_{t}"), &format!("floor.pipe.{t}.*")).await?;
    let names: Vec<String> = (0..subjects)
        .map(|i| format!("floor.pipe.{t}.{i}"))
        .collect();
    let payload = bytes::Bytes::from(vec![b'x'; 300]);
    let mut last = vec![0u64; subjects];
    let mut sent = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        let mut acks = Vec::with_capacity(subjects);
        for (i, name) in names.iter().enumerate() {
            let id = format!("{t}-{sent}");
            sent += 1;
            acks.push(
                js.publish_with_headers(name.clone(), headers(last[i], Some(&id)), payload.clone())
                    .await?,
            );
        }
        for (i, ack) in futures::future::join_all(acks.into_iter().map(|a| a.into_future()))
            .await
            .into_iter()
            .enumerate()
        {
            last[i] = ack?.sequence;
        }
    }
    Ok(sent as f64 / start.elapsed().as_secs_f64())
}

/// A backlog of `events` (300-byte payloads over 1,000 subjects) drained by a plain pull
/// consumer: batches of 500 → one transaction (UNNEST insert of 500 rows + checkpoint) → ack
/// the batch. Events per second.
pub async fn projector(js: &jetstream::Context, pg: &PgPool, events: usize) -> anyhow::Result<f64> {
    let t = tag();
    let stream = stream(js, &format!("FLOOR_PROJ_{t}"), &format!("floor.proj.{t}.*")).await?;
    let payload = bytes::Bytes::from(vec![b'x'; 300]);
    // The backlog goes in pipelined, outside the timing.
    for chunk in (0..events).collect::<Vec<_>>().chunks(2000) {
        let mut acks = Vec::new();
        for i in chunk {
            acks.push(
                js.publish(format!("floor.proj.{t}.{}", i % 1000), payload.clone())
                    .await?,
            );
        }
        for a in acks {
            a.await?;
        }
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS floor_events (aggregate text NOT NULL, stream_seq bigint NOT NULL, \
         payload text NOT NULL, PRIMARY KEY (aggregate, stream_seq))",
    )
    .execute(pg)
    .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS floor_checkpoints (name text PRIMARY KEY, stream_seq bigint NOT NULL)",
    )
    .execute(pg)
    .await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(format!("floor-{t}")),
            ack_policy: AckPolicy::All,
            max_ack_pending: 2000,
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    let mut done = 0usize;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(500)
        .messages()
        .await?
        .ready_chunks(500);
    while done < events {
        let chunk = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .context("projector floor stalled")?
            .context("projector floor stream ended")?;
        let msgs: Vec<jetstream::Message> = chunk.into_iter().filter_map(Result::ok).collect();
        let Some(last) = msgs.last() else { continue };
        let mut aggregates = Vec::with_capacity(msgs.len());
        let mut seqs = Vec::with_capacity(msgs.len());
        let mut payloads = Vec::with_capacity(msgs.len());
        let mut high = 0i64;
        for m in &msgs {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default() as i64;
            high = high.max(seq);
            aggregates.push(m.subject.to_string());
            seqs.push(seq);
            payloads.push(String::from_utf8_lossy(&m.payload).into_owned());
        }
        let mut tx = pg.begin().await?;
        sqlx::query(
            "INSERT INTO floor_events SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&aggregates)
        .bind(&seqs)
        .bind(&payloads)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO floor_checkpoints VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET stream_seq = EXCLUDED.stream_seq",
        )
        .bind(&t)
        .bind(high)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        last.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        done += msgs.len();
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// Sends `rate` items per second for `duration`, calling `send(i)` for i from `first` on,
/// each in its own task (open loop: a slow send does not slow the schedule). Returns once
/// every send has finished, so counts of answers are complete.
pub async fn drive_rate<F, Fut>(rate: f64, duration: Duration, first: u64, send: F)
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let total = (rate * duration.as_secs_f64()) as u64;
    let mut sent = 0u64;
    let mut tasks = Vec::with_capacity(total as usize);
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
        while sent < due {
            tasks.push(tokio::spawn(send(first + sent)));
            sent += 1;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// The minimal live path: a JetStream stream, one pull consumer that core-publishes each event
/// to every other member's subject, and a bare axum WebSocket server forwarding a user's
/// subject to its socket. Chats and members mirror the scenario's.
pub struct LiveFloor {
    pub port: u16,
    pub stream_subject: String,
    server: tokio::task::JoinHandle<()>,
    consumer: tokio::task::JoinHandle<()>,
}

impl Drop for LiveFloor {
    fn drop(&mut self) {
        self.server.abort();
        self.consumer.abort();
    }
}

#[derive(Clone)]
struct LiveState {
    client: async_nats::Client,
    prefix: String,
}

async fn live_ws(
    ws: WebSocketUpgrade,
    Path(user): Path<usize>,
    State(state): State<LiveState>,
) -> Response {
    ws.on_upgrade(move |socket| live_socket(socket, user, state))
}

async fn live_socket(mut socket: WebSocket, user: usize, state: LiveState) {
    let Ok(mut sub) = state
        .client
        .subscribe(format!("{}.user.{user}", state.prefix))
        .await
    else {
        return;
    };
    if state.client.flush().await.is_err() {
        return;
    }
    if socket.send(AxMessage::text("ready")).await.is_err() {
        return;
    }
    while let Some(msg) = sub.next().await {
        let text = String::from_utf8_lossy(&msg.payload).into_owned();
        if socket.send(AxMessage::text(text)).await.is_err() {
            return;
        }
    }
}

impl LiveFloor {
    /// `members[c]` are the user indices of chat `c`.
    pub async fn start(
        client: &async_nats::Client,
        js: &jetstream::Context,
        members: Arc<Vec<Vec<usize>>>,
    ) -> anyhow::Result<LiveFloor> {
        let t = tag();
        let prefix = format!("floorlive.{t}");
        let stream = stream(js, &format!("FLOOR_LIVE_{t}"), &format!("{prefix}.chat.*")).await?;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("live-{t}")),
                ack_policy: AckPolicy::All,
                max_ack_pending: 2000,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(500)
            .messages()
            .await?
            .ready_chunks(500);
        let fan_client = client.clone();
        let fan_prefix = prefix.clone();
        let consumer = tokio::spawn(async move {
            while let Some(chunk) = messages.next().await {
                let mut last = None;
                for m in chunk.into_iter().filter_map(Result::ok) {
                    // payload: "<index>:<chat>:<sender>"
                    let text = String::from_utf8_lossy(&m.payload).into_owned();
                    let mut parts = text.split(':');
                    let (Some(index), Some(chat), Some(sender)) = (
                        parts.next(),
                        parts.next().and_then(|c| c.parse::<usize>().ok()),
                        parts.next().and_then(|s| s.parse::<usize>().ok()),
                    ) else {
                        continue;
                    };
                    let payload = bytes::Bytes::from(index.to_owned());
                    for &u in members.get(chat).into_iter().flatten() {
                        if u != sender {
                            let _ = fan_client
                                .publish(format!("{fan_prefix}.user.{u}"), payload.clone())
                                .await;
                        }
                    }
                    last = Some(m);
                }
                if let Some(m) = last {
                    let _ = m.ack().await;
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let app = axum::Router::new()
            .route("/ws/{user}", axum::routing::get(live_ws))
            .with_state(LiveState {
                client: client.clone(),
                prefix: prefix.clone(),
            });
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener.tap_io(parley_platform::tcp::no_delay), app).await;
        });
        Ok(LiveFloor {
            port,
            stream_subject: format!("{prefix}.chat"),
            server,
            consumer,
        })
    }

    /// The socket of user `u`, after its `ready`.
    pub async fn socket(&self, u: usize) -> anyhow::Result<Ws> {
        let mut ws =
            crate::client::connect_ws(format!("ws://127.0.0.1:{}/ws/{u}", self.port)).await?;
        ws.next()
            .await
            .context("floor socket closed before ready")??;
        Ok(ws)
    }
}

/// Reads floor frames (`<index>`) from `ws` until `stop`, recording arrivals.
pub fn spawn_floor_reader(
    socket: usize,
    mut ws: Ws,
    clock: Clock,
    arrivals: Arrivals,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                msg = ws.next() => {
                    let at_us = clock.now_us();
                    let Some(Ok(Message::Text(text))) = msg else {
                        if msg.is_none() { return; }
                        continue;
                    };
                    if let Ok(index) = text.parse::<u64>()
                        && let Ok(mut a) = arrivals.lock()
                    {
                        a.push(Arrival { socket, index, chat: 0, sequence: 0, at_us });
                    }
                }
            }
        }
    })
}

/// Send times (µs on the bench clock, 0 = not sent) by message index.
pub struct SendTimes(Vec<AtomicU64>);

impl SendTimes {
    pub fn new(n: usize) -> Arc<SendTimes> {
        Arc::new(SendTimes((0..n).map(|_| AtomicU64::new(0)).collect()))
    }

    pub fn mark(&self, index: u64, at_us: u64) {
        if let Some(slot) = self.0.get(index as usize) {
            slot.store(at_us.max(1), Ordering::Relaxed);
        }
    }

    pub fn get(&self, index: u64) -> Option<u64> {
        self.0
            .get(index as usize)
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|v| *v > 0)
    }
}

/// Latencies (µs) of the arrivals whose index is in `range`.
pub fn latencies(arrivals: &[Arrival], sent: &SendTimes, range: std::ops::Range<u64>) -> Vec<f64> {
    arrivals
        .iter()
        .filter(|a| range.contains(&a.index))
        .filter_map(|a| sent.get(a.index).map(|s| a.at_us.saturating_sub(s) as f64))
        .collect()
}

/// Counts arrivals per (socket, index), for the lost / doubled checks.
pub fn arrival_counts(
    arrivals: &[Arrival],
    range: std::ops::Range<u64>,
) -> HashMap<(usize, u64), u32> {
    let mut counts = HashMap::new();
    for a in arrivals.iter().filter(|a| range.contains(&a.index)) {
        *counts.entry((a.socket, a.index)).or_insert(0) += 1;
    }
    counts
}
