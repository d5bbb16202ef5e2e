//! Presence on this gateway: heartbeats for the users connected here, and `presence` frames to
//! connected users about their contacts (users sharing a DM or group with them) when a
//! contact goes online or offline.
//!
//! - **Heartbeats.** Every `ttl / 3`, one put per locally connected user (not per connection)
//!   to the `presence` (TTL) and `last_seen` buckets; a user's first connection here puts at
//!   once, so contacts see it online without waiting a period.
//! - **Online.** A KV put is a plain publish on `$KV.presence.<user_id>`: one subscription to
//!   `$KV.presence.>` shows this gateway every heartbeat. A heartbeat of a watched contact
//!   believed offline is the online transition.
//! - **Offline.** On nats-server 2.9 a TTL expiry publishes nothing, and a crashed gateway
//!   says nothing either, so every gateway sweeps the contacts it watches: one believed online
//!   whose last heartbeat arrived more than `ttl` ago is read back from KV (a heartbeat lost on
//!   core NATS is not an outage) and, still stale, goes offline. Every gateway decides alone,
//!   from the same heartbeats, so no coordination is needed and a dead gateway's users go
//!   offline everywhere within `ttl` plus one sweep.
//!
//! Channels do not make contacts: a channel of 100,000 members would make every member watch
//! (and be told about) everyone. DMs and groups are bounded (`max_group_members`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use parley_nats::Buckets;
use parley_nats::presence::{self, heartbeat_period};
use parley_nats::subjects;
use parley_schemas::UserId;
use parley_schemas::frames::ServerFrame;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::hub::{ConnId, Inbound};

/// Heartbeats written at once by the heartbeat loop.
const PUTS_IN_FLIGHT: usize = 64;

pub(crate) struct Presence {
    buckets: Buckets,
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Users with live connections on this gateway, and how many.
    local: HashMap<UserId, usize>,
    /// Contact → the local connections told about it.
    watchers: HashMap<UserId, HashMap<ConnId, mpsc::Sender<Inbound>>>,
    /// What this gateway believes about each watched contact.
    known: HashMap<UserId, Known>,
}

#[derive(Debug, Clone, Copy)]
struct Known {
    /// `None` until the first read or heartbeat: no frame is sent for learning the state.
    online: Option<bool>,
    /// When the last heartbeat arrived here (local clock: immune to skew between gateways).
    heard: Instant,
    /// The heartbeat's own time, for `last_seen_at`.
    at: Option<DateTime<Utc>>,
}

/// A connection's part in presence; dropping it undoes it.
pub(crate) struct PresenceHandle {
    presence: Arc<Presence>,
    user: UserId,
    conn: ConnId,
    contacts: Vec<UserId>,
}

impl Presence {
    pub(crate) fn new(buckets: Buckets) -> Arc<Self> {
        let ttl = buckets.presence_ttl;
        Arc::new(Self {
            buckets,
            ttl,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Counts `user`'s connection `conn` and has it told about `contacts`. The user's first
    /// connection here heartbeats at once.
    pub(crate) fn join(
        self: &Arc<Self>,
        user: UserId,
        conn: ConnId,
        contacts: Vec<UserId>,
        tx: mpsc::Sender<Inbound>,
    ) -> PresenceHandle {
        let first = {
            let mut inner = self.lock();
            let count = inner.local.entry(user).or_insert(0);
            *count += 1;
            *count == 1
        };
        if first {
            let buckets = self.buckets.clone();
            tokio::spawn(async move {
                if let Err(error) = presence::heartbeat(&buckets, user, Utc::now()).await {
                    tracing::warn!(%error, %user, "first heartbeat not written");
                }
            });
        }
        let mut membership = PresenceHandle {
            presence: Arc::clone(self),
            user,
            conn,
            contacts: Vec::new(),
        };
        membership.set_contacts(contacts, tx);
        membership
    }

    /// Heartbeats the local users every `ttl / 3`; sweeps watched contacts for silence.
    pub(crate) async fn run(
        self: Arc<Self>,
        nats: async_nats::Client,
        shutdown: CancellationToken,
    ) {
        let heard = match nats.subscribe(subjects::PRESENCE_HEARTBEATS).await {
            Ok(sub) => sub,
            Err(error) => {
                tracing::error!(%error, "cannot subscribe to presence heartbeats; no presence frames");
                return self.heartbeat_only(shutdown).await;
            }
        };
        let mut heard = heard;
        let mut beat = tokio::time::interval(heartbeat_period(self.ttl));
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(self.sweep_period());
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = beat.tick() => self.heartbeat_all().await,
                _ = sweep.tick() => self.sweep().await,
                msg = heard.next() => match msg {
                    Some(msg) => self.on_heartbeat(&msg.subject, &msg.payload),
                    None => return self.heartbeat_only(shutdown).await,
                },
            }
        }
    }

    async fn heartbeat_only(&self, shutdown: CancellationToken) {
        let mut beat = tokio::time::interval(heartbeat_period(self.ttl));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = beat.tick() => self.heartbeat_all().await,
            }
        }
    }

    fn sweep_period(&self) -> Duration {
        (self.ttl / 6).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    async fn heartbeat_all(&self) {
        let users: Vec<UserId> = self.lock().local.keys().copied().collect();
        let at = Utc::now();
        futures::stream::iter(users)
            .for_each_concurrent(PUTS_IN_FLIGHT, |user| async move {
                if let Err(error) = presence::heartbeat(&self.buckets, user, at).await {
                    // The next period tries again; one miss is within the TTL.
                    tracing::warn!(%error, %user, "heartbeat not written");
                }
            })
            .await;
    }

    fn on_heartbeat(&self, subject: &str, payload: &[u8]) {
        let (Some(user), Some(beat)) = (
            presence::user_of_subject(subject),
            presence::decode(payload),
        ) else {
            return;
        };
        let mut inner = self.lock();
        let Some(known) = inner.known.get_mut(&user) else {
            return;
        };
        known.heard = Instant::now();
        known.at = Some(known.at.map_or(beat.at, |a| a.max(beat.at)));
        let was = known.online.replace(true);
        if was == Some(false) {
            let frame = presence_frame(user, true, Some(beat.at));
            send_to_watchers(&inner, user, &frame);
        }
    }

    /// Contacts believed online but silent for longer than the TTL: confirmed from KV, then
    /// announced offline.
    async fn sweep(&self) {
        let silent: Vec<UserId> = {
            let inner = self.lock();
            inner
                .known
                .iter()
                .filter(|(_, k)| k.online == Some(true) && k.heard.elapsed() > self.ttl)
                .map(|(u, _)| *u)
                .collect()
        };
        for user in silent {
            let seen = match presence::read(&self.buckets, user, Utc::now()).await {
                Ok(seen) => seen,
                Err(error) => {
                    // Saying "offline" because KV is down would be a lie; ask again next sweep.
                    tracing::warn!(%error, %user, "cannot confirm presence");
                    continue;
                }
            };
            let mut inner = self.lock();
            let Some(known) = inner.known.get_mut(&user) else {
                continue;
            };
            if known.online != Some(true) || known.heard.elapsed() <= self.ttl {
                continue; // a heartbeat arrived meanwhile
            }
            if seen.online {
                // The heartbeat's core NATS copy was lost; KV has it.
                known.heard = Instant::now();
                continue;
            }
            known.online = Some(false);
            let last_seen_at = seen.last_seen_at.or(known.at);
            known.at = last_seen_at;
            let frame = presence_frame(user, false, last_seen_at);
            send_to_watchers(&inner, user, &frame);
        }
    }

    /// Learns a newly watched contact's state without telling anybody.
    fn learn(self: &Arc<Self>, users: Vec<UserId>) {
        if users.is_empty() {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            for user in users {
                let seen = match presence::read(&this.buckets, user, Utc::now()).await {
                    Ok(seen) => seen,
                    Err(error) => {
                        tracing::warn!(%error, %user, "cannot read a contact's presence");
                        continue;
                    }
                };
                let age = seen
                    .last_seen_at
                    .and_then(|at| (Utc::now() - at).to_std().ok())
                    .unwrap_or_default();
                let mut inner = this.lock();
                if let Some(known) = inner.known.get_mut(&user)
                    && known.online.is_none()
                {
                    known.online = Some(seen.online);
                    known.at = seen.last_seen_at;
                    known.heard = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                }
            }
        });
    }

    // Held for map operations only, never across an await; poisoned data is still plain maps.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PresenceHandle {
    /// Replaces the contacts this connection is told about (membership changed). Contacts in
    /// both sets keep what this gateway knows about them.
    pub(crate) fn set_contacts(&mut self, contacts: Vec<UserId>, tx: mpsc::Sender<Inbound>) {
        let me = self.user;
        let new: HashSet<UserId> = contacts.into_iter().filter(|&c| c != me).collect();
        let presence = Arc::clone(&self.presence);
        let mut fresh = Vec::new();
        {
            let mut inner = presence.lock();
            for old in self.contacts.iter().filter(|c| !new.contains(c)) {
                unwatch(&mut inner, *old, self.conn);
            }
            for &contact in &new {
                inner
                    .watchers
                    .entry(contact)
                    .or_default()
                    .insert(self.conn, tx.clone());
                inner.known.entry(contact).or_insert_with(|| {
                    fresh.push(contact);
                    Known {
                        online: None,
                        heard: Instant::now(),
                        at: None,
                    }
                });
            }
        }
        self.contacts = new.into_iter().collect();
        presence.learn(fresh);
    }
}

impl Drop for PresenceHandle {
    fn drop(&mut self) {
        let last = {
            let mut inner = self.presence.lock();
            for contact in &self.contacts {
                unwatch(&mut inner, *contact, self.conn);
            }
            match inner.local.get_mut(&self.user) {
                Some(count) => {
                    *count = count.saturating_sub(1);
                    let last = *count == 0;
                    if last {
                        inner.local.remove(&self.user);
                    }
                    last
                }
                None => false,
            }
        };
        if last {
            // The user stays "online" until its heartbeat expires (it may be connected to
            // another gateway); `last_seen_at` is the moment it left here.
            let buckets = self.presence.buckets.clone();
            let user = self.user;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(error) = presence::left(&buckets, user, Utc::now()).await {
                        tracing::debug!(%error, %user, "last seen not written");
                    }
                });
            }
        }
    }
}

fn unwatch(inner: &mut Inner, contact: UserId, conn: ConnId) {
    if let Some(w) = inner.watchers.get_mut(&contact) {
        w.remove(&conn);
        if w.is_empty() {
            inner.watchers.remove(&contact);
            inner.known.remove(&contact);
        }
    }
}

fn presence_frame(user_id: UserId, online: bool, last_seen_at: Option<DateTime<Utc>>) -> Utf8Bytes {
    ServerFrame::Presence {
        user_id,
        online,
        last_seen_at,
    }
    .to_json()
    .into()
}

/// Best effort, like typing: a connection whose queue is more than half full misses the frame
/// (the HTTP presence query has the truth). The queue is shared with chat events, whose
/// overflow stops the connection, so presence never takes the last half of it.
fn send_to_watchers(inner: &Inner, user: UserId, frame: &Utf8Bytes) {
    if let Some(watchers) = inner.watchers.get(&user) {
        for tx in watchers.values() {
            offer(tx, frame);
        }
    }
}

fn offer(tx: &mpsc::Sender<Inbound>, frame: &Utf8Bytes) {
    if tx.capacity() * 2 > tx.max_capacity() {
        let _ = tx.try_send(Inbound::Presence(frame.clone()));
    }
}

/// The users sharing a current DM or group with `user`.
pub(crate) async fn contacts(pg: &PgPool, user: UserId) -> Result<Vec<UserId>, sqlx::Error> {
    let rows: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT o.user_id \
         FROM members me \
         JOIN chats c ON c.chat_id = me.chat_id AND c.kind IN ('dm', 'group') \
         JOIN members o ON o.chat_id = me.chat_id AND o.left_seq IS NULL AND o.user_id <> me.user_id \
         WHERE me.user_id = $1 AND me.left_seq IS NULL",
    )
    .bind(user.as_uuid())
    .fetch_all(pg)
    .await?;
    Ok(rows.into_iter().map(UserId::from_uuid).collect())
}
