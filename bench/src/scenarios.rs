//! The scenarios of issue 7: each drives Parley over its public HTTP and WebSocket API and
//! measures its floor on the same servers in the same run, right before the figure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::serve::ListenerExt;
use futures::{StreamExt, stream};
use parley_test_support::{NatsServer, TestDb};
use tokio::sync::watch;

use crate::client::{Api, Arrival, Arrivals, Clock, RECEIPT_FRAMES, User, spawn_parley_reader};
use crate::floors::{self, LiveFloor, SendTimes, drive_rate, spawn_floor_reader};
use crate::stack::{Parley, Stack, cpu_ms, machine_busy_ms, settle};
use crate::stats::{Goal, Metric, p50_p99_ms, quantile};

/// The users of the delivery scenarios (the first of the pool); later scenarios that need
/// users without chats take theirs after these.
const DELIVERY_USERS: usize = 50;

/// How long a phase waits at most for a quiet machine before it starts anyway (and says so).
/// Usually under a second; after a setup (5,000 sign-ups and sockets, a seeded table) or a
/// projector's backlog, seconds: a full run once found the machine still 89 % busy 10 s
/// before channel-broadcast's first floor.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

/// Sizes of one mode.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub quick: bool,
    /// How long each timed phase runs.
    pub phase: Duration,
    pub history_rows: i64,
    pub idle_connections: usize,
    pub channel_members: usize,
    pub channel_messages: usize,
    /// Events in the projector catch-up backlog (and in its floor's backlog).
    pub backlog: usize,
    /// Events of the chat whose aggregate the cold-load scenario loads.
    pub cold_events: usize,
}

impl Sizes {
    pub fn quick() -> Sizes {
        Sizes {
            quick: true,
            phase: Duration::from_secs(3),
            history_rows: 100_000,
            idle_connections: 1_000,
            channel_members: 200,
            channel_messages: 10,
            backlog: 10_000,
            cold_events: 100_000,
        }
    }

    pub fn full() -> Sizes {
        Sizes {
            quick: false,
            phase: Duration::from_secs(15),
            history_rows: 1_000_000,
            idle_connections: 15_000,
            channel_members: 5_000,
            channel_messages: 20,
            backlog: 200_000,
            cold_events: 1_000_000,
        }
    }
}

pub const ALL: &[&str] = &[
    "delivery-1k",
    "delivery-3k",
    "send-throughput",
    "hot-chat",
    "history",
    "idle-connections",
    "channel-broadcast",
    "projector-catchup",
    // Last: it leaves the projectors a backlog of its fill.
    "cold-load",
];

/// Everything a scenario needs: the servers, a client, the clock, and a pool of users reused
/// across scenarios (sign-ups hash passwords, which is slow by design).
pub struct Ctx {
    pub stack: Stack,
    pub api: Api,
    pub clock: Clock,
    pub sizes: Sizes,
    pub runs: usize,
    users: Vec<User>,
    tag: String,
}

impl Ctx {
    pub fn new(stack: Stack, sizes: Sizes, runs: usize) -> anyhow::Result<Ctx> {
        let api = Api::new(&stack.parley.base, stack.parley.port)?;
        Ok(Ctx {
            stack,
            api,
            clock: Clock(Instant::now()),
            sizes,
            runs,
            users: Vec::new(),
            tag: uuid::Uuid::now_v7().simple().to_string()[24..].to_owned(),
        })
    }

    /// The first `n` users of the pool, signing up the missing ones.
    pub async fn users(&mut self, n: usize) -> anyhow::Result<Vec<User>> {
        if self.users.len() < n {
            let start = self.users.len();
            let more = self
                .api
                .users(&format!("u{}_{start}", self.tag), n - start, 16)
                .await?;
            self.users.extend(more);
        }
        Ok(self.users[..n].to_vec())
    }

    /// Runs `parley <role>` instead of the running Parley, and points the client at it.
    pub async fn restart(&mut self, role: &str) -> anyhow::Result<()> {
        self.stack.restart_parley(role).await?;
        self.api = Api::new(&self.stack.parley.base, self.stack.parley.port)?;
        Ok(())
    }

    /// Waits for a quiet machine before a timed phase ([`settle`]), so that no phase pays for
    /// the tail of the one before; says so in the log when that took over a second or the
    /// machine never went quiet.
    async fn settle(&self, phase: &str) {
        let settled = settle(SETTLE_DEADLINE).await;
        if !settled.quiet() || settled.waited > Duration::from_secs(1) {
            eprintln!("  before the {phase}: {settled}");
        }
    }

    pub async fn run(&mut self, name: &str) -> anyhow::Result<Vec<Vec<Metric>>> {
        match name {
            "delivery-1k" => self.delivery(1_000.0, false).await,
            "delivery-3k" => self.delivery(3_000.0, true).await,
            "send-throughput" => self.send_throughput().await,
            "hot-chat" => self.hot_chat().await,
            "history" => self.history().await,
            "idle-connections" => self.idle_connections().await,
            "channel-broadcast" => self.channel_broadcast().await,
            "projector-catchup" => self.projector_catchup().await,
            "cold-load" => self.cold_load().await,
            other => bail!("unknown scenario {other:?}; known: {}", ALL.join(", ")),
        }
    }

    /// sendMessage over HTTP → newMessage on every other member's socket; 50 users in 50 chats
    /// of 10 (each user in 10 chats, one socket each), `rate` messages per second, against the
    /// minimal live path with the same chats and rate.
    async fn delivery(&mut self, rate: f64, check_order: bool) -> anyhow::Result<Vec<Vec<Metric>>> {
        const CHATS: usize = 50;
        let users = self.users(DELIVERY_USERS).await?;
        let members: Vec<Vec<usize>> = (0..CHATS)
            .map(|c| (0..10).map(|j| (c * 7 + j) % DELIVERY_USERS).collect())
            .collect();
        let mut chat_ids = Vec::new();
        for m in &members {
            let others: Vec<&str> = m[1..].iter().map(|&u| users[u].id.as_str()).collect();
            chat_ids.push(self.api.create_chat(&users[m[0]], "group", &others).await?);
        }
        let chat_keys: Arc<HashMap<String, u64>> = Arc::new(
            chat_ids
                .iter()
                .enumerate()
                .map(|(i, c)| (c.clone(), i as u64))
                .collect(),
        );
        let members = Arc::new(members);
        let (stop_tx, stop_rx) = watch::channel(false);
        let arrivals: Arrivals = Arc::new(Mutex::new(Vec::new()));
        for (i, u) in users.iter().enumerate() {
            let ws = self.api.socket(&u.token).await?;
            spawn_parley_reader(
                i,
                ws,
                self.clock,
                arrivals.clone(),
                chat_keys.clone(),
                stop_rx.clone(),
            );
        }
        let per_run = (rate * self.sizes.phase.as_secs_f64()) as u64;
        let sent = SendTimes::new(per_run as usize * self.runs);
        let floor_sent = SendTimes::new(per_run as usize * self.runs);
        // When each accepted (201) send was answered: only those must arrive.
        let ok_sends = SendTimes::new(per_run as usize * self.runs);
        let sender_of = {
            let members = members.clone();
            move |i: u64| {
                let chat = i as usize % CHATS;
                (chat, members[chat][(i as usize / CHATS) % 10])
            }
        };
        let mut out = Vec::new();
        for run in 0..self.runs as u64 {
            let range = run * per_run..(run + 1) * per_run;
            // Floor: same chats, same rate, no business logic.
            self.settle("floor").await;
            let live =
                LiveFloor::start(&self.stack.client, &self.stack.js, members.clone()).await?;
            let floor_arrivals: Arrivals = Arc::new(Mutex::new(Vec::new()));
            let (fstop_tx, fstop_rx) = watch::channel(false);
            for u in 0..DELIVERY_USERS {
                let ws = live.socket(u).await?;
                spawn_floor_reader(u, ws, self.clock, floor_arrivals.clone(), fstop_rx.clone());
            }
            {
                let js = self.stack.js.clone();
                let clock = self.clock;
                let subject = live.stream_subject.clone();
                let times = floor_sent.clone();
                let sender_of = sender_of.clone();
                drive_rate(rate, self.sizes.phase, range.start, move |i| {
                    let js = js.clone();
                    let times = times.clone();
                    let (chat, sender) = sender_of(i);
                    let subject = format!("{subject}.{chat}");
                    async move {
                        times.mark(i, clock.now_us());
                        if let Ok(ack) = js
                            .publish(subject, format!("{i}:{chat}:{sender}").into())
                            .await
                        {
                            let _ = ack.await;
                        }
                    }
                })
                .await;
            }
            let expected = per_run as usize * 9;
            wait_for(&floor_arrivals, expected, Duration::from_secs(10), |a| {
                range.contains(&a.index)
            })
            .await;
            let _ = fstop_tx.send(true);
            let mut floor_lat = {
                let a = floor_arrivals
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?;
                floors::latencies(&a, &floor_sent, range.clone())
            };
            drop(live);

            // Figure: Parley.
            self.settle("figure").await;
            let receipts_before = receipt_events(&self.stack.js).await?;
            let receipt_frames_before = RECEIPT_FRAMES.load(std::sync::atomic::Ordering::Relaxed);
            let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let statuses: Arc<Mutex<HashMap<u16, u64>>> = Arc::default();
            {
                let statuses = statuses.clone();
                let ok = ok_sends.clone();
                let api = self.api.clone();
                let clock = self.clock;
                let times = sent.clone();
                let users = users.clone();
                let chat_ids = chat_ids.clone();
                let sender_of = sender_of.clone();
                let accepted = accepted.clone();
                drive_rate(rate, self.sizes.phase, range.start, move |i| {
                    let api = api.clone();
                    let times = times.clone();
                    let (chat, sender) = sender_of(i);
                    let user = users[sender].clone();
                    let chat = chat_ids[chat].clone();
                    let accepted = accepted.clone();
                    let statuses = statuses.clone();
                    let ok = ok.clone();
                    async move {
                        times.mark(i, clock.now_us());
                        // 0: no answer (timeout or connection error).
                        let status = api.send(&user, &chat, &format!("b{i}")).await.unwrap_or(0);
                        if status == 201 {
                            ok.mark(i, clock.now_us());
                            accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        } else if let Ok(mut s) = statuses.lock() {
                            *s.entry(status).or_insert(0u64) += 1;
                        }
                    }
                })
                .await;
            }
            // The frames the figure counts, and only those: the sender's own device gets its
            // message too, and counting it ended the wait while other members' frames were
            // still on their way (they then counted as lost).
            let counted = |a: &Arrival| {
                range.contains(&a.index)
                    && a.chat == sender_of(a.index).0 as u64
                    && a.socket != sender_of(a.index).1
            };
            wait_for(&arrivals, expected, Duration::from_secs(15), counted).await;
            let receipts = receipt_events(&self.stack.js).await? - receipts_before;
            let receipt_frames =
                RECEIPT_FRAMES.load(std::sync::atomic::Ordering::Relaxed) - receipt_frames_before;
            if let Ok(s) = statuses.lock()
                && !s.is_empty()
            {
                eprintln!(
                    "  run {}: sends not accepted, by status (0 = no answer): {s:?}",
                    run + 1
                );
            }
            // Only this scenario's chats: a socket's inbox replay on connect may bring older
            // scenarios' `b<index>` messages, whose indices overlap.
            let snapshot: Vec<_> = arrivals
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .iter()
                .filter(|a| counted(a))
                .copied()
                .collect();
            let mut lat = floors::latencies(&snapshot, &sent, range.clone());
            let (p50, p99) = p50_p99_ms(&mut lat);
            let (fp50, fp99) = p50_p99_ms(&mut floor_lat);
            // Where the time goes: the HTTP answer alone (send → 201).
            let mut answered: Vec<f64> = range
                .clone()
                .filter_map(|i| Some(ok_sends.get(i)?.saturating_sub(sent.get(i)?) as f64))
                .collect();
            let (a50, a99) = p50_p99_ms(&mut answered);
            let mut metrics = vec![
                Metric::absolute("p50 send→201 (HTTP answer)", "ms", a50, Goal::Diagnostic),
                Metric::absolute("p99 send→201 (HTTP answer)", "ms", a99, Goal::Diagnostic),
            ];
            if !check_order {
                metrics.push(Metric::relative(
                    "p50 send→frame",
                    "ms",
                    p50,
                    "minimal path p50",
                    fp50,
                    Goal::RatioAtMost(2.0),
                ));
            }
            metrics.push(Metric::relative(
                "p99 send→frame",
                "ms",
                p99,
                "minimal path p99",
                fp99,
                Goal::RatioAtMost(if check_order { 4.0 } else { 3.0 }),
            ));
            let accepted = accepted.load(std::sync::atomic::Ordering::Relaxed);
            // What the sockets' acks cost the streams: delivered receipts stored per message.
            metrics.push(Metric::absolute(
                "RECEIPTS events per accepted send",
                "ev",
                receipts as f64 / accepted.max(1) as f64,
                Goal::Diagnostic,
            ));
            // And what they cost the members' sockets: `receipt` frames read per message.
            metrics.push(Metric::absolute(
                "receipt frames per accepted send",
                "frames",
                receipt_frames as f64 / accepted.max(1) as f64,
                Goal::Diagnostic,
            ));
            metrics.push(Metric::absolute(
                "rejected sends",
                "req",
                (per_run - accepted) as f64,
                Goal::AtMost(0.0),
            ));
            if check_order {
                let counts = floors::arrival_counts(&snapshot, range.clone());
                let mut lost = 0u64;
                for i in range.clone().filter(|i| ok_sends.get(*i).is_some()) {
                    let (chat, sender) = sender_of(i);
                    for &u in &members[chat] {
                        if u != sender && !counts.contains_key(&(u, i)) {
                            lost += 1;
                        }
                    }
                }
                let doubled: u64 = counts
                    .values()
                    .map(|c| u64::from(c.saturating_sub(1)))
                    .sum();
                let mut last: HashMap<(usize, u64), u64> = HashMap::new();
                let mut reordered = 0u64;
                for a in &snapshot {
                    let prev = last.entry((a.socket, a.chat)).or_insert(0);
                    if a.sequence < *prev {
                        reordered += 1;
                    }
                    *prev = (*prev).max(a.sequence);
                }
                metrics.push(Metric::absolute(
                    "lost frames",
                    "frames",
                    lost as f64,
                    Goal::AtMost(0.0),
                ));
                metrics.push(Metric::absolute(
                    "doubled frames",
                    "frames",
                    doubled as f64,
                    Goal::AtMost(0.0),
                ));
                metrics.push(Metric::absolute(
                    "reordered frames",
                    "frames",
                    reordered as f64,
                    Goal::AtMost(0.0),
                ));
            }
            report_run(run, &metrics);
            out.push(metrics);
        }
        let _ = stop_tx.send(true);
        Ok(out)
    }

    /// Accepted sendMessage per second: 1,000 chats of 2, 64 keep-alive clients sending as
    /// fast as answers come, against pipelined publishing over 1,000 subjects.
    async fn send_throughput(&mut self) -> anyhow::Result<Vec<Vec<Metric>>> {
        const CHATS: usize = 1_000;
        const CLIENTS: usize = 64;
        let users = self.users(40).await?;
        let api = self.api.clone();
        let chats: Vec<(usize, String)> = stream::iter(0..CHATS)
            .map(|i| {
                let api = api.clone();
                let admin = users[i % 40].clone();
                let other = users[(i + 1) % 40].id.clone();
                async move {
                    api.create_chat(&admin, "group", &[&other])
                        .await
                        .map(|c| (i % 40, c))
                }
            })
            .buffered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        let chats = Arc::new(chats);
        let mut out = Vec::new();
        for run in 0..self.runs {
            self.settle("floor").await;
            let floor = floors::publish_pipelined(&self.stack.js, 1_000, self.sizes.phase).await?;
            self.settle("figure").await;
            let mut senders = Vec::with_capacity(CLIENTS);
            for _ in 0..CLIENTS {
                senders.push(api.sender().await?);
            }
            let start = Instant::now();
            let phase = self.sizes.phase;
            let tasks: Vec<_> = senders
                .into_iter()
                .enumerate()
                .map(|(w, mut sender)| {
                    let chats = chats.clone();
                    let users = users.clone();
                    tokio::spawn(async move {
                        let (mut ok, mut k) = (0u64, 0usize);
                        while start.elapsed() < phase {
                            let (u, chat) = &chats[(w + k * CLIENTS) % CHATS];
                            if let Ok(201) =
                                sender.send(&users[*u], chat, &format!("t{w}-{k}")).await
                            {
                                ok += 1;
                            }
                            k += 1;
                        }
                        ok
                    })
                })
                .collect();
            let mut accepted = 0u64;
            for t in tasks {
                accepted += t.await?;
            }
            let rate = accepted as f64 / start.elapsed().as_secs_f64();
            let metrics = vec![Metric::relative(
                "accepted sendMessage/s",
                "msg/s",
                rate,
                "pipelined publish, 1,000 subjects",
                floor,
                Goal::RatioAtLeast(0.3),
            )];
            report_run(run as u64, &metrics);
            out.push(metrics);
        }
        Ok(out)
    }

    /// One chat, two members each sending as soon as their previous send is answered.
    async fn hot_chat(&mut self) -> anyhow::Result<Vec<Vec<Metric>>> {
        let users = self.users(2).await?;
        let chat = self.api.group_of_two(&users).await?;
        let mut out = Vec::new();
        for run in 0..self.runs {
            self.settle("floor").await;
            let (floor, _) =
                floors::publish_one_at_a_time(&self.stack.js, self.sizes.phase).await?;
            self.settle("figure").await;
            let mut senders = Vec::with_capacity(users.len());
            for u in &users {
                senders.push((u.clone(), self.api.sender().await?));
            }
            let start = Instant::now();
            let phase = self.sizes.phase;
            let tasks: Vec<_> = senders
                .into_iter()
                .map(|(u, mut sender)| {
                    let chat = chat.clone();
                    tokio::spawn(async move {
                        let (mut ok, mut k) = (0u64, 0u64);
                        while start.elapsed() < phase {
                            if let Ok(201) = sender.send(&u, &chat, &format!("h{k}")).await {
                                ok += 1;
                            }
                            k += 1;
                        }
                        ok
                    })
                })
                .collect();
            let mut accepted = 0u64;
            for t in tasks {
                accepted += t.await?;
            }
            let metrics = vec![Metric::relative(
                "accepted sendMessage/s, 2 writers",
                "msg/s",
                accepted as f64 / start.elapsed().as_secs_f64(),
                "one-at-a-time publish",
                floor,
                Goal::RatioAtLeast(0.4),
            )];
            report_run(run as u64, &metrics);
            out.push(metrics);
        }
        Ok(out)
    }

    /// History pages of 50 over HTTP on a chat whose `messages` rows are seeded directly with
    /// SQL (the read model, not the stream: seeding 1M events through the API would take the
    /// whole budget), newest page and oldest page, against the raw keyset query.
    async fn history(&mut self) -> anyhow::Result<Vec<Vec<Metric>>> {
        let users = self.users(2).await?;
        let chat = self.api.group_of_two(&users).await?;
        let chat_id: uuid::Uuid = chat.parse()?;
        let sender: uuid::Uuid = users[0].id.parse()?;
        let pg = self.stack.pg.clone();
        // The projector must have written the chat before we extend it.
        let start = Instant::now();
        loop {
            let n: Option<i64> =
                sqlx::query_scalar("SELECT last_sequence FROM chats WHERE chat_id = $1")
                    .bind(chat_id)
                    .fetch_optional(&pg)
                    .await?;
            if n.is_some() {
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("chat {chat} never reached the read model");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rows = self.sizes.history_rows;
        let seeding = Instant::now();
        sqlx::query(
            "INSERT INTO messages (chat_id, sequence, message_id, sender_id, body, sent_at) \
             SELECT $1, g, gen_random_uuid(), $2, 'seeded message number ' || g, \
                    now() - make_interval(secs => ($3 - g)::double precision) \
             FROM generate_series(2::bigint, $3 + 1) g",
        )
        .bind(chat_id)
        .bind(sender)
        .bind(rows)
        .execute(&pg)
        .await?;
        sqlx::query(
            "UPDATE chats SET last_sequence = $2 + 1, last_message_seq = $2 + 1 WHERE chat_id = $1",
        )
        .bind(chat_id)
        .bind(rows)
        .execute(&pg)
        .await?;
        // What autovacuum would do after an insert this size, done before the timing rather
        // than during it.
        sqlx::query("VACUUM (ANALYZE) messages")
            .execute(&pg)
            .await?;
        eprintln!(
            "  seeded {rows} messages in {:.1} s",
            seeding.elapsed().as_secs_f64()
        );
        let pages = if self.sizes.quick { 500 } else { 10_000 };
        let mut out = Vec::new();
        for run in 0..self.runs {
            let raw = |before: i64| {
                let pg = pg.clone();
                async move {
                    let mut lat = Vec::with_capacity(pages);
                    for _ in 0..pages {
                        let t = Instant::now();
                        sqlx::query(
                            "SELECT message_id, sequence, sender_id, body, reply_to, attachments, sent_at, \
                             edited_at, deleted FROM messages WHERE chat_id = $1 AND sequence < $2 \
                             ORDER BY sequence DESC LIMIT 51",
                        )
                        .bind(chat_id)
                        .bind(before)
                        .fetch_all(&pg)
                        .await?;
                        lat.push(t.elapsed().as_micros() as f64);
                    }
                    anyhow::Ok(lat)
                }
            };
            let http = |path: String| {
                let api = self.api.clone();
                let user = users[1].clone();
                async move {
                    let mut lat = Vec::with_capacity(pages);
                    for _ in 0..pages {
                        let t = Instant::now();
                        let s = api.get(&user, &path).await?;
                        if s != 200 {
                            bail!("history page {path}: {s}");
                        }
                        lat.push(t.elapsed().as_micros() as f64);
                    }
                    anyhow::Ok(lat)
                }
            };
            // A p99 of sequential pages is their slowest 1 %: a few milliseconds of someone
            // else's work reach it, so each phase starts on a quiet machine too.
            self.settle("raw newest pages").await;
            let mut raw_newest = raw(i64::MAX).await?;
            self.settle("newest pages").await;
            let mut http_newest = http(format!("/v1/chats/{chat}/messages?limit=50")).await?;
            self.settle("raw oldest pages").await;
            let mut raw_oldest = raw(52).await?;
            self.settle("oldest pages").await;
            let mut http_oldest =
                http(format!("/v1/chats/{chat}/messages?before=52&limit=50")).await?;
            let p99 = |v: &mut Vec<f64>| quantile(v, 0.99) / 1000.0;
            let (hn, ho) = (p99(&mut http_newest), p99(&mut http_oldest));
            let metrics = vec![
                Metric::relative(
                    "p99 newest page",
                    "ms",
                    hn,
                    "raw keyset query p99",
                    p99(&mut raw_newest),
                    Goal::RatioAtMost(3.0),
                ),
                Metric::relative(
                    "p99 oldest page",
                    "ms",
                    ho,
                    "raw keyset query p99",
                    p99(&mut raw_oldest),
                    Goal::RatioAtMost(3.0),
                ),
                Metric::relative(
                    "p99 oldest vs newest page",
                    "ms",
                    ho,
                    "newest page p99",
                    hn,
                    Goal::RatioAtMost(1.5),
                ),
            ];
            report_run(run as u64, &metrics);
            out.push(metrics);
        }
        Ok(out)
    }

    /// Idle sockets held by the gateway (here `parley up`, one process), and its resident
    /// memory per socket. Users hold 20 sockets each (the gateway's per-user limit).
    async fn idle_connections(&mut self) -> anyhow::Result<Vec<Vec<Metric>>> {
        let n = self.sizes.idle_connections;
        // Users past the delivery scenarios' own: no chats, so their sockets are idle from the
        // start (a delivery user's socket would first replay what it never acked).
        let users = self.users(DELIVERY_USERS + n.div_ceil(20)).await?;
        let users = &users[DELIVERY_USERS..];
        // The figure is the process's RSS growth while the sockets open, so the process must
        // do nothing else meanwhile: let it work off what earlier scenarios left on the
        // streams, then measure on a fresh `parley up` (nothing left to project either).
        if let Err(e) = self.stack.settle(Duration::from_secs(300)).await {
            eprintln!("  note: {e:#}; measuring anyway, on a fresh process");
        }
        self.restart("up").await?;
        let fresh = self.stack.parley.rss_kib()?;
        // Two steps: the first fifteenth warms what a process sets up once (the gateway's
        // background tasks, allocator arenas, worker stacks); the marginal cost of the rest is
        // what each further socket costs, the figure the goal is about.
        let warm = (n / 15).max(1);
        let mut held = self.open_sockets(users, 0..warm).await;
        let opened_warm = held.len();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = self.stack.parley.rss_kib()?;
        held.extend(self.open_sockets(users, warm..n).await);
        // Let per-connection buffers and tasks settle before reading RSS.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = self.stack.parley.rss_kib()?;
        let per = (after.saturating_sub(before)) as f64 / (held.len() - opened_warm).max(1) as f64;
        let per_fresh = (after.saturating_sub(fresh)) as f64 / held.len().max(1) as f64;
        let metrics = vec![
            Metric::absolute(
                format!("idle sockets held (of {n} opened)"),
                "sockets",
                held.len() as f64,
                Goal::AtLeast(n.min(15_000) as f64),
            ),
            Metric::absolute(
                format!("RSS growth per socket from a fresh process, all {n}"),
                "KiB",
                per_fresh,
                Goal::Diagnostic,
            ),
            Metric::absolute(
                format!(
                    "server RSS per socket (marginal: sockets {}..{n})",
                    warm + 1
                ),
                "KiB",
                per,
                Goal::AtMost(12.0),
            ),
        ];
        report_run(0, &metrics);
        drop(held);
        Ok(vec![metrics])
    }

    /// Opens sockets `range` (20 per user, the per-user limit), 64 handshakes at a time; the
    /// ones that failed are reported (the first three) and left out.
    async fn open_sockets(
        &self,
        users: &[User],
        range: std::ops::Range<usize>,
    ) -> Vec<crate::client::Ws> {
        let api = self.api.clone();
        let sockets: Vec<anyhow::Result<crate::client::Ws>> = stream::iter(range)
            .map(|i| {
                let api = api.clone();
                let token = users[i / 20].token.clone();
                async move { api.socket(&token).await }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        let mut held = Vec::new();
        let mut failed = 0usize;
        for s in sockets {
            match s {
                Ok(ws) => held.push(ws),
                Err(e) => {
                    failed += 1;
                    if failed <= 3 {
                        eprintln!("  socket failed: {e:#}");
                    }
                }
            }
        }
        held
    }

    /// One message to a channel of `channel_members` members, each with a socket: time until
    /// the last socket has it, against a raw WebSocket broadcast to as many sockets.
    async fn channel_broadcast(&mut self) -> anyhow::Result<Vec<Vec<Metric>>> {
        let m = self.sizes.channel_members;
        // Users with no other chats, as for idle-connections. The first ones of the pool hold
        // the earlier scenarios' chats, and send-throughput's never had a socket open: as
        // channel members they were sent their whole inboxes (hundreds of thousands of
        // messages after a full run's three rounds) and acked them, and that replay, its
        // receipts and its activity stamps ran during the channel's figure
        // (docs/benchmarks.md, "Session 21", 4).
        let users = self.users(DELIVERY_USERS + m + 1).await?;
        let users = &users[DELIVERY_USERS..];
        let admin = &users[0];
        let chat = self.api.create_chat(admin, "channel", &[]).await?;
        for chunk in users[1..].chunks(1_000) {
            let ids: Vec<&str> = chunk.iter().map(|u| u.id.as_str()).collect();
            self.api.add_members(admin, &chat, &ids).await?;
        }
        let chat_keys = Arc::new(HashMap::from([(chat.clone(), 0u64)]));
        let arrivals: Arrivals = Arc::new(Mutex::new(Vec::new()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let api = self.api.clone();
        let sockets: Vec<anyhow::Result<crate::client::Ws>> = stream::iter(users[1..].to_vec())
            .map(|u| {
                let api = api.clone();
                async move { api.socket(&u.token).await }
            })
            .buffered(64)
            .collect()
            .await;
        for (i, ws) in sockets.into_iter().enumerate() {
            spawn_parley_reader(
                i,
                ws?,
                self.clock,
                arrivals.clone(),
                chat_keys.clone(),
                stop_rx.clone(),
            );
        }
        let k = self.sizes.channel_messages as u64;
        let mut out = Vec::new();
        let me = std::process::id();
        for run in 0..self.runs as u64 {
            self.settle("floor").await;
            let floor = raw_broadcast(m, k as usize).await?;
            self.settle("figure").await;
            let (bench_cpu, parley_cpu, machine_cpu) =
                (cpu_ms(me), self.stack.parley.cpu_ms(), machine_busy_ms());
            let mut lat = Vec::new();
            let (mut firsts, mut spreads, mut answers) = (Vec::new(), Vec::new(), Vec::new());
            for i in run * k..(run + 1) * k {
                let sent_at = self.clock.now_us();
                let s = self.api.send(admin, &chat, &format!("b{i}")).await?;
                if s != 201 {
                    bail!("channel send: {s}");
                }
                answers.push(self.clock.now_us().saturating_sub(sent_at) as f64);
                wait_for(&arrivals, m, Duration::from_secs(30), |a| a.index == i).await;
                let a = arrivals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                let (first, last, got) = a
                    .iter()
                    .filter(|a| a.index == i)
                    .fold((u64::MAX, 0, 0), |(lo, hi, n), a| {
                        (lo.min(a.at_us), hi.max(a.at_us), n + 1)
                    });
                if got < m {
                    eprintln!("  message {i}: only {got} of {m} sockets within 30 s");
                }
                lat.push(last.saturating_sub(sent_at) as f64);
                firsts.push(first.saturating_sub(sent_at) as f64);
                spreads.push(last.saturating_sub(first) as f64);
            }
            // Where the time goes, for the record (docs/benchmarks.md): the append and the
            // route to the gateway (send → first socket), the fan-out (first → last), and the
            // CPU each process spent per message (the floor's is in its own line).
            eprintln!(
                "  run {}: send→201 p50 {:.1} ms, {}; CPU per message: parley {} ms, bench {} ms, machine {} ms",
                run + 1,
                quantile(&mut answers, 0.5) / 1000.0,
                fan_out_p50s(&mut firsts, &mut spreads),
                cpu_per_message(parley_cpu, self.stack.parley.cpu_ms(), k as usize),
                cpu_per_message(bench_cpu, cpu_ms(me), k as usize),
                cpu_per_message(machine_cpu, machine_busy_ms(), k as usize),
            );
            let (_, p99) = p50_p99_ms(&mut lat);
            let metrics = vec![Metric::relative(
                format!("p99 send→last of {m} sockets"),
                "ms",
                p99,
                "raw WebSocket broadcast p99",
                floor,
                Goal::RatioAtMost(2.0),
            )];
            report_run(run, &metrics);
            out.push(metrics);
        }
        let _ = stop_tx.send(true);
        Ok(out)
    }
}

impl Ctx {
    /// Projector catch-up: `parley command-api` alone (no projectors) takes `backlog`
    /// sendMessage over HTTP; then `parley up` starts and its projectors drain the backlog.
    /// Events per second from the start of `parley up` until the read model holds every
    /// message, against the plain projector floor on a backlog of the same size.
    ///
    /// The backlog is filled once, on a NATS server and database of its own, and each run drains
    /// a copy of that image (the server's store, the database as a template): every run drains
    /// the same events into the same read model, whatever ran before, and the fill (the send
    /// rate, tens of seconds for 200k) is paid once instead of once per run. The floor runs on
    /// the same copy just before the drain.
    async fn projector_catchup(&mut self) -> anyhow::Result<Vec<Vec<Metric>>> {
        const CHATS: usize = 100;
        let backlog = self.sizes.backlog;
        let bin = self.stack.bin().to_path_buf();
        let mut nats = NatsServer::start().await;
        let image_db = TestDb::create().await;
        let (ids, target) = {
            let mut parley = Parley::spawn(&bin, &nats.url(), &image_db.url, "up").await?;
            let api = Api::new(&parley.base, parley.port)?;
            let users = api.users(&format!("c{}", self.tag), 40, 16).await?;
            let mut chats = Vec::new();
            for i in 0..CHATS {
                let other = users[(i + 1) % 40].id.as_str();
                chats.push((
                    i % 40,
                    api.create_chat(&users[i % 40], "group", &[other]).await?,
                ));
            }
            let ids: Vec<uuid::Uuid> = chats
                .iter()
                .map(|(_, c)| c.parse())
                .collect::<Result<_, _>>()?;
            let pg = image_db.pool().await;
            // The chats' creation is projected before the image is taken: the backlog is the
            // messages alone.
            let start = Instant::now();
            let mut target = loop {
                let (n, sum) = projected(&pg, &ids).await?;
                if n == CHATS as i64 {
                    break sum;
                }
                if start.elapsed() > Duration::from_secs(30) {
                    bail!("the chats never reached the read model");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            pg.close().await;
            parley.stop().await;
            let mut parley = Parley::spawn(&bin, &nats.url(), &image_db.url, "command-api").await?;
            let api = Api::new(&parley.base, parley.port)?;
            let (chats, users) = (Arc::new(chats), Arc::new(users));
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let filling = Instant::now();
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let (api, chats, users, next) =
                        (api.clone(), chats.clone(), users.clone(), next.clone());
                    tokio::spawn(async move {
                        let mut ok = 0i64;
                        loop {
                            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if k >= backlog {
                                return ok;
                            }
                            let (u, chat) = &chats[k % CHATS];
                            if let Ok(201) = api.send(&users[*u], chat, &format!("p{k}")).await {
                                ok += 1;
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                target += t.await?;
            }
            eprintln!(
                "  backlog of {backlog} sends in {:.1} s (once for all runs)",
                filling.elapsed().as_secs_f64()
            );
            parley.stop().await;
            (ids, target)
        };
        // The image: the store as the server left it, which a copy's server recovers.
        nats.kill();
        let mut out = Vec::new();
        for run in 0..self.runs {
            let copy_nats = NatsServer::start_from(nats.store()).await;
            let copy_db = TestDb::create_from(&image_db).await;
            let pg = copy_db.pool().await;
            // The floor on the same copy, right before the drain: both on servers in the same
            // state, whatever the earlier scenarios left on the shared ones.
            let js = async_nats::jetstream::new(async_nats::connect(copy_nats.url()).await?);
            let floor = floors::projector(&js, &pg, backlog).await?;
            let t0 = Instant::now();
            let mut parley = Parley::spawn(&bin, &copy_nats.url(), &copy_db.url, "up").await?;
            loop {
                let (_, sum) = projected(&pg, &ids).await?;
                if sum >= target {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(600) {
                    bail!("projectors did not catch up within 600 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let secs = t0.elapsed().as_secs_f64();
            parley.stop().await;
            pg.close().await;
            let metrics = vec![Metric::relative(
                "catch-up events/s (from process start)",
                "ev/s",
                backlog as f64 / secs,
                "plain projector, UNNEST 500 + checkpoint",
                floor,
                Goal::RatioAtLeast(0.5),
            )];
            report_run(run as u64, &metrics);
            out.push(metrics);
        }
        Ok(out)
    }

    /// Command latency on a cold cache: sendMessage to a chat of `cold_events` events on a
    /// freshly started `parley command-api` (nothing cached), which loads the chat aggregate
    /// (its snapshot, then the events after it) before it decides and appends. The events go
    /// straight onto the chat's subject, pipelined, while only command-api runs (the API would
    /// take minutes for 1M, and no projector competes for the CPU); the first command after the
    /// fill reads all of them (no snapshot covers them yet), and command-api snapshots the chat
    /// within its snapshot interval. Beside the cold figure: the same send once warm. Each
    /// restarted process first sends to another chat, so the figure is the cold *aggregate* in
    /// a running process (an evicted or never-loaded chat), not the process's first request.
    async fn cold_load(&mut self) -> anyhow::Result<Vec<Vec<Metric>>> {
        let users = self.users(2).await?;
        let chat = self.api.group_of_two(&users).await?;
        // Another, small chat: each restarted process sends there first, so the timed send
        // pays for loading the big chat, not for the process's first request of all.
        let small = self.api.group_of_two(&users).await?;
        self.restart("command-api").await?;
        let events = self.sizes.cold_events;
        let filling = Instant::now();
        let sender = parley_schemas::UserId::parse(&users[0].id)?;
        // Sequences 2..: after the chat's `created`.
        parley_test_support::fill_chat(&self.stack.js, &chat, sender, 2..=events as u64 + 1)
            .await?;
        eprintln!(
            "  {events} events appended to one chat in {:.1} s",
            filling.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let status = self.api.send(&users[0], &chat, "first").await?;
        if status != 201 {
            bail!("the first send to the filled chat answered {status}");
        }
        eprintln!(
            "  first command, no snapshot ({events} events read): {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        // The snapshot holds the chat at its version after that send: events + 2 (created,
        // the fill, "first").
        let want = events as u64 + 2;
        let kv = self.stack.js.get_key_value("snapshots").await?;
        let key = format!("chats.{chat}");
        let waiting = Instant::now();
        loop {
            let version = kv
                .get(&key)
                .await?
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["version"].as_u64());
            if version >= Some(want) {
                break;
            }
            if waiting.elapsed() > Duration::from_secs(60) {
                bail!("command-api did not snapshot the chat within 60 s (at {version:?})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut out = Vec::new();
        for run in 0..self.runs {
            self.restart("command-api").await?;
            // A connection, a session check and a first command elsewhere: the timed request
            // pays for none of them, only for the big chat's aggregate not being cached.
            for k in 0..3 {
                self.api
                    .send(&users[0], &small, &format!("warm-up {k}"))
                    .await?;
            }
            let t = Instant::now();
            let status = self
                .api
                .send(&users[0], &chat, &format!("cold {run}"))
                .await?;
            let cold = t.elapsed().as_secs_f64() * 1e3;
            if status != 201 {
                bail!("the cold send answered {status}");
            }
            let mut warm = Vec::new();
            for k in 0..20 {
                let t = Instant::now();
                self.api
                    .send(&users[0], &chat, &format!("warm {run} {k}"))
                    .await?;
                warm.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let warm = quantile(&mut warm, 0.5);
            let metrics = vec![
                Metric::absolute(
                    format!("cold sendMessage, chat of {events} events"),
                    "ms",
                    cold,
                    Goal::AtMost(5.0),
                ),
                Metric::absolute(
                    "warm sendMessage p50, same chat",
                    "ms",
                    warm,
                    Goal::AtMost(5.0),
                ),
            ];
            report_run(run as u64, &metrics);
            out.push(metrics);
        }
        // Later scenarios expect everything running; the projectors now take the fill.
        self.restart("up").await?;
        Ok(out)
    }
}

/// How many of `ids` the read model holds, and the sum of their last sequences.
async fn projected(pg: &sqlx::PgPool, ids: &[uuid::Uuid]) -> anyhow::Result<(i64, i64)> {
    let (n, sum): (i64, Option<i64>) = sqlx::query_as(
        "SELECT count(*), sum(last_sequence)::bigint FROM chats WHERE chat_id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(pg)
    .await?;
    Ok((n, sum.unwrap_or(0)))
}

/// Waits until `expected` arrivals that `counts` accepts are in, or `deadline` passes.
async fn wait_for(
    arrivals: &Arrivals,
    expected: usize,
    deadline: Duration,
    counts: impl Fn(&Arrival) -> bool,
) {
    let start = Instant::now();
    while start.elapsed() < deadline {
        let n = arrivals
            .lock()
            .map(|a| {
                a.iter()
                    .rev()
                    .take(expected * 4 + 1000)
                    .filter(|a| counts(a))
                    .count()
            })
            .unwrap_or(0);
        if n >= expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The floor of the channel scenario: a bare axum server holding `sockets` WebSockets and a
/// broadcast channel; p99 (ms) over `messages` of the time until the last socket has one.
async fn raw_broadcast(sockets: usize, messages: usize) -> anyhow::Result<f64> {
    use axum::extract::ws::{Message as AxMessage, WebSocketUpgrade};
    let (tx, _) = tokio::sync::broadcast::channel::<String>(64);
    let tx2 = tx.clone();
    let app = axum::Router::new().route(
        "/ws",
        axum::routing::get(move |ws: WebSocketUpgrade| {
            let mut rx = tx2.subscribe();
            async move {
                ws.on_upgrade(move |mut socket| async move {
                    while let Ok(text) = rx.recv().await {
                        if socket.send(AxMessage::text(text)).await.is_err() {
                            return;
                        }
                    }
                })
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener.tap_io(parley_platform::tcp::no_delay), app).await;
    });
    let url = format!("ws://127.0.0.1:{port}/ws");
    let clients: Vec<_> = stream::iter(0..sockets)
        .map(|_| {
            let url = url.clone();
            async move { crate::client::connect_ws(url).await }
        })
        .buffered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    // Every socket subscribes inside its upgrade; wait until all are in.
    let start = Instant::now();
    while tx.receiver_count() < sockets {
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "raw broadcast: only {} of {sockets} sockets subscribed",
                tx.receiver_count()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut ws: crate::client::Ws| {
            let done = done_tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(msg)) = ws.next().await {
                    if let tokio_tungstenite::tungstenite::Message::Text(t) = msg
                        && let Ok(i) = t.parse::<usize>()
                    {
                        let _ = done.send((i, Instant::now()));
                    }
                }
            })
        })
        .collect();
    let mut lat = Vec::new();
    let (mut firsts, mut spreads) = (Vec::new(), Vec::new());
    let (cpu_before, machine_before) = (cpu_ms(std::process::id()), machine_busy_ms());
    for i in 0..messages {
        let t0 = Instant::now();
        tx.send(i.to_string()).context("broadcast")?;
        let mut got = 0;
        let (mut first, mut last) = (None::<Instant>, t0);
        while got < sockets {
            let (j, at) = tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
                .await
                .context("raw broadcast stalled")?
                .context("raw broadcast readers gone")?;
            if j == i {
                got += 1;
                first = Some(first.map_or(at, |f| f.min(at)));
                last = last.max(at);
            }
        }
        lat.push((last - t0).as_micros() as f64);
        let first = first.unwrap_or(t0);
        firsts.push((first - t0).as_micros() as f64);
        spreads.push((last - first).as_micros() as f64);
    }
    let cpu = cpu_per_message(cpu_before, cpu_ms(std::process::id()), messages);
    let machine = cpu_per_message(machine_before, machine_busy_ms(), messages);
    eprintln!(
        "  floor: {}; CPU per message (server and readers, one process): {cpu} ms, machine {machine} ms",
        fan_out_p50s(&mut firsts, &mut spreads),
    );
    // Closed before returning, not behind the figure's back: 5,000 sockets closing on both
    // ends cost both cores a moment.
    for r in &readers {
        r.abort();
    }
    for r in readers {
        let _ = r.await;
    }
    server.abort();
    let _ = server.await;
    Ok(quantile(&mut lat, 0.99) / 1000.0)
}

/// The medians of a fan-out's two parts, for the log, from per-message µs: send → first socket
/// (the append and the route) and first → last socket (the fan-out itself).
fn fan_out_p50s(firsts: &mut [f64], spreads: &mut [f64]) -> String {
    format!(
        "send→first socket p50 {:.1} ms, first→last p50 {:.1} ms",
        quantile(firsts, 0.5) / 1000.0,
        quantile(spreads, 0.5) / 1000.0,
    )
}

/// CPU ms per message between two readings of [`cpu_ms`], for the log; `?` if either failed.
fn cpu_per_message(before: Option<f64>, after: Option<f64>, messages: usize) -> String {
    match (before, after) {
        (Some(b), Some(a)) => format!("{:.1}", (a - b) / messages as f64),
        _ => "?".to_owned(),
    }
}

fn report_run(run: u64, metrics: &[Metric]) {
    for m in metrics {
        let floor = m
            .floor
            .as_ref()
            .map(|f| {
                format!(
                    "  floor {:.3} ({})  ratio {:.2}×",
                    f.value,
                    f.name,
                    m.figure / f.value.max(1e-9)
                )
            })
            .unwrap_or_default();
        eprintln!(
            "  run {}: {} = {:.3} {}{floor}",
            run + 1,
            m.name,
            m.figure,
            m.unit
        );
    }
}

/// Events stored on `RECEIPTS` so far (its last stream sequence).
async fn receipt_events(js: &async_nats::jetstream::Context) -> anyhow::Result<u64> {
    let mut stream = js.get_stream("RECEIPTS").await?;
    Ok(stream.info().await?.state.last_sequence)
}
