//! Fault injection under load: real `parley` processes (command-api, query-api, push-gateway,
//! projectors), a private `nats-server` and a private PostgreSQL, while users send to many chats
//! with devices connected. Each process is SIGKILLed and restarted in turn (PostgreSQL gets an
//! immediate shutdown), repeatedly. A checker then proves: every acknowledged message is in
//! history exactly once, per-chat sequences are contiguous, every device received every event of
//! its chats in order, and unread counts agree with the read watermarks.
//!
//! CI size by default; `PARLEY_FAULT_MESSAGES=20000 PARLEY_FAULT_ROUNDS=20` in a release build
//! is the long run (docs/reliability.md).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use parley_test_support::{NatsServer, PrivatePostgres, Watched, free_port};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

const USERS: usize = 8;
const CHATS: usize = 6;
const MEMBERS: usize = 4;
const SENDERS: usize = 3;

fn messages_to_send() -> usize {
    env_usize("PARLEY_FAULT_MESSAGES", 240)
}

/// How long the checker lets the read model, the devices and the receipts catch up after the
/// last crash: the projections may have a backlog of the whole run to apply (two projector
/// processes on a loaded 2-core machine took over 60 s after a 20,000-message run), so it grows
/// with the run's size. Only waited while something is still missing.
fn settle_time() -> Duration {
    Duration::from_secs(60) + Duration::from_millis(20 * messages_to_send() as u64)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Victim {
    CommandApi,
    Projectors,
    QueryApi,
    PushGateway,
    Nats,
    Postgres,
}

const VICTIMS: [Victim; 6] = [
    Victim::CommandApi,
    Victim::Projectors,
    Victim::QueryApi,
    Victim::PushGateway,
    Victim::Nats,
    Victim::Postgres,
];

struct Stack {
    /// Where each process writes its log (`<victim>-<instance>.log`).
    logs: std::path::PathBuf,
    nats: NatsServer,
    pg: PrivatePostgres,
    /// Every service process; `instances` of each kind.
    services: Vec<(Victim, Watched)>,
    cmd: Vec<String>,
    query: Vec<String>,
    ws: Vec<String>,
    /// Which instance of a kind the next kill hits.
    next_victim: usize,
}

impl Stack {
    async fn start(logs: &std::path::Path, instances: usize) -> Stack {
        let nats = NatsServer::start().await;
        let pg = PrivatePostgres::start().await;
        {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&pg.url("postgres"))
                .await
                .unwrap();
            sqlx::query("CREATE DATABASE parley")
                .execute(&mut c)
                .await
                .unwrap();
        }
        let nats_url = nats.url();
        let db_url = pg.url("parley");
        let mut env = vec![
            ("NATS_URL", nats_url.as_str()),
            ("DATABASE_URL", db_url.as_str()),
            // Start-up milestones (connected, listening) too: a slow start shows where it was.
            (
                "RUST_LOG",
                "warn,parley=info,parley_nats=info,parley_projectors=info",
            ),
        ];
        env.extend(parley_test_support::LOAD_TEST_SETTINGS);
        let bin = env!("CARGO_BIN_EXE_parley");
        let mut stack = Stack {
            logs: logs.to_owned(),
            nats,
            pg,
            services: Vec::new(),
            cmd: Vec::new(),
            query: Vec::new(),
            ws: Vec::new(),
            next_victim: 0,
        };
        for i in 0..instances {
            let mut spawn = |victim: Victim, role: &str, port: Option<u16>| {
                let mut args = vec![role.to_owned()];
                if let Some(p) = port {
                    args.extend(["--addr".to_owned(), format!("127.0.0.1:{p}")]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let log = logs.join(format!("{victim:?}-{i}.log"));
                let w = Watched::start_with(bin, &args, &env, "KILL", Some(&log));
                stack.services.push((victim, w));
            };
            let (cmd, query, ws) = (free_port(), free_port(), free_port());
            spawn(Victim::Projectors, "projectors", None);
            spawn(Victim::CommandApi, "command-api", Some(cmd));
            spawn(Victim::QueryApi, "query-api", Some(query));
            spawn(Victim::PushGateway, "push-gateway", Some(ws));
            stack.cmd.push(format!("http://127.0.0.1:{cmd}"));
            stack.query.push(format!("http://127.0.0.1:{query}"));
            stack.ws.push(format!("ws://127.0.0.1:{ws}/v1/ws"));
        }
        stack.wait_healthy().await;
        stack
    }

    /// Waits until every service answers, restarting any that exits meanwhile (a service
    /// started while NATS or PostgreSQL was down may give up, as under a real supervisor).
    async fn wait_healthy(&mut self) {
        let http = reqwest::Client::new();
        let gateways = self
            .ws
            .iter()
            .map(|w| w.replace("ws://", "http://").replace("/v1/ws", ""));
        let bases: Vec<String> = self
            .cmd
            .iter()
            .chain(&self.query)
            .cloned()
            .chain(gateways)
            .collect();
        for base in &bases {
            let url = format!("{base}/healthz");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(r) = http.get(&url).timeout(Duration::from_secs(2)).send().await
                    && r.status().is_success()
                {
                    break;
                }
                if Instant::now() >= deadline {
                    print_log_tails(&self.logs);
                    panic!("{url} not healthy within 60 s");
                }
                self.supervise();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Kills one component and starts it again.
    async fn crash(&mut self, victim: Victim) {
        match victim {
            Victim::Nats => self.nats.restart().await,
            Victim::Postgres => {
                self.pg.crash();
                self.pg.restart().await;
            }
            v => {
                // Instances of a kind take turns.
                let mut of_kind: Vec<&mut Watched> = self
                    .services
                    .iter_mut()
                    .filter(|(s, _)| *s == v)
                    .map(|(_, w)| w)
                    .collect();
                let n = of_kind.len();
                of_kind[self.next_victim % n].restart();
                self.next_victim += 1;
            }
        }
    }

    /// Restarts any service that exited on its own (what a supervisor does); returns how many.
    fn supervise(&mut self) -> usize {
        let mut n = 0;
        for (_, w) in &mut self.services {
            if w.exited() {
                w.restart();
                n += 1;
            }
        }
        n
    }
}

/// The last lines of every process's log, for a failure to show what the processes said.
fn print_log_tails(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        eprintln!("--- {} (last lines)", entry.path().display());
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
    }
}

#[derive(Default)]
struct DeviceLog {
    /// chat → highest sequence such that every sequence up to it was received.
    contiguous: HashMap<String, u64>,
    /// A sequence above `contiguous + 1` (a hole the gateway should never leave).
    gaps: usize,
    /// A sequence at or below the previous one for the chat within one connection.
    reorders: usize,
    /// Events received again after a reconnect (allowed: not yet acked durably).
    redelivered: usize,
    connections: usize,
}

/// An acknowledged send: (chat index, sender index, message id, sequence).
type Acked = (usize, usize, String, u64);

struct User {
    id: String,
    token: String,
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: Value,
) -> Result<(u16, Value), String> {
    let mut req = http.post(url).json(&body).timeout(Duration::from_secs(5));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let res = req.send().await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    Ok((status, res.json().await.unwrap_or(Value::Null)))
}

async fn get(http: &reqwest::Client, url: &str, token: &str) -> Result<(u16, Value), String> {
    let res = http
        .get(url)
        .bearer_auth(token)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    Ok((status, res.json().await.unwrap_or(Value::Null)))
}

/// POSTs until a 2xx, retrying transport errors and 5xx/409 with the same Idempotency-Key, so a
/// retried command is applied once. Fails the test on a 4xx other than 409 or after 60 s.
async fn post_until_ok(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: Value,
    retries: &AtomicUsize,
) -> Value {
    let key = uuid::Uuid::now_v7().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match post(http, url, token, Some(&key), body.clone()).await {
            Ok((s, v)) if (200..300).contains(&s) => return v,
            Ok((s, v)) if s < 500 && s != 409 && s != 429 => panic!("{url}: {s} {v}"),
            _ => {}
        }
        retries.fetch_add(1, Ordering::Relaxed);
        assert!(Instant::now() < deadline, "{url}: no success within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One device: keeps a socket open (reconnecting after every failure), records what arrives,
/// and acks cumulatively what it holds contiguously.
async fn device(ws: String, token: String, log: Arc<Mutex<DeviceLog>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let mut req = ws.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        let Ok(Ok((mut socket, _))) = tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(req),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        log.lock().await.connections += 1;
        let mut last_in_conn: HashMap<String, u64> = HashMap::new();
        loop {
            let frame = tokio::select! {
                f = socket.next() => f,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if stop.load(Ordering::SeqCst) { break; }
                    continue;
                }
            };
            let Some(Ok(Message::Text(text))) = frame else {
                if matches!(frame, Some(Ok(_))) {
                    continue;
                }
                break;
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            let kind = v["type"].as_str().unwrap_or_default();
            if kind != "newMessage" && kind != "chatUpdate" {
                continue;
            }
            let chat = v["chat_id"].as_str().unwrap().to_owned();
            let seq = v["sequence"].as_u64().unwrap();
            let ack = {
                let mut l = log.lock().await;
                let prev = last_in_conn.insert(chat.clone(), seq);
                if prev.is_some_and(|p| seq <= p) {
                    l.reorders += 1;
                }
                let held = l.contiguous.entry(chat.clone()).or_insert(0);
                if seq == *held + 1 {
                    *held = seq;
                } else if seq <= *held {
                    l.redelivered += 1;
                } else {
                    l.gaps += 1;
                }
                *l.contiguous.get(&chat).unwrap()
            };
            let frame = json!({"type": "ack", "chat_id": chat, "sequence": ack}).to_string();
            if socket.send(Message::Text(frame.into())).await.is_err() {
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_message_survives_repeated_kills_of_every_process() {
    run(1).await;
}

/// Two command-apis, two projector processes and two gateways against one NATS and one
/// PostgreSQL, clients spread across them, the same kills and the same checker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_of_every_service_lose_nothing_under_the_same_faults() {
    run(2).await;
}

async fn run(instances: usize) {
    let logs = tempfile::tempdir().unwrap();
    let mut stack = Stack::start(logs.path(), instances).await;
    let http = reqwest::Client::new();
    let retries = Arc::new(AtomicUsize::new(0));

    // Users, one device each, and group chats of four.
    let mut users = Vec::new();
    for i in 0..USERS {
        let handle = format!("user_{i}");
        post_until_ok(
            &http,
            &format!("{}/v1/users", stack.cmd[i % instances]),
            None,
            json!({"handle": handle, "display_name": handle, "password": "correct horse"}),
            &retries,
        )
        .await;
        let s = post_until_ok(
            &http,
            &format!("{}/v1/sessions", stack.cmd[(i + 1) % instances]),
            None,
            json!({"handle": handle, "password": "correct horse", "device_name": "phone"}),
            &retries,
        )
        .await;
        users.push(User {
            id: s["user_id"].as_str().unwrap().to_owned(),
            token: s["token"].as_str().unwrap().to_owned(),
        });
    }
    let mut chats: Vec<(String, Vec<usize>)> = Vec::new();
    for c in 0..CHATS {
        let members: Vec<usize> = (0..MEMBERS).map(|m| (c + m * 2) % USERS).collect();
        let others: Vec<&str> = members[1..].iter().map(|&m| users[m].id.as_str()).collect();
        let v = post_until_ok(
            &http,
            &format!("{}/v1/chats", stack.cmd[c % instances]),
            Some(&users[members[0]].token),
            json!({"kind": "group", "title": format!("chat {c}"), "members": others}),
            &retries,
        )
        .await;
        chats.push((v["chat_id"].as_str().unwrap().to_owned(), members));
    }

    // Devices stay connected throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let mut device_logs = Vec::new();
    let mut device_tasks = Vec::new();
    for u in &users {
        let log = Arc::new(Mutex::new(DeviceLog::default()));
        device_logs.push(log.clone());
        device_tasks.push(tokio::spawn(device(
            stack.ws[device_tasks.len() % instances].clone(),
            u.token.clone(),
            log,
            stop.clone(),
        )));
    }

    // Senders: each acknowledged message is recorded with its sequence; every tenth send is
    // followed by a read receipt of the sender up to it.
    let total = messages_to_send();
    let next = Arc::new(AtomicUsize::new(0));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let reads: Arc<Mutex<HashMap<(usize, usize), u64>>> = Arc::default(); // (chat, user) → up_to
    let users = Arc::new(users);
    let chats = Arc::new(chats);
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (http, next, acked, reads, users, chats, retries, cmd) = (
            http.clone(),
            next.clone(),
            acked.clone(),
            reads.clone(),
            users.clone(),
            chats.clone(),
            retries.clone(),
            stack.cmd.clone(),
        );
        senders.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= total {
                    return;
                }
                let c = n % CHATS;
                let (chat, members) = &chats[c];
                let sender = members[(n / CHATS) % MEMBERS];
                let token = &users[sender].token;
                let v = post_until_ok(
                    &http,
                    &format!("{}/v1/chats/{chat}/messages", cmd[n % cmd.len()]),
                    Some(token),
                    json!({"body": format!("message {n}")}),
                    &retries,
                )
                .await;
                let seq = v["sequence"].as_u64().unwrap();
                acked.lock().await.push((
                    c,
                    sender,
                    v["message_id"].as_str().unwrap().to_owned(),
                    seq,
                ));
                if n % 10 == 0 {
                    post_until_ok(
                        &http,
                        &format!("{}/v1/chats/{chat}/read", cmd[(n + 1) % cmd.len()]),
                        Some(token),
                        json!({"up_to": seq}),
                        &retries,
                    )
                    .await;
                    let mut r = reads.lock().await;
                    let e = r.entry((c, sender)).or_insert(0);
                    *e = (*e).max(seq);
                }
            }
        }));
    }

    // The killer: one component after another, for as long as the senders run, and at least
    // `PARLEY_FAULT_ROUNDS` (default 2) kills of every kind.
    let min_rounds = env_usize("PARLEY_FAULT_ROUNDS", 2);
    let min_seconds = env_usize("PARLEY_FAULT_SECONDS", 0);
    let started = Instant::now();
    let mut kills: BTreeMap<Victim, usize> = BTreeMap::new();
    let mut self_exits = 0;
    let mut round = 0usize;
    loop {
        let senders_done = senders.iter().all(|s| s.is_finished());
        let all_kinds = VICTIMS
            .iter()
            .all(|v| kills.get(v).copied().unwrap_or(0) >= min_rounds);
        if senders_done && all_kinds && started.elapsed().as_secs() as usize >= min_seconds {
            break;
        }
        // The fault schedule, not synchronisation: let load run between kills.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let victim = VICTIMS[round % VICTIMS.len()];
        round += 1;
        stack.crash(victim).await;
        *kills.entry(victim).or_default() += 1;
        self_exits += stack.supervise();
    }
    for s in senders {
        s.await.unwrap();
    }
    self_exits += stack.supervise();
    stack.wait_healthy().await;

    // Check. Every chat's last sequence from the read model, once it holds every ack.
    let acked = acked.lock().await.clone();
    let reads = reads.lock().await.clone();
    let mut last_seq = [0u64; CHATS];
    for (c, _, _, seq) in &acked {
        last_seq[*c] = last_seq[*c].max(*seq);
    }
    let mut lost = 0;
    let mut duplicated = 0;
    let mut history_gaps = 0;
    for (c, (chat, members)) in chats.iter().enumerate() {
        let reader = &users[members[0]].token;
        let mut ids: Vec<String> = Vec::new();
        let mut seqs: Vec<u64> = Vec::new();
        let mut after = 0u64;
        loop {
            let url = format!(
                "{}/v1/chats/{chat}/messages?after={after}&limit=200&min_sequence={}",
                stack.query[c % instances],
                last_seq[c]
            );
            let deadline = Instant::now() + settle_time();
            let page = loop {
                match get(&http, &url, reader).await {
                    Ok((200, v)) => break v,
                    other => {
                        assert!(Instant::now() < deadline, "history of {chat}: {other:?}");
                        // A process that gave up (started while PostgreSQL was still down)
                        // is restarted here too, as its supervisor would: the projectors
                        // have no HTTP port for `wait_healthy` to notice them by.
                        self_exits += stack.supervise();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            for m in page["messages"].as_array().unwrap() {
                ids.push(m["message_id"].as_str().unwrap().to_owned());
                seqs.push(m["sequence"].as_u64().unwrap());
            }
            if !page["has_more"].as_bool().unwrap() {
                break;
            }
            after = *seqs.last().unwrap();
        }
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for id in &ids {
            *counts.entry(id.as_str()).or_default() += 1;
        }
        duplicated += counts.values().filter(|&&n| n > 1).count();
        for (ac, _, id, _) in &acked {
            if *ac == c && !counts.contains_key(id.as_str()) {
                lost += 1;
            }
        }
        // Messages are sequences 2.. of a group created with its members (1 is `created`).
        let expected: Vec<u64> = (2..=last_seq[c]).collect();
        if seqs != expected {
            history_gaps += 1;
        }
    }

    // Devices: each must end holding every event of its chats, contiguously.
    let deadline = Instant::now() + settle_time();
    let mut missing_on_devices;
    loop {
        missing_on_devices = 0u64;
        for (u, log) in device_logs.iter().enumerate() {
            let l = log.lock().await;
            for (c, (chat, members)) in chats.iter().enumerate() {
                if members.contains(&u) {
                    let held = l.contiguous.get(chat).copied().unwrap_or(0);
                    missing_on_devices += last_seq[c].saturating_sub(held);
                }
            }
        }
        if missing_on_devices == 0 || Instant::now() > deadline {
            break;
        }
        self_exits += stack.supervise();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in device_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let (mut gaps, mut reorders, mut redelivered, mut connections) = (0, 0, 0, 0);
    for log in &device_logs {
        let l = log.lock().await;
        gaps += l.gaps;
        reorders += l.reorders;
        redelivered += l.redelivered;
        connections += l.connections;
    }

    // Unread counts agree with the read watermarks: others' messages above the watermark. The
    // receipts projection may still be catching up after the last crash, so this converges
    // within a deadline; what remains at the deadline is a mismatch.
    let deadline = Instant::now() + settle_time();
    let mut unread_mismatches;
    loop {
        unread_mismatches = 0;
        let mut report = Vec::new();
        for (u, user) in users.iter().enumerate() {
            let Ok((200, v)) = get(
                &http,
                &format!("{}/v1/chats", stack.query[u % instances]),
                &user.token,
            )
            .await
            else {
                unread_mismatches += 1;
                continue;
            };
            for (c, (chat, members)) in chats.iter().enumerate() {
                if !members.contains(&u) {
                    continue;
                }
                let read = reads.get(&(c, u)).copied().unwrap_or(0);
                let want = acked
                    .iter()
                    .filter(|(ac, snd, _, seq)| *ac == c && *snd != u && *seq > read)
                    .count();
                let got = v["chats"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["chat_id"] == chat.as_str())
                    .and_then(|x| x["unread_count"].as_u64());
                if got != Some(want as u64) {
                    unread_mismatches += 1;
                    report.push(format!("user {u} chat {c}: want {want}, got {got:?}"));
                }
            }
        }
        if unread_mismatches == 0 || Instant::now() > deadline {
            for line in report {
                eprintln!("unread mismatch: {line}");
            }
            break;
        }
        self_exits += stack.supervise();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    eprintln!(
        "fault run: sent {total}, acked {}, lost {lost}, duplicated {duplicated}, history gaps {history_gaps}, \
         device gaps {gaps}, reorders {reorders}, missing on devices {missing_on_devices}, \
         unread mismatches {unread_mismatches}; redelivered {redelivered} (allowed), reconnects {connections}, \
         client retries {}, kills {kills:?}, self-exits restarted {self_exits}, {:.1} s",
        acked.len(),
        retries.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    let zeros = (
        lost,
        duplicated,
        history_gaps,
        gaps,
        reorders,
        missing_on_devices,
        unread_mismatches,
    );
    if zeros != (0, 0, 0, 0, 0, 0, 0) {
        print_log_tails(logs.path());
    }
    assert_eq!(acked.len(), total);
    assert_eq!(
        zeros,
        (0, 0, 0, 0, 0, 0, 0),
        "(lost, duplicated, history gaps, device gaps, reorders, missing on devices, unread mismatches)"
    );
}
