//! One authenticated WebSocket connection: subscribe first, then replay the device's inbox from
//! PostgreSQL, then live; client frames (ack, typing, ping); and the way it ends.
//!
//! All per-chat state lives in this one task, so the seam needs no locks: live events, replayed
//! rows and membership notices are all offers to the same [`ChatCursor`], which sends exactly
//! the next sequence and nothing else. Catch-up queries run in spawned tasks and come back as
//! messages, so a slow query never stops the connection from reading or writing its client.
//! The task writes its own socket ([`Outbox`]) between steps; the rare handlers that await a
//! query inline (membership notices, the 30 s resync) hold writes back for that long, which
//! costs less than a writer task and channel on every socket (docs/benchmarks.md, "Session 8").

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures::stream::SplitStream;
use futures::{StreamExt, future};
use parley_nats::subjects;
use parley_platform::Principal;
use parley_schemas::ChatId;
use parley_schemas::frames::ClientFrame;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use crate::gateway::AppState;
use crate::hub::{ConnId, Inbound, LiveItem, LiveMsg, Subscriber};
use crate::inbox::{self, BATCH, Membership, Replayed};
use crate::presence::{self, PresenceHandle};
use crate::seam::{ChatCursor, Verdict};
use crate::stop::{StopReason, Stopper};
use crate::wire::{
    MembershipChange, MembershipNotice, Typing, error_frame, pong_frame, ready_frame,
};
use crate::writer::{Closing, Outbox};

/// At most one typing indicator per connection and chat in this interval.
const TYPING_THROTTLE: Duration = Duration::from_secs(3);
/// How often the connection re-reads its memberships: repairs a missed `notify.user` notice or
/// a live event lost with no later event to reveal the gap.
const MEMBERSHIP_RESYNC: Duration = Duration::from_secs(30);
/// Catch-up queries of one connection in flight at once.
const FETCHES_PER_CONNECTION: usize = 4;
/// Live frames held per chat while the events before them are fetched, so the seam does not
/// cost a second round trip; beyond this they are dropped and fetched again.
const REORDER_WINDOW: usize = 256;
/// Chats whose stream head is read concurrently on connect.
const HEAD_READS_IN_FLIGHT: usize = 16;
/// Live items taken in at most before the loop writes or turns to its other sources.
const ABSORB: usize = 64;
/// Waiting for the client's close reply, so the socket closes cleanly.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Serves an authenticated connection until it ends, then closes it.
pub(crate) async fn run(socket: WebSocket, gw: AppState, me: Principal, chats_stream: Stream<()>) {
    let id = gw.next_conn_id();
    let stopper = Arc::new(Stopper::new(gw.infra.shutdown.child_token()));
    let queue = gw.config.queue_frames.max(1);
    let (sink, mut stream) = socket.split();
    let (live_tx, mut live_rx) = mpsc::channel(queue);
    // futures' channel, not tokio's: tokio allocates a 32-slot block per channel up front,
    // about 2.5 KiB resident on every socket, while this queue is empty but for catch-ups.
    let (fetched_tx, mut fetched_rx) = futures::channel::mpsc::unbounded();
    // Listed before `start` reads the memberships: a chat joined from here on is announced
    // to this queue, one joined earlier is in what `start` reads.
    let _listing = gw.registry.list(
        me.user_id,
        me.device_id,
        Subscriber {
            conn: id,
            tx: live_tx.clone(),
            stopper: Arc::clone(&stopper),
        },
    );

    let mut conn = Connection {
        gw,
        me,
        id,
        stopper: Arc::clone(&stopper),
        outbox: Outbox::new(sink),
        live_tx,
        fetched_tx,
        chats: HashMap::new(),
        fetch_permits: Arc::new(Semaphore::new(FETCHES_PER_CONNECTION)),
        chats_stream,
        presence: None,
    };
    let reason = match conn.start().await {
        Ok(()) => {
            let mut feeds = Feeds {
                inbound: &mut live_rx,
                fetched: &mut fetched_rx,
            };
            conn.serve(&mut stream, &mut feeds).await
        }
        Err(reason) => reason,
    };
    // Leaves presence before the socket closes: the user's last connection here stops its
    // heartbeats at once.
    conn.presence = None;
    tracing::debug!(conn = id, user = %me.user_id, ?reason, "connection ends");
    // Cancels this connection's pending fetches too.
    stopper.stop(reason);
    conn.leave_all();
    conn.outbox
        .close(Closing {
            frame: reason.close_frame(),
            // A client cut off for not reading, or a revoked device, gets nothing more.
            flush_queued: !matches!(reason, StopReason::SlowConsumer | StopReason::Revoked),
        })
        .await;
    match reason {
        StopReason::ClientGone => {}
        // The read half failed inside a frame, and its unread bytes make the kernel reset the
        // socket when it is dropped; the reset can reach the client before the close frame.
        // Nothing more can be read to see the client's answer, so it gets the linger time.
        StopReason::Oversized => tokio::time::sleep(CLOSE_LINGER).await,
        _ => linger(&mut stream).await,
    }
}

/// Reads until the client answers our close (or a deadline), so the socket is not reset with
/// unread data, which could destroy the close frame before the client reads it.
async fn linger(stream: &mut SplitStream<WebSocket>) {
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

struct Chat {
    cursor: ChatCursor,
    /// In the hub's feed for this chat.
    subscribed: bool,
    /// A catch-up query is scheduled or running (at most one per chat).
    fetching: bool,
    /// Consecutive catch-ups that made no progress: spaces out retries while the projector lags.
    misses: u32,
    /// Live frames beyond the next sequence, kept while the events before them are fetched.
    reorder: BTreeMap<u64, (Utf8Bytes, bool)>,
    last_typing: Option<Instant>,
}

impl Chat {
    fn new(cursor: ChatCursor) -> Self {
        Self {
            cursor,
            subscribed: false,
            fetching: false,
            misses: 0,
            reorder: BTreeMap::new(),
            last_typing: None,
        }
    }
}

/// Catch-up progress, reported back to the connection's loop.
enum Fetched {
    /// A delayed retry is due: query now, from the cursor as it is now.
    Due(ChatId),
    /// A query's rows (at most [`BATCH`], in sequence order).
    Rows {
        chat: ChatId,
        result: Result<Vec<Replayed>, sqlx::Error>,
    },
}

struct Connection {
    gw: AppState,
    me: Principal,
    id: ConnId,
    stopper: Arc<Stopper>,
    /// Frames for the client, written by this task between its other steps.
    outbox: Outbox,
    /// This connection's queue for live items (hub), membership notices (registry) and
    /// presence frames; bounded by `queue_frames`.
    live_tx: mpsc::Sender<Inbound>,
    fetched_tx: futures::channel::mpsc::UnboundedSender<Fetched>,
    chats: HashMap<ChatId, Chat>,
    fetch_permits: Arc<Semaphore>,
    chats_stream: Stream<()>,
    /// Counts the user as connected here (heartbeats) and watches its contacts.
    presence: Option<PresenceHandle>,
}

/// What a handler tells the loop: carry on, or stop for this reason.
type Step = Result<(), StopReason>;

/// Everything besides the client that the connection's loop listens to.
struct Feeds<'a> {
    /// Live items, membership changes and presence frames.
    inbound: &'a mut mpsc::Receiver<Inbound>,
    fetched: &'a mut futures::channel::mpsc::UnboundedReceiver<Fetched>,
}

impl Connection {
    /// Reads the memberships (notices already reach this connection: it is listed), joins
    /// every chat's live feed, learns how far each chat goes, says `ready`, and starts the
    /// catch-ups.
    async fn start(&mut self) -> Result<(), StopReason> {
        let nats = self.gw.infra.nats.clone();
        let memberships = inbox::memberships(&self.gw.infra.pg, self.me.user_id, self.me.device_id)
            .await
            .map_err(|e| unavailable("read memberships", &e))?;
        for m in &memberships {
            self.chats.insert(m.chat, Chat::new(cursor_for(m)));
        }
        let contacts = self.contacts().await;
        self.presence = Some(self.gw.presence.join(
            self.me.user_id,
            self.id,
            contacts,
            self.live_tx.clone(),
        ));
        let live: Vec<ChatId> = self
            .chats
            .iter()
            .filter(|(_, c)| c.cursor.is_member())
            .map(|(id, _)| *id)
            .collect();
        let joined = future::join_all(
            live.iter()
                .map(|&chat| self.gw.hub.join(chat, self.subscriber())),
        )
        .await;
        for (chat, result) in live.iter().zip(joined) {
            if let Some(c) = self.chats.get_mut(chat) {
                c.subscribed = true;
            }
            result.map_err(|e| unavailable("join live feed", &e))?;
        }
        // Every live subscription is in effect from here: anything stored later arrives live,
        // anything stored earlier is at or below the stream head read next.
        nats.flush()
            .await
            .map_err(|e| unavailable("flush NATS", &e))?;
        let heads: Vec<(ChatId, Result<u64, StopReason>)> = futures::stream::iter(live)
            .map(|chat| {
                let stream = &self.chats_stream;
                async move { (chat, stream_head(stream, chat).await) }
            })
            .buffer_unordered(HEAD_READS_IN_FLIGHT)
            .collect()
            .await;
        for (chat, head) in heads {
            let head = head?;
            if let Some(c) = self.chats.get_mut(&chat) {
                c.cursor.learn(head);
            }
        }
        self.emit(ready_frame(self.me.user_id, self.me.device_id))?;
        let chats: Vec<ChatId> = self.chats.keys().copied().collect();
        for chat in chats {
            self.fetch(chat, Duration::ZERO);
        }
        Ok(())
    }

    async fn serve(
        &mut self,
        client: &mut SplitStream<WebSocket>,
        feeds: &mut Feeds<'_>,
    ) -> StopReason {
        let idle_timeout = self.gw.config.idle_timeout;
        // The idle timer is re-armed when it fires, from the last client frame, rather than
        // reset on every frame: a reset moves the timer in the runtime's wheel, under its lock,
        // once per ack of every socket.
        let mut heard = Instant::now();
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let mut resync =
            tokio::time::interval_at(Instant::now() + MEMBERSHIP_RESYNC, MEMBERSHIP_RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = self.stopper.token().clone();
        // One wait for the stop signal across all turns of the loop: a fresh one per turn
        // would join and leave the token's waiter list (two locks) every time.
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            // Checked before every step; the sources below are polled fairly, so a busy live
            // feed cannot starve the catch-up results that fill its gaps (or the client).
            if stop.is_cancelled() {
                return self.stopper.reason();
            }
            // Live items already waiting are taken in before the next write, so a burst (a
            // batch of receipts, say) leaves in one write, one syscall, not one per frame.
            // Bounded, so the client and the catch-ups still get their turn.
            for _ in 0..ABSORB {
                if !self.has_room() {
                    break;
                }
                let Ok(msg) = feeds.inbound.try_recv() else {
                    break;
                };
                if let Err(reason) = self.on_inbound(msg).await {
                    return reason;
                }
            }
            // With `queue_frames` unwritten, only writing goes on: no more client frames (TCP
            // pushes back on a client that sends without reading), catch-ups or live items.
            let room = self.has_room();
            // The rare, large handlers (about 2.3 KiB of state each) are boxed while they run:
            // inline, every socket's task would hold room for the largest of them for its whole
            // life, idle or not (docs/benchmarks.md, "Session 5").
            let step = tokio::select! {
                _ = &mut stopped => return self.stopper.reason(),
                _ = &mut idle => {
                    let due = heard + idle_timeout;
                    if due <= Instant::now() {
                        return StopReason::Idle;
                    }
                    idle.as_mut().reset(due);
                    Ok(())
                }
                written = self.outbox.drain(), if self.outbox.busy() => match written {
                    Ok(()) => Ok(()),
                    // The socket is gone; its read half says so next, or already has.
                    Err(_) => Err(StopReason::ClientGone),
                },
                frame = client.next(), if room => {
                    heard = Instant::now();
                    self.on_client(frame).await
                }
                Some(msg) = feeds.inbound.recv(), if room => self.on_inbound(msg).await,
                Some(done) = feeds.fetched.next(), if room => Box::pin(self.on_fetched(done)).await,
                _ = resync.tick(), if room => Box::pin(self.resync()).await,
            };
            if let Err(reason) = step {
                return reason;
            }
        }
    }

    /// Fewer than `queue_frames` frames wait in the outbox. Without room the connection only
    /// writes, and its live queue fills up until the hub stops it as a slow consumer.
    fn has_room(&self) -> bool {
        self.outbox.len() < self.gw.config.queue_frames.max(1)
    }

    async fn on_inbound(&mut self, msg: Inbound) -> Step {
        match msg {
            Inbound::Live(msg) => self.on_live(msg).await,
            Inbound::Membership(notice) => Box::pin(self.on_notice(notice)).await,
            Inbound::Presence(frame) => self.emit(frame),
        }
    }

    // ---- client frames ----

    async fn on_client(&mut self, frame: Option<Result<Message, axum::Error>>) -> Step {
        let text = match frame {
            None => return Err(StopReason::ClientGone),
            Some(Err(error)) => {
                // tungstenite reports an over-limit frame only through its error text.
                if error.to_string().contains("Space limit exceeded") {
                    let max = self.gw.config.max_frame_bytes;
                    self.emit(error_frame(
                        "bad_frame",
                        format!("frames are limited to {max} bytes"),
                    ))?;
                    return Err(StopReason::Oversized);
                }
                return Err(StopReason::ClientGone);
            }
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                return self.emit(error_frame("bad_frame", "frames are JSON text, not binary"));
            }
            // The protocol layer answers pings itself; both still count as activity.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(()),
            Some(Ok(Message::Close(_))) => return Err(StopReason::ClientGone),
        };
        match serde_json::from_str::<ClientFrame>(&text) {
            Ok(ClientFrame::Ping) => self.emit(pong_frame()),
            Ok(ClientFrame::Ack { chat_id, sequence }) => self.on_ack(chat_id, sequence),
            Ok(ClientFrame::Typing { chat_id }) => self.on_typing(chat_id).await,
            Ok(ClientFrame::Auth { .. }) => {
                self.emit(error_frame("bad_frame", "already authenticated"))
            }
            Err(error) => {
                // Serde quotes the client's input; keep it short (on a char boundary).
                let detail: String = error.to_string().chars().take(200).collect();
                self.emit(error_frame("bad_frame", detail))
            }
        }
    }

    fn on_ack(&mut self, chat: ChatId, sequence: u64) -> Step {
        let highest = self.chats.get(&chat).map(|c| c.cursor.highest_sent());
        match highest {
            Some(highest) if sequence <= highest => {
                if sequence > 0 {
                    self.gw
                        .acks
                        .record(self.me.user_id, self.me.device_id, chat, sequence);
                }
                Ok(())
            }
            Some(highest) => {
                self.emit(error_frame(
                    "bad_ack",
                    format!("sequence {sequence} of chat {chat} was not delivered here (highest is {highest})"),
                ))
            }
            None => {
                self.emit(error_frame(
                    "bad_ack",
                    format!("chat {chat} is not delivered on this connection"),
                ))
            }
        }
    }

    /// Publishes the typing indicator (throttled); a chat the user is not in gets an error
    /// frame, as an ack for it does.
    async fn on_typing(&mut self, chat: ChatId) -> Step {
        let now = Instant::now();
        let member = self.chats.get(&chat).is_some_and(|c| c.cursor.is_member());
        if !member {
            return self.emit(error_frame(
                "bad_typing",
                format!("chat {chat} is not delivered on this connection"),
            ));
        }
        let Some(c) = self.chats.get_mut(&chat) else {
            return Ok(());
        };
        if c.last_typing
            .is_some_and(|t| now.duration_since(t) < TYPING_THROTTLE)
        {
            return Ok(());
        }
        c.last_typing = Some(now);
        let typing = Typing {
            chat_id: chat,
            user_id: self.me.user_id,
        };
        let payload = serde_json::to_vec(&typing).unwrap_or_default();
        if let Err(error) = self
            .gw
            .infra
            .nats
            .publish(subjects::typing(chat), payload.into())
            .await
        {
            tracing::debug!(%error, "typing indicator not published");
        }
        Ok(())
    }

    // ---- live events ----

    async fn on_live(&mut self, msg: LiveMsg) -> Step {
        let me = self.me.user_id;
        let Some(c) = self.chats.get_mut(&msg.chat) else {
            return Ok(());
        };
        match &*msg.item {
            // The user's own typing and receipts are not echoed to its other devices: they are
            // about the user, for the others (docs/delivery.md, "Receipts").
            LiveItem::Ephemeral { user_id, frame } => {
                if *user_id != me && c.cursor.is_member() {
                    let frame = frame.clone();
                    return self.emit(frame);
                }
                Ok(())
            }
            LiveItem::Event(event) => match &event.frame {
                Some(frame) => {
                    let candidate = Candidate {
                        sequence: event.sequence,
                        frame: frame.clone(),
                        removes_me: event.removed.contains(&me),
                    };
                    self.deliver(msg.chat, std::iter::once(candidate), true)
                        .await
                        .map(|_| ())
                }
                None => {
                    if c.cursor.unrenderable(event.sequence) {
                        self.fetch(msg.chat, Duration::ZERO);
                    }
                    Ok(())
                }
            },
        }
    }

    // ---- catch-up ----

    /// Schedules a catch-up query for `chat` after `delay`, unless one is pending or the chat
    /// has nothing left to catch up.
    fn fetch(&mut self, chat: ChatId, delay: Duration) {
        let Some(c) = self.chats.get_mut(&chat) else {
            return;
        };
        if c.fetching || !c.cursor.behind() {
            return;
        }
        c.fetching = true;
        if delay.is_zero() {
            self.query(chat);
            return;
        }
        // The query's range is taken when it runs, not now: live events may have moved the
        // cursor meanwhile.
        let done = self.fetched_tx.clone();
        let stop = self.stopper.token().clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(delay) => {
                    let _ = done.unbounded_send(Fetched::Due(chat));
                }
            }
        });
    }

    fn query(&mut self, chat: ChatId) {
        let Some(c) = self.chats.get(&chat) else {
            return;
        };
        let from = c.cursor.next_expected();
        let to = c.cursor.upper_bound();
        let pg = self.gw.infra.pg.clone();
        let local = Arc::clone(&self.fetch_permits);
        let global = Arc::clone(&self.gw.pg_permits);
        let done = self.fetched_tx.clone();
        let stop = self.stopper.token().clone();
        tokio::spawn(async move {
            let query = async {
                let _local = local.acquire_owned().await;
                let _global = global.acquire_owned().await;
                inbox::events(&pg, chat, from, to, BATCH).await
            };
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = query => r,
            };
            let _ = done.unbounded_send(Fetched::Rows { chat, result });
        });
    }

    async fn on_fetched(&mut self, done: Fetched) -> Step {
        let (chat, result) = match done {
            Fetched::Due(chat) => {
                match self.chats.get_mut(&chat) {
                    Some(c) if c.cursor.behind() => self.query(chat),
                    Some(c) => c.fetching = false,
                    None => {}
                }
                return Ok(());
            }
            Fetched::Rows { chat, result } => (chat, result),
        };
        let me = self.me.user_id;
        let retry = self.gw.config.catch_up_retry;
        let Some(c) = self.chats.get_mut(&chat) else {
            return Ok(());
        };
        c.fetching = false;
        let rows = match result {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(chat = %chat, %error, "catch-up query failed; retrying");
                c.misses = c.misses.saturating_add(1);
                let delay = backoff(retry, c.misses);
                self.fetch(chat, delay);
                return Ok(());
            }
        };
        let full = rows.len() == BATCH;
        let before = c.cursor.next_expected();
        let candidates = rows.into_iter().map(|r| Candidate {
            removes_me: r.removed.contains(&me),
            sequence: r.sequence,
            frame: r.frame,
        });
        let gap = self.deliver(chat, candidates, false).await?;
        let Some(c) = self.chats.get_mut(&chat) else {
            return Ok(());
        };
        if c.cursor.next_expected() > before {
            c.misses = 0;
        } else {
            c.misses = c.misses.saturating_add(1);
        }
        // A full batch means more rows are waiting; otherwise what is missing is not
        // projected yet, so give the projector a moment.
        let delay = if full && !gap {
            Duration::ZERO
        } else {
            backoff(retry, c.misses)
        };
        self.ensure_live(chat).await?;
        self.fetch(chat, delay);
        Ok(())
    }

    /// Offers `candidates` (in sequence order) to the chat's cursor and sends what is due,
    /// then whatever the reorder window holds next. Returns whether a gap stopped it.
    async fn deliver(
        &mut self,
        chat: ChatId,
        candidates: impl Iterator<Item = Candidate>,
        live: bool,
    ) -> Result<bool, StopReason> {
        let Some(c) = self.chats.get_mut(&chat) else {
            return Ok(false);
        };
        let mut out = Vec::new();
        let mut gap = false;
        let mut ended = false;
        for cand in candidates {
            match c.cursor.offer(cand.sequence, cand.removes_me) {
                Verdict::Drop => {}
                Verdict::Send { ends } => {
                    out.push(cand.frame);
                    if ends {
                        ended = true;
                        break;
                    }
                }
                Verdict::Gap => {
                    if live && c.reorder.len() < REORDER_WINDOW {
                        c.reorder
                            .insert(cand.sequence, (cand.frame, cand.removes_me));
                    }
                    gap = true;
                    break;
                }
            }
        }
        // Held live frames that are now due go out right behind.
        while !ended && let Some(entry) = c.reorder.first_entry() {
            let seq = *entry.key();
            if seq > c.cursor.next_expected() {
                break;
            }
            let (frame, removes_me) = entry.remove();
            if let Verdict::Send { ends } = c.cursor.offer(seq, removes_me) {
                out.push(frame);
                ended = ends;
            }
        }
        if ended {
            c.reorder.clear();
        }
        for frame in out {
            self.emit(frame)?;
        }
        if ended {
            self.leave(chat);
        } else if gap && live {
            // A fetched batch schedules its own follow-up, with backoff.
            self.fetch(chat, Duration::ZERO);
        }
        Ok(gap)
    }

    // ---- membership ----

    async fn on_notice(&mut self, notice: MembershipNotice) -> Step {
        let chat = notice.chat_id;
        self.refresh_contacts().await;
        let state = self
            .chats
            .get(&chat)
            .map(|c| (c.cursor.ended(), c.cursor.highest_sent()));
        match (notice.change, state) {
            (MembershipChange::Added, Some((false, _))) => {
                // Still delivering this chat (perhaps a removal not yet sent): resume at the
                // re-add once the removal is out.
                if let Some(c) = self.chats.get_mut(&chat) {
                    c.cursor.added_at(notice.sequence);
                }
                self.ensure_live(chat).await?;
                self.fetch(chat, Duration::ZERO);
            }
            (MembershipChange::Added, Some((true, ended_at))) if notice.sequence <= ended_at => {}
            (MembershipChange::Added, _) => {
                let acked = inbox::acked_up_to(&self.gw.infra.pg, self.me.device_id, chat)
                    .await
                    .unwrap_or_else(|error| {
                        // Starting at the join is always allowed; at worst some events repeat.
                        tracing::warn!(%chat, %error, "cannot read device cursor");
                        0
                    });
                let join = notice.sequence;
                let mut cursor = ChatCursor::new(acked.max(join.saturating_sub(1)), join, None);
                cursor.learn(join);
                self.retrack(chat, cursor).await?;
            }
            (MembershipChange::Removed, Some((false, _))) => {
                // The removal event itself ends the chat, in order; this only makes sure it
                // is fetched even if its live copy was lost.
                if let Some(c) = self.chats.get_mut(&chat) {
                    c.cursor.learn(notice.sequence);
                }
                self.fetch(chat, Duration::ZERO);
            }
            (MembershipChange::Removed, _) => {}
        }
        Ok(())
    }

    /// Re-reads memberships: picks up chats whose notice was missed, and learns each chat's
    /// projected version, which reveals a live event lost with nothing after it.
    async fn resync(&mut self) -> Step {
        let memberships =
            match inbox::memberships(&self.gw.infra.pg, self.me.user_id, self.me.device_id).await {
                Ok(m) => m,
                Err(error) => {
                    tracing::warn!(%error, "membership resync failed");
                    return Ok(());
                }
            };
        self.refresh_contacts().await;
        for m in memberships {
            let state = self
                .chats
                .get(&m.chat)
                .map(|c| (c.cursor.ended(), c.cursor.highest_sent()));
            match state {
                Some((false, _)) => {
                    if let Some(c) = self.chats.get_mut(&m.chat) {
                        c.cursor.learn(m.last_sequence);
                    }
                    self.fetch(m.chat, Duration::ZERO);
                }
                Some((true, ended_at)) if m.left_seq.is_some() || m.joined_seq <= ended_at => {}
                _ => self.retrack(m.chat, cursor_for(&m)).await?,
            }
        }
        Ok(())
    }

    /// Starts (or restarts, after a removal) delivering `chat` from `cursor`.
    async fn retrack(&mut self, chat: ChatId, cursor: ChatCursor) -> Step {
        match self.chats.get_mut(&chat) {
            Some(c) => {
                // Keeps `fetching`: a query still in flight must not get a twin.
                c.cursor = cursor;
                c.reorder.clear();
                c.misses = 0;
            }
            None => {
                self.chats.insert(chat, Chat::new(cursor));
            }
        }
        self.ensure_live(chat).await?;
        self.fetch(chat, Duration::ZERO);
        Ok(())
    }

    /// Joins the chat's live feed if the user is a member and it is not joined yet, then
    /// learns the stream head (events stored before the subscription took effect).
    async fn ensure_live(&mut self, chat: ChatId) -> Step {
        let needed = self
            .chats
            .get(&chat)
            .is_some_and(|c| !c.subscribed && c.cursor.is_member());
        if !needed {
            return Ok(());
        }
        let joined = self.gw.hub.join(chat, self.subscriber()).await;
        if let Some(c) = self.chats.get_mut(&chat) {
            c.subscribed = true;
        }
        joined.map_err(|e| unavailable("join live feed", &e))?;
        self.gw
            .infra
            .nats
            .flush()
            .await
            .map_err(|e| unavailable("flush NATS", &e))?;
        let head = stream_head(&self.chats_stream, chat).await?;
        if let Some(c) = self.chats.get_mut(&chat) {
            c.cursor.learn(head);
        }
        Ok(())
    }

    /// The users whose presence this connection is told about. Presence is best effort: a
    /// failed read means no presence frames until the next resync, not a closed socket.
    async fn contacts(&self) -> Vec<parley_schemas::UserId> {
        presence::contacts(&self.gw.infra.pg, self.me.user_id)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "cannot read contacts");
                Vec::new()
            })
    }

    async fn refresh_contacts(&mut self) {
        let contacts = self.contacts().await;
        let tx = self.live_tx.clone();
        if let Some(p) = self.presence.as_mut() {
            p.set_contacts(contacts, tx);
        }
    }

    fn leave(&mut self, chat: ChatId) {
        if let Some(c) = self.chats.get_mut(&chat)
            && c.subscribed
        {
            c.subscribed = false;
            self.gw.hub.leave(chat, self.id);
        }
    }

    fn leave_all(&mut self) {
        let chats: Vec<ChatId> = self.chats.keys().copied().collect();
        for chat in chats {
            self.leave(chat);
        }
    }

    fn subscriber(&self) -> Subscriber {
        Subscriber {
            conn: self.id,
            tx: self.live_tx.clone(),
            stopper: Arc::clone(&self.stopper),
        }
    }

    /// Queues a frame for the client. It never waits: the loop stops taking new work while
    /// the outbox is full, so replay goes at the client's pace, and live events pile up in the
    /// bounded live queue meanwhile, whose overflow stops us.
    fn emit(&mut self, frame: Utf8Bytes) -> Step {
        if self.stopper.token().is_cancelled() {
            return Err(self.stopper.reason());
        }
        self.outbox.push(frame);
        Ok(())
    }
}

struct Candidate {
    sequence: u64,
    frame: Utf8Bytes,
    removes_me: bool,
}

fn cursor_for(m: &Membership) -> ChatCursor {
    let mut cursor = ChatCursor::new(m.cursor, m.joined_seq, m.left_seq);
    cursor.learn(m.last_sequence);
    cursor
}

/// The chat's latest stored sequence, read from the stream leader (a replica could be behind).
async fn stream_head(stream: &Stream<()>, chat: ChatId) -> Result<u64, StopReason> {
    inbox::stream_head(stream, chat)
        .await
        .map_err(|e| unavailable("read the chat's stream head", &e))
}

fn backoff(base: Duration, misses: u32) -> Duration {
    base.saturating_mul(1 << misses.saturating_sub(1).min(5))
}

fn unavailable(what: &str, error: &dyn std::fmt::Display) -> StopReason {
    tracing::warn!(%error, "cannot {what}; closing the connection");
    StopReason::Unavailable
}
