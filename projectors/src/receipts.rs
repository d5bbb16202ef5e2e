//! The receipts projection: device cursors and per-member delivered/read watermarks from the
//! `RECEIPTS` stream. Watermarks only move up (GREATEST), which makes reapplying harmless.
//!
//! After each commit it announces, per (chat, member) whose watermark moved, one
//! `live.receipts.<chat_id>` notice (core NATS) for the gateways' `receipt` frames: one message
//! per chat and member, never per recipient. A watermark that did not move (a redelivery, an
//! older ack) announces nothing. A chat's moves are merged over an interval (the
//! [`Announcer`]): a quiet chat's moves go at once, a busy chat's once an interval has passed
//! since it last announced, each member's highest only.
//!
//! Channels announce nothing: every member's move shown to every member is N² frames (a
//! 5,000-member channel whose sockets ack one message makes 25 million), which starved the
//! whole process in the channel benchmark. Their watermarks are still kept, for the receipts
//! query. Presence draws the same line (channels make no contacts).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parley_nats::receipts::{WatermarkMoved, announce};
use parley_platform::seq;
use parley_schemas::{ChatId, ReceiptEvent, StoredEvent, UserId};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::runner::{Delivered, Disposition, checkpoint, decode_all};

/// How long a receipt whose membership is not projected yet waits before it is tried again.
const MEMBER_NOT_YET_PROJECTED: Duration = Duration::from_millis(100);

/// Watermarks that moved in a batch, per (chat, member): the highest of each.
type Moved = BTreeMap<(Uuid, Uuid), (Option<u64>, Option<u64>)>;

pub async fn apply(
    pg: &PgPool,
    announcer: &Announcer,
    batch: Vec<Delivered>,
) -> Result<Vec<Disposition>, sqlx::Error> {
    let (out, moved) = apply_batch(pg, batch).await?;
    announcer.announce(moved).await;
    Ok(out)
}

/// As `apply`, announcing nothing: a rebuild replays history, which is no news to anyone.
pub async fn apply_quietly(
    pg: &PgPool,
    batch: Vec<Delivered>,
) -> Result<Vec<Disposition>, sqlx::Error> {
    Ok(apply_batch(pg, batch).await?.0)
}

async fn apply_batch(
    pg: &PgPool,
    batch: Vec<Delivered>,
) -> Result<(Vec<Disposition>, Moved), sqlx::Error> {
    let events = decode_all::<ReceiptEvent>("receipts", &batch);
    let mut tx = pg.begin().await?;
    // A receipt can be here before the chats projection has the membership it moves (the two
    // projections run independently): applied now it would change nothing, and be lost. It
    // waits instead, as an event ahead of its predecessor does, so the read model ends as a
    // rebuild (which applies the streams in stored order) leaves it.
    let unknown = unknown_members(&mut tx, &events).await?;
    let mut out = Vec::with_capacity(events.len());
    // Watermarks only move up, so the highest of a batch per key is all that applying its
    // events one by one would leave: one statement per table instead of one per event.
    let mut cursors = Highest::new();
    let mut delivered = Highest::new();
    let mut read = Highest::new();
    for event in &events {
        let Some(event) = event else {
            out.push(Disposition::Term);
            continue;
        };
        let Ok(chat_id) = Uuid::parse_str(&event.meta.subject) else {
            out.push(Disposition::Term);
            continue;
        };
        // A batch waits whole while one of its members is unknown: reapplying the others
        // then is harmless, as watermarks only move up.
        if members_of(&event.event).any(|m| unknown.contains(&(chat_id, m))) {
            out.push(Disposition::Retry(MEMBER_NOT_YET_PROJECTED));
            continue;
        }
        for d in event.event.delivered() {
            raise(&mut cursors, (*d.device_id.as_uuid(), chat_id), d.up_to);
            raise(&mut delivered, (chat_id, *d.user_id.as_uuid()), d.up_to);
        }
        if let ReceiptEvent::Read(r) = &event.event {
            raise(&mut read, (chat_id, *r.user_id.as_uuid()), r.up_to);
        }
        out.push(Disposition::Ack);
    }
    if !cursors.is_empty() {
        let (devices, chats, ups) = columns(&cursors);
        sqlx::query(
            "INSERT INTO device_cursors (device_id, chat_id, acked_up_to) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[]) \
             ON CONFLICT (device_id, chat_id) DO UPDATE \
             SET acked_up_to = GREATEST(device_cursors.acked_up_to, EXCLUDED.acked_up_to)",
        )
        .bind(devices)
        .bind(chats)
        .bind(ups)
        .execute(&mut *tx)
        .await?;
    }
    let mut moved = Moved::new();
    for (chat, user, up) in raise_members(&mut tx, Watermark::Delivered, &delivered).await? {
        moved.entry((chat, user)).or_default().0 = Some(seq::from_db(up));
    }
    for (chat, user, up) in raise_members(&mut tx, Watermark::Read, &read).await? {
        moved.entry((chat, user)).or_default().1 = Some(seq::from_db(up));
    }
    checkpoint(&mut tx, "receipts", &batch).await?;
    tx.commit().await?;
    Ok((out, moved))
}

/// The members a receipt moves.
fn members_of(event: &ReceiptEvent) -> impl Iterator<Item = Uuid> + '_ {
    let read = match event {
        ReceiptEvent::Read(r) => Some(*r.user_id.as_uuid()),
        _ => None,
    };
    event
        .delivered()
        .iter()
        .map(|d| *d.user_id.as_uuid())
        .chain(read)
}

/// The (chat, member) pairs of the batch that `members` does not hold yet.
async fn unknown_members(
    tx: &mut sqlx::PgConnection,
    events: &[Option<StoredEvent<ReceiptEvent>>],
) -> Result<BTreeSet<(Uuid, Uuid)>, sqlx::Error> {
    let keys: BTreeSet<(Uuid, Uuid)> = events
        .iter()
        .flatten()
        .filter_map(|e| Some((Uuid::parse_str(&e.meta.subject).ok()?, &e.event)))
        .flat_map(|(chat, event)| members_of(event).map(move |m| (chat, m)))
        .collect();
    if keys.is_empty() {
        return Ok(BTreeSet::new());
    }
    let (chats, users): (Vec<Uuid>, Vec<Uuid>) = keys.into_iter().unzip();
    let missing: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT v.chat_id, v.user_id FROM UNNEST($1::uuid[], $2::uuid[]) AS v(chat_id, user_id) \
         WHERE NOT EXISTS (SELECT 1 FROM members m \
                           WHERE m.chat_id = v.chat_id AND m.user_id = v.user_id)",
    )
    .bind(&chats)
    .bind(&users)
    .fetch_all(&mut *tx)
    .await?;
    Ok(missing.into_iter().collect())
}

/// The highest `up_to` of a batch per key, in key order (the order rows are locked in).
type Highest = BTreeMap<(Uuid, Uuid), i64>;

fn raise(map: &mut Highest, key: (Uuid, Uuid), up_to: u64) {
    let up_to = seq::to_db(up_to);
    let entry = map.entry(key).or_insert(up_to);
    *entry = (*entry).max(up_to);
}

fn columns(map: &Highest) -> (Vec<Uuid>, Vec<Uuid>, Vec<i64>) {
    let mut cols = (
        Vec::with_capacity(map.len()),
        Vec::with_capacity(map.len()),
        Vec::with_capacity(map.len()),
    );
    for (&(a, b), &up) in map {
        cols.0.push(a);
        cols.1.push(b);
        cols.2.push(up);
    }
    cols
}

#[derive(Clone, Copy)]
enum Watermark {
    Delivered,
    Read,
}

/// Raises members' watermarks to the batch's highest; returns the moves to announce: those
/// that moved (not those already at or above it), outside channels.
async fn raise_members(
    tx: &mut sqlx::PgConnection,
    which: Watermark,
    ups: &Highest,
) -> Result<Vec<(Uuid, Uuid, i64)>, sqlx::Error> {
    if ups.is_empty() {
        return Ok(Vec::new());
    }
    let column = match which {
        Watermark::Delivered => "delivered_up_to",
        Watermark::Read => "read_up_to",
    };
    let sql = format!(
        "WITH moved AS (\
           UPDATE members m SET {column} = v.up \
           FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[]) AS v(chat_id, user_id, up) \
           WHERE m.chat_id = v.chat_id AND m.user_id = v.user_id AND m.{column} < v.up \
           RETURNING m.chat_id, m.user_id, m.{column}) \
         SELECT * FROM moved WHERE NOT EXISTS \
           (SELECT 1 FROM chats c WHERE c.chat_id = moved.chat_id AND c.kind = 'channel')"
    );
    let (chats, users, up) = columns(ups);
    sqlx::query_as(&sql)
        .bind(chats)
        .bind(users)
        .bind(up)
        .fetch_all(tx)
        .await
}

/// Announces the watermarks a batch moved, merged per chat over an interval.
///
/// Every move is a `receipt` frame on each other member's sockets, and in a busy group every
/// member's devices ack several times a second: ten members whose devices ack every 250 ms
/// make 40 moves and 360 frames a second per chat, twice the chat's messages' frames at 20
/// messages a second (docs/benchmarks.md, session 23). Merged, a chat announces at most its
/// members' highest watermarks once per interval, whatever the acks' rate. A quiet chat's
/// first moves go at once, so a DM's ticks are not delayed; the frames are cumulative and
/// best effort, so a merged move loses nothing a client shows.
#[derive(Clone)]
pub struct Announcer {
    nats: async_nats::Client,
    /// `None`: every move at once.
    merging: Option<Arc<Mutex<Notices>>>,
}

impl Announcer {
    /// Announces every batch's moves at once (an interval of zero).
    pub fn immediate(nats: async_nats::Client) -> Self {
        Self {
            nats,
            merging: None,
        }
    }

    /// Merges a chat's moves over `interval` (zero: [`Announcer::immediate`]). The task that
    /// announces the merged moves as each chat's interval ends runs on `tracker`; at
    /// `shutdown` it announces what it holds, and later moves go at once.
    pub fn merging(
        nats: async_nats::Client,
        interval: Duration,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        if interval.is_zero() {
            return Self::immediate(nats);
        }
        let notices = Arc::new(Mutex::new(Notices::new(interval)));
        tracker.spawn(announce_merged(
            nats.clone(),
            Arc::clone(&notices),
            interval,
            shutdown,
        ));
        Self {
            nats,
            merging: Some(notices),
        }
    }

    /// Only after the commit, so no frame ever shows a watermark the read model does not
    /// hold; a crash in between loses the frames, not the watermarks (clients read them with
    /// the receipts query).
    async fn announce(&self, moved: Moved) {
        let now = match &self.merging {
            None => moved,
            Some(notices) => lock(notices).offer(Instant::now(), moved),
        };
        publish(&self.nats, now).await;
    }
}

/// Announces merged moves as their chats' intervals end. It looks ten times per interval:
/// each chat keeps the phase of its own first announcement, so busy chats' notices are
/// spread over the interval rather than sent all at once (with one burst of every chat's
/// frames a second, the benchmark's commands had a worse tail than with no merging at all;
/// docs/benchmarks.md, session 23).
async fn announce_merged(
    nats: async_nats::Client,
    notices: Arc<Mutex<Notices>>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval((interval / 10).max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let due = lock(&notices).due(Instant::now());
        publish(&nats, due).await;
    }
    let rest = lock(&notices).close();
    publish(&nats, rest).await;
}

/// The merging state: pure (the caller passes the time), so its rules are tested without a
/// clock.
#[derive(Debug)]
struct Notices {
    interval: Duration,
    /// Chats that announced within their last interval, or that have moves waiting.
    chats: HashMap<Uuid, ChatNotices>,
    /// Shut down: nothing waits any more.
    closed: bool,
}

#[derive(Debug)]
struct ChatNotices {
    /// When the chat last announced: its next announcement is an interval later.
    announced_at: Instant,
    /// Moves waiting for that, each member's highest.
    pending: BTreeMap<Uuid, (Option<u64>, Option<u64>)>,
}

impl Notices {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            chats: HashMap::new(),
            closed: false,
        }
    }

    /// Takes a batch's moves; returns those to announce now. A chat that has announced
    /// nothing for an interval announces all of the batch's moves at once.
    fn offer(&mut self, now: Instant, moved: Moved) -> Moved {
        if self.closed {
            return moved;
        }
        let quiet: HashSet<Uuid> = moved
            .keys()
            .map(|&(chat, _)| chat)
            .filter(|chat| {
                self.chats
                    .get(chat)
                    .is_none_or(|c| c.pending.is_empty() && now >= c.announced_at + self.interval)
            })
            .collect();
        let mut out = Moved::new();
        for ((chat, user), (delivered, read)) in moved {
            if quiet.contains(&chat) {
                out.insert((chat, user), (delivered, read));
                continue;
            }
            if let Some(c) = self.chats.get_mut(&chat) {
                let merged = c.pending.entry(user).or_default();
                merged.0 = merged.0.max(delivered);
                merged.1 = merged.1.max(read);
            }
        }
        for chat in quiet {
            self.chats.insert(
                chat,
                ChatNotices {
                    announced_at: now,
                    pending: BTreeMap::new(),
                },
            );
        }
        out
    }

    /// The moves whose chat's interval has ended, announced now (the chat's next interval
    /// starts); chats with nothing waiting whose interval ended are quiet again.
    fn due(&mut self, now: Instant) -> Moved {
        let mut out = Moved::new();
        let interval = self.interval;
        self.chats.retain(|&chat, c| {
            if now < c.announced_at + interval {
                return true;
            }
            if c.pending.is_empty() {
                return false;
            }
            for (user, marks) in std::mem::take(&mut c.pending) {
                out.insert((chat, user), marks);
            }
            c.announced_at = now;
            true
        });
        out
    }

    /// Shutting down: what waited is announced now, and nothing waits after it.
    fn close(&mut self) -> Moved {
        self.closed = true;
        let mut out = Moved::new();
        for (chat, c) in self.chats.drain() {
            for (user, marks) in c.pending {
                out.insert((chat, user), marks);
            }
        }
        out
    }
}

async fn publish(nats: &async_nats::Client, moved: Moved) {
    if moved.is_empty() {
        return;
    }
    for ((chat, user), (delivered_up_to, read_up_to)) in moved {
        let notice = WatermarkMoved {
            chat_id: ChatId::from_uuid(chat),
            user_id: UserId::from_uuid(user),
            delivered_up_to,
            read_up_to,
        };
        if let Err(error) = announce(nats, &notice).await {
            tracing::warn!(%error, "receipt notice not published");
        }
    }
    if let Err(error) = nats.flush().await {
        tracing::warn!(%error, "receipt notices not flushed");
    }
}

// The state is touched only in short non-async sections; a panic while holding it leaves
// plain data behind, so a poisoned lock is still safe to use.
fn lock(notices: &Mutex<Notices>) -> std::sync::MutexGuard<'_, Notices> {
    notices.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(1);

    fn moves(entries: &[(u128, u128, Option<u64>, Option<u64>)]) -> Moved {
        entries
            .iter()
            .map(|&(chat, user, d, r)| ((Uuid::from_u128(chat), Uuid::from_u128(user)), (d, r)))
            .collect()
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_quiet_chat_announces_a_whole_batch_at_once() {
        let (mut notices, t0) = (Notices::new(INTERVAL), Instant::now());
        let batch = moves(&[(1, 10, Some(3), None), (1, 11, Some(2), Some(1))]);
        assert_eq!(notices.offer(t0, batch.clone()), batch);
        assert!(notices.due(ms(t0, 1000)).is_empty());
    }

    #[test]
    fn later_moves_wait_for_the_chats_interval_merged_to_each_members_highest() {
        let (mut notices, t0) = (Notices::new(INTERVAL), Instant::now());
        notices.offer(t0, moves(&[(1, 10, Some(3), None)]));
        assert!(
            notices
                .offer(ms(t0, 100), moves(&[(1, 10, Some(5), None)]))
                .is_empty()
        );
        let later = moves(&[(1, 10, Some(4), Some(2)), (1, 11, None, Some(1))]);
        assert!(notices.offer(ms(t0, 200), later).is_empty());
        // Another chat is not held up by this one.
        assert_eq!(
            notices.offer(ms(t0, 300), moves(&[(2, 10, Some(9), None)])),
            moves(&[(2, 10, Some(9), None)])
        );
        assert!(
            notices.due(ms(t0, 999)).is_empty(),
            "the interval has not ended"
        );
        assert_eq!(
            notices.due(ms(t0, 1000)),
            moves(&[(1, 10, Some(5), Some(2)), (1, 11, None, Some(1))])
        );
    }

    #[test]
    fn each_chat_keeps_its_own_phase() {
        let (mut notices, t0) = (Notices::new(INTERVAL), Instant::now());
        notices.offer(t0, moves(&[(1, 10, Some(1), None)]));
        notices.offer(ms(t0, 500), moves(&[(2, 10, Some(1), None)]));
        notices.offer(
            ms(t0, 600),
            moves(&[(1, 10, Some(2), None), (2, 10, Some(2), None)]),
        );
        assert_eq!(notices.due(ms(t0, 1000)), moves(&[(1, 10, Some(2), None)]));
        assert_eq!(notices.due(ms(t0, 1500)), moves(&[(2, 10, Some(2), None)]));
    }

    #[test]
    fn a_chat_that_announced_at_its_intervals_end_waits_again_then_goes_quiet() {
        let (mut notices, t0) = (Notices::new(INTERVAL), Instant::now());
        notices.offer(t0, moves(&[(1, 10, Some(3), None)]));
        notices.offer(ms(t0, 100), moves(&[(1, 10, Some(4), None)]));
        assert_eq!(notices.due(ms(t0, 1000)), moves(&[(1, 10, Some(4), None)]));
        // It just announced: its next move waits a whole interval.
        assert!(
            notices
                .offer(ms(t0, 1100), moves(&[(1, 10, Some(5), None)]))
                .is_empty()
        );
        assert!(notices.due(ms(t0, 1900)).is_empty());
        assert_eq!(notices.due(ms(t0, 2000)), moves(&[(1, 10, Some(5), None)]));
        // Nothing moved in its last interval: quiet again, and forgotten.
        assert!(notices.due(ms(t0, 3000)).is_empty());
        assert!(notices.chats.is_empty());
        assert_eq!(
            notices.offer(ms(t0, 3100), moves(&[(1, 10, Some(7), None)])),
            moves(&[(1, 10, Some(7), None)])
        );
    }

    #[test]
    fn closing_hands_over_what_waits_and_nothing_waits_after() {
        let (mut notices, t0) = (Notices::new(INTERVAL), Instant::now());
        notices.offer(t0, moves(&[(1, 10, Some(3), None)]));
        notices.offer(ms(t0, 100), moves(&[(1, 10, Some(4), None)]));
        assert_eq!(notices.close(), moves(&[(1, 10, Some(4), None)]));
        assert_eq!(
            notices.offer(ms(t0, 200), moves(&[(1, 10, Some(5), None)])),
            moves(&[(1, 10, Some(5), None)])
        );
    }
}
