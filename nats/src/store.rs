//! The event store: append with optimistic concurrency and dedup, and aggregate loading whose
//! cost does not grow with history (an in-memory cache, plus snapshots in the `snapshots` bucket).
//!
//! Appends carry `Nats-Expected-Last-Subject-Sequence` (the stream sequence of the aggregate's
//! last event, 0 for a new one), so two writers on one aggregate can never both win: the loser
//! catches up and decides again, a bounded number of times. Inside one process the writers of an
//! aggregate queue on its mutex instead, so conflicts only arise between processes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use async_nats::jetstream::{
    self, context::PublishErrorKind, kv, stream::DirectGetErrorKind, stream::Stream,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use parley_schemas::cloudevent::{self, CONTENT_TYPE, DomainEvent, EventMeta, StoredEvent};
use parley_schemas::{EventId, UserId};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::Mutex;
use uuid::Uuid;

/// Attempts of decide → append before giving up with [`ExecuteError::Conflict`].
const MAX_ATTEMPTS: usize = 16;

/// What the store needs to know about an aggregate. `evolve` must be pure.
pub trait Aggregate:
    Default + Clone + Serialize + DeserializeOwned + Send + Sync + 'static
{
    type Event: DomainEvent + Clone + std::fmt::Debug;
    /// Subject prefix, e.g. `chats` for `chats.<id>`.
    const PREFIX: &'static str;
    const STREAM: &'static str;
    /// Bump when the serialised state changes shape: older snapshots are then ignored.
    const SNAPSHOT_VERSION: u32;
    fn evolve(self, event: &Self::Event) -> Self;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Loaded<A> {
    state: A,
    /// The aggregate's version: the `sequence` of its last event, 0 when it has none.
    version: u64,
    /// The stream sequence of its last event: the expected-last-subject-sequence of the next append.
    last_stream_seq: u64,
}

#[derive(Serialize, Deserialize)]
struct Snapshot<A> {
    schema: u32,
    #[serde(flatten)]
    loaded: Loaded<A>,
}

/// The facts of one command that every event it produces carries.
#[derive(Debug, Clone)]
pub struct AppendContext {
    pub actor: UserId,
    pub time: DateTime<Utc>,
    /// Base of the `Nats-Msg-Id`s (from the command's idempotency key); `None` uses event ids.
    pub msg_id: Option<String>,
}

impl AppendContext {
    pub fn new(actor: UserId) -> Self {
        Self::idempotent(actor, None)
    }

    /// A context whose `Nats-Msg-Id`s derive from `msg_id` (an idempotency key), when given.
    pub fn idempotent(actor: UserId, msg_id: Option<String>) -> Self {
        Self {
            actor,
            time: Utc::now(),
            msg_id,
        }
    }
}

/// The result of a command: the aggregate's version after it, and the events it stored (empty
/// when the decision was to change nothing). A retry inside the duplicate window yields the
/// events of the first attempt.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub version: u64,
    pub appended: Vec<EventMeta>,
    /// Appends lost to another writer before this one won (0 when uncontended).
    pub conflicts: usize,
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum StoreError {
    #[error("NATS request failed: {0}")]
    Nats(String),
    #[error("stored event {stream_seq} cannot be decoded: {reason}")]
    Corrupt { stream_seq: u64, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<R> {
    #[error("rejected")]
    Rejected(R),
    #[error("gave up after {MAX_ATTEMPTS} conflicting attempts")]
    Conflict,
    /// The aggregate is no longer at the version the command's facts were read at
    /// ([`EventStore::execute_at`]): read the facts again and retry.
    #[error("the aggregate moved on to version {current}")]
    Stale { current: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Entry<A> = Arc<Mutex<Loaded<A>>>;

struct Inner<A: Aggregate> {
    js: jetstream::Context,
    stream: Stream,
    snapshots: kv::Store,
    cache: moka::future::Cache<Uuid, Entry<A>>,
    /// Aggregates changed since their last snapshot; flushed every `snapshot_interval`.
    dirty: StdMutex<HashSet<Uuid>>,
}

/// Event store for one aggregate kind. Cheap to clone.
pub struct EventStore<A: Aggregate> {
    inner: Arc<Inner<A>>,
}

impl<A: Aggregate> Clone for EventStore<A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

fn nats_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Nats(e.to_string())
}

/// As [`nats_err`], saying which request failed: in a failover several kinds time out, and
/// each waits on a different part of the cluster (the stream leader, the meta leader, a replica).
fn nats_err_in<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> StoreError {
    move |e| StoreError::Nats(format!("{what}: {e}"))
}

impl<A: Aggregate> EventStore<A> {
    /// `cache_capacity` aggregates are kept in memory; every changed aggregate is snapshotted
    /// within `snapshot_interval`, so its state outlives the stream's retention.
    pub async fn new(
        js: jetstream::Context,
        snapshots: kv::Store,
        cache_capacity: u64,
        snapshot_interval: Duration,
    ) -> Result<Self, StoreError> {
        let stream = js.get_stream(A::STREAM).await.map_err(nats_err)?;
        let inner = Arc::new(Inner {
            js,
            stream,
            snapshots,
            cache: moka::future::Cache::new(cache_capacity),
            dirty: StdMutex::new(HashSet::new()),
        });
        tokio::spawn(snapshot_loop(Arc::downgrade(&inner), snapshot_interval));
        Ok(Self { inner })
    }

    pub fn subject(id: Uuid) -> String {
        format!("{}.{}", A::PREFIX, id.hyphenated())
    }

    /// Runs `f` on the aggregate's current state and version (0: it does not exist).
    pub async fn read<T>(&self, id: Uuid, f: impl FnOnce(&A, u64) -> T) -> Result<T, StoreError> {
        let entry = self.entry(id).await?;
        let mut loaded = entry.lock().await;
        // Another process may have appended since we cached it: reads answer from the stream.
        self.catch_up(id, &mut loaded).await?;
        Ok(f(&loaded.state, loaded.version))
    }

    /// As [`EventStore::read`], on the state this process holds, without asking the stream for
    /// events another process may have appended since (one round trip less). For pre-checks
    /// that the command's own decision repeats on fresh state: every append is conditional on
    /// the stream's last sequence, so a stale answer here never stores a wrong event.
    pub async fn read_cached<T>(
        &self,
        id: Uuid,
        f: impl FnOnce(&A, u64) -> T,
    ) -> Result<T, StoreError> {
        let entry = self.entry(id).await?;
        let loaded = entry.lock().await;
        Ok(f(&loaded.state, loaded.version))
    }

    /// Decides on the current state and appends the events, retrying on conflict.
    pub async fn execute<R>(
        &self,
        id: Uuid,
        ctx: &AppendContext,
        decide: impl Fn(&A) -> Result<Vec<A::Event>, R>,
    ) -> Result<Outcome, ExecuteError<R>> {
        let entry = self.entry(id).await?;
        let mut loaded = entry.lock().await;
        for conflicts in 0..MAX_ATTEMPTS {
            let events = decide(&loaded.state).map_err(ExecuteError::Rejected)?;
            if events.is_empty() {
                return Ok(Outcome {
                    version: loaded.version,
                    appended: Vec::new(),
                    conflicts,
                });
            }
            match self.append(id, &mut loaded, ctx, events).await {
                Ok(appended) => {
                    self.mark_dirty(id);
                    return Ok(Outcome {
                        version: loaded.version,
                        appended,
                        conflicts,
                    });
                }
                Err(AppendError::WrongLastSequence) => {
                    self.catch_up(id, &mut loaded).await?;
                }
                Err(AppendError::Store(e)) => {
                    // The cached state may be behind what was stored: reload next time.
                    drop(loaded);
                    self.inner.cache.invalidate(&id).await;
                    return Err(e.into());
                }
            }
        }
        Err(ExecuteError::Conflict)
    }

    /// Decides and appends only while the aggregate is exactly at `version`: for commands whose
    /// facts come from outside the aggregate (a read model at that version). Any other event
    /// stored first — by this process or, through the conditional append, by another — makes
    /// it [`ExecuteError::Stale`], so the caller re-reads its facts and decides again.
    pub async fn execute_at<R>(
        &self,
        id: Uuid,
        ctx: &AppendContext,
        version: u64,
        decide: impl Fn(&A) -> Result<Vec<A::Event>, R>,
    ) -> Result<Outcome, ExecuteError<R>> {
        let entry = self.entry(id).await?;
        let mut loaded = entry.lock().await;
        if loaded.version < version {
            self.catch_up(id, &mut loaded).await?;
        }
        if loaded.version != version {
            return Err(ExecuteError::Stale {
                current: loaded.version,
            });
        }
        let events = decide(&loaded.state).map_err(ExecuteError::Rejected)?;
        if events.is_empty() {
            return Ok(Outcome {
                version: loaded.version,
                appended: Vec::new(),
                conflicts: 0,
            });
        }
        match self.append(id, &mut loaded, ctx, events).await {
            Ok(appended) => {
                self.mark_dirty(id);
                // A lost race is reported as `Stale`, never retried here.
                Ok(Outcome {
                    version: loaded.version,
                    appended,
                    conflicts: 0,
                })
            }
            Err(AppendError::WrongLastSequence) => {
                self.catch_up(id, &mut loaded).await?;
                Err(ExecuteError::Stale {
                    current: loaded.version,
                })
            }
            Err(AppendError::Store(e)) => {
                drop(loaded);
                self.inner.cache.invalidate(&id).await;
                Err(e.into())
            }
        }
    }

    async fn append(
        &self,
        id: Uuid,
        loaded: &mut Loaded<A>,
        ctx: &AppendContext,
        events: Vec<A::Event>,
    ) -> Result<Vec<EventMeta>, AppendError> {
        let subject = Self::subject(id);
        let mut appended = Vec::with_capacity(events.len());
        for (i, event) in events.into_iter().enumerate() {
            let meta = EventMeta {
                id: EventId::new(),
                subject: id.hyphenated().to_string(),
                time: ctx.time,
                sequence: loaded.version + 1,
                actor: ctx.actor,
            };
            let msg_id = match &ctx.msg_id {
                Some(base) => format!("{base}:{i}"),
                None => meta.id.to_string(),
            };
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id.as_str());
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                loaded.last_stream_seq.to_string().as_str(),
            );
            headers.insert("Content-Type", CONTENT_TYPE);
            let payload = Bytes::from(cloudevent::encode(&meta, &event));
            let ack = self
                .inner
                .js
                .publish_with_headers(subject.clone(), headers, payload)
                .await
                .map_err(|e| AppendError::Store(nats_err_in("publish")(e)))?
                .await;
            let ack = match ack {
                Ok(ack) => ack,
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(AppendError::WrongLastSequence);
                }
                Err(e) => return Err(AppendError::Store(nats_err_in("publish ack")(e))),
            };
            if ack.duplicate {
                // A retry of a command already stored inside the duplicate window: answer with
                // what the first attempt stored, and bring the state up to date.
                let original = self.event_at(ack.sequence).await?;
                self.catch_up(id, loaded).await?;
                appended.push(original.meta);
                continue;
            }
            loaded.state = std::mem::take(&mut loaded.state).evolve(&event);
            loaded.version = meta.sequence;
            loaded.last_stream_seq = ack.sequence;
            appended.push(meta);
        }
        Ok(appended)
    }

    /// The event the stream holds at `stream_seq`, read from the stream leader. Not a direct
    /// get: with replicas, a direct get may be answered by a follower that has not applied
    /// that entry yet (or, just after a failover, one holding an entry the new leader
    /// truncated), and this answers a duplicate with what was stored. Rare, so the cost of the
    /// leader round trip does not matter.
    async fn event_at(&self, stream_seq: u64) -> Result<StoredEvent<A::Event>, StoreError> {
        let msg = self
            .inner
            .stream
            .get_raw_message(stream_seq)
            .await
            .map_err(nats_err_in("reading a duplicate from the leader"))?;
        cloudevent::decode(&msg.payload).map_err(|e| StoreError::Corrupt {
            stream_seq,
            reason: e.to_string(),
        })
    }

    /// Applies the aggregate's events stored after `loaded.last_stream_seq`: the first few by
    /// direct gets (the usual tail is zero or one event: one round trip), the rest of a longer
    /// tail through one ordered consumer, which streams it instead of a round trip per event
    /// (an aggregate whose snapshot is missing or outdated may have a million).
    ///
    /// The consumer is only a speed-up: creating one needs the meta leader, which in a cluster
    /// failover can take tens of seconds to return (measured on nats-server 2.9), while direct
    /// gets are served by any current replica. So when streaming fails or stalls, the tail goes
    /// on by direct gets, a block at a time ([`fallback_block`]), and streaming is tried again
    /// after each block: a failover costs the command seconds, not the whole election, and a
    /// stream that stalled once (one full run of the bench saw a 1M-event tail stop for 2 s)
    /// no longer leaves the rest of a million events to a round trip each, which took longer
    /// than any client waits.
    async fn catch_up(&self, id: Uuid, loaded: &mut Loaded<A>) -> Result<usize, StoreError> {
        let subject = Self::subject(id);
        let (mut applied, mut done) = self.direct_gets(&subject, loaded, DIRECT_GETS).await?;
        let mut failures = 0;
        while !done {
            // What was streamed before a failure is applied and counted; go on from there.
            match self.stream_tail(&subject, loaded, &mut applied).await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(aggregate = %subject, failures, applied,
                            "a long catch-up streamed again after a failure and is complete");
                    }
                    return Ok(applied);
                }
                Err(e) => {
                    failures += 1;
                    let block = fallback_block(failures);
                    tracing::warn!(aggregate = %subject, error = %e, failures, block,
                        "streaming a long catch-up failed; reading a block by direct gets, \
                         then streaming again");
                    let (n, tail_ended) = self.direct_gets(&subject, loaded, block).await?;
                    applied += n;
                    done = tail_ended;
                }
            }
        }
        Ok(applied)
    }

    /// Applies up to `max` events of the tail by direct gets: how many, and whether the tail
    /// ended.
    async fn direct_gets(
        &self,
        subject: &str,
        loaded: &mut Loaded<A>,
        max: usize,
    ) -> Result<(usize, bool), StoreError> {
        let mut applied = 0;
        while applied < max {
            let next = self
                .inner
                .stream
                .direct_get_next_for_subject(subject, Some(loaded.last_stream_seq + 1))
                .await;
            let msg = match next {
                Ok(msg) => msg,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok((applied, true)),
                Err(e) => return Err(nats_err_in("direct get of the next event")(e)),
            };
            apply_stored(subject, loaded, &msg.payload, msg.sequence)?;
            applied += 1;
        }
        Ok((applied, false))
    }

    /// The rest of a long tail, through an ordered consumer from `last_stream_seq + 1` until
    /// it reports nothing pending, counting each event applied into `applied` (so a failure
    /// part way leaves the count right). Events stored meanwhile may or may not be included:
    /// like any read, the next append's expected sequence catches what was missed.
    async fn stream_tail(
        &self,
        subject: &str,
        loaded: &mut Loaded<A>,
        applied: &mut usize,
    ) -> Result<(), StoreError> {
        let create = self.inner.stream.create_consumer(OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: loaded.last_stream_seq + 1,
            },
            ..Default::default()
        });
        let consumer = tokio::time::timeout(TAIL_TIMEOUT, create)
            .await
            .map_err(nats_err_in("creating a catch-up consumer"))?
            .map_err(nats_err_in("creating a catch-up consumer"))?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(());
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(nats_err_in("reading a catch-up consumer"))?;
        loop {
            let msg = match tokio::time::timeout(TAIL_TIMEOUT, messages.next()).await {
                Ok(Some(Ok(msg))) => msg,
                Ok(Some(Err(e))) => return Err(nats_err_in("reading a catch-up consumer")(e)),
                Ok(None) => return Err(StoreError::Nats("the stream closed mid-read".into())),
                Err(_) => return Err(StoreError::Nats("reading the stream timed out".into())),
            };
            let info = msg.info().map_err(|e| nats_err(e.to_string()))?;
            let (stream_seq, pending) = (info.stream_sequence, info.pending);
            apply_stored(subject, loaded, &msg.payload, stream_seq)?;
            *applied += 1;
            if pending == 0 {
                return Ok(());
            }
        }
    }

    async fn entry(&self, id: Uuid) -> Result<Entry<A>, StoreError> {
        self.inner
            .cache
            .try_get_with(id, async {
                let mut loaded = self.load_snapshot(id).await;
                let applied = self.catch_up(id, &mut loaded).await?;
                if applied > 0 {
                    self.mark_dirty(id);
                }
                Ok::<_, StoreError>(Arc::new(Mutex::new(loaded)))
            })
            .await
            .map_err(|e: Arc<StoreError>| (*e).clone())
    }

    async fn load_snapshot(&self, id: Uuid) -> Loaded<A> {
        let empty = Loaded {
            state: A::default(),
            version: 0,
            last_stream_seq: 0,
        };
        let key = Self::subject(id);
        match self.inner.snapshots.get(key.as_str()).await {
            Ok(Some(bytes)) => match serde_json::from_slice::<Snapshot<A>>(&bytes) {
                Ok(s) if s.schema == A::SNAPSHOT_VERSION => s.loaded,
                Ok(_) => empty,
                Err(e) => {
                    tracing::warn!(%key, error = %e, "ignoring unreadable snapshot");
                    empty
                }
            },
            Ok(None) => empty,
            Err(e) => {
                // A snapshot is an optimisation: without one we read the stream.
                tracing::warn!(%key, error = %e, "snapshot read failed");
                empty
            }
        }
    }

    fn mark_dirty(&self, id: Uuid) {
        if let Ok(mut d) = self.inner.dirty.lock() {
            d.insert(id);
        }
    }

    /// Writes snapshots of every changed aggregate now (also done periodically).
    pub async fn flush_snapshots(&self) {
        flush(&self.inner).await;
    }
}

enum AppendError {
    WrongLastSequence,
    Store(StoreError),
}

impl From<StoreError> for AppendError {
    fn from(e: StoreError) -> Self {
        AppendError::Store(e)
    }
}

/// Direct gets a catch-up makes before it streams the rest of the tail instead.
const DIRECT_GETS: usize = 8;
/// Longest wait for a catch-up consumer to be created, or for its next event, before the
/// tail goes on by direct gets.
const TAIL_TIMEOUT: Duration = Duration::from_secs(2);

/// Direct gets a catch-up makes after its `failures`-th failed attempt to stream, before it
/// streams again: 1,024, doubling with each failure. The first block is about as long as the
/// 2 s a failed attempt may cost (round trips of 0.1–1 ms), so a tail of up to a thousand
/// events, all a cluster test's chats hold, is read whole after one failure, as before blocks;
/// the doubling keeps the attempts to a logarithm of the tail while a failover lasts.
fn fallback_block(failures: u32) -> usize {
    1024usize << failures.saturating_sub(1).min(20)
}

/// Evolves `loaded` by one stored event of `subject`.
fn apply_stored<A: Aggregate>(
    subject: &str,
    loaded: &mut Loaded<A>,
    payload: &[u8],
    stream_seq: u64,
) -> Result<(), StoreError> {
    let stored: StoredEvent<A::Event> =
        cloudevent::decode(payload).map_err(|e| StoreError::Corrupt {
            stream_seq,
            reason: e.to_string(),
        })?;
    if stored.meta.sequence != loaded.version + 1 {
        tracing::error!(
            aggregate = %subject,
            expected = loaded.version + 1,
            found = stored.meta.sequence,
            "aggregate sequence is not contiguous"
        );
    }
    loaded.state = std::mem::take(&mut loaded.state).evolve(&stored.event);
    loaded.version = stored.meta.sequence;
    loaded.last_stream_seq = stream_seq;
    Ok(())
}

async fn snapshot_loop<A: Aggregate>(inner: Weak<Inner<A>>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        flush(&inner).await;
    }
}

async fn flush<A: Aggregate>(inner: &Inner<A>) {
    let ids: Vec<Uuid> = match inner.dirty.lock() {
        Ok(mut d) => d.drain().collect(),
        Err(_) => return,
    };
    for id in ids {
        let Some(entry) = inner.cache.get(&id).await else {
            continue;
        };
        let bytes = {
            let loaded = entry.lock().await;
            serde_json::to_vec(&Snapshot {
                schema: A::SNAPSHOT_VERSION,
                loaded: (*loaded).clone(),
            })
        };
        let key = format!("{}.{}", A::PREFIX, id.hyphenated());
        match bytes {
            Ok(bytes) => {
                if let Err(e) = inner.snapshots.put(key.as_str(), bytes.into()).await {
                    tracing::warn!(%key, error = %e, "snapshot write failed");
                }
            }
            Err(e) => tracing::warn!(%key, error = %e, "snapshot encode failed"),
        }
    }
}
