//! The consumer loop every projector shares: pull what is ready (up to a batch), hand it to the
//! projection, then ack, nak or term each message as the projection says — only after its
//! transaction committed, so a crash anywhere redelivers and never skips. A projection with
//! reads to do before its transaction (the chats projection opens message bodies with keys from
//! NATS) runs in two stages, the next batches' reads overlapping the current one's transaction.
//! Preparations, transactions and acks each run on tasks of their own, so on a multi-core
//! runtime they run in parallel instead of taking turns on the loop's task.

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{
        AckPolicy, DeliverPolicy, PullConsumer,
        pull::{self, MessagesError},
    },
};
use futures::{FutureExt, StreamExt};
use parley_platform::Infra;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("cannot set up consumer {name}: {cause}")]
    Consumer { name: String, cause: String },
}

/// What to do with a message once its batch is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Applied (or already applied before).
    Ack,
    /// Not yet applicable (an earlier event of the aggregate is missing): redeliver later.
    Retry(Duration),
    /// Undecodable: it will never apply. Logged where decided.
    Term,
}

impl Disposition {
    /// The disposition of a message that two projections applied from one delivery: acked
    /// once both hold it, redelivered while either waits for an earlier event.
    pub fn and(self, other: Self) -> Self {
        use Disposition::*;
        match (self, other) {
            (Term, _) | (_, Term) => Term,
            (Retry(a), Retry(b)) => Retry(a.max(b)),
            (Retry(d), Ack) | (Ack, Retry(d)) => Retry(d),
            (Ack, Ack) => Ack,
        }
    }
}

/// A message of a batch: the stream sequence and the payload.
pub struct Delivered {
    pub stream_seq: u64,
    pub payload: bytes::Bytes,
}

/// Batches a staged projector fetches and prepares ahead of the one it applies. Two: in a
/// backlog a batch's preparation (key reads, opening 500 bodies) takes longer than its
/// transaction, so with one ahead the transactions waited for it (docs/benchmarks.md,
/// "Session 13"). Each batch ahead holds up to a batch of unacked messages, within the
/// consumer's `max_ack_pending` of four batches.
const PREPARED_AHEAD: usize = 2;

/// What the fetch stage hands the prepare stage.
enum Fetched {
    /// A batch's messages (for acking) and their payloads.
    Batch(Vec<jetstream::Message>, Vec<Delivered>),
    Stopped(Stopped),
}

/// A prepared batch: its messages (for acking) and its preparation's outcome.
type PreparedBatch<T, E> = (Vec<jetstream::Message>, Result<T, StageError<E>>);

/// The batch being applied: its messages, its apply's task, and when that started.
type ApplyingBatch<E> = (
    Vec<jetstream::Message>,
    JoinHandle<Result<Vec<Disposition>, E>>,
    Instant,
);

/// Why fetching stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// The pull stream ended (a pull failed or expired): start a new one.
    End,
    Shutdown,
}

pub struct Runner {
    name: &'static str,
    consumer: PullConsumer,
    batch: usize,
    linger: Duration,
    shutdown: CancellationToken,
    /// The acks of applied batches, sent on tasks of their own; awaited before the runner
    /// returns, so a clean shutdown leaves nothing applied unacked.
    settling: TaskTracker,
}

impl Runner {
    pub async fn new(
        infra: &Infra,
        name: &'static str,
        stream: &str,
        config: &crate::ProjectorConfig,
        from_start: bool,
    ) -> Result<Self, ProjectorError> {
        let err = |cause: String| ProjectorError::Consumer {
            name: name.to_owned(),
            cause,
        };
        let stream = infra
            .js
            .get_stream(stream)
            .await
            .map_err(|e| err(e.to_string()))?;
        let durable = format!("proj-{name}");
        let consumer = stream
            .get_or_create_consumer(
                &durable,
                pull::Config {
                    durable_name: Some(durable.clone()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: (config.batch * 4) as i64,
                    deliver_policy: if from_start {
                        DeliverPolicy::All
                    } else {
                        DeliverPolicy::New
                    },
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| err(e.to_string()))?;
        Ok(Self {
            name,
            consumer,
            batch: config.batch,
            linger: config.linger,
            shutdown: infra.shutdown.clone(),
            settling: TaskTracker::new(),
        })
    }

    /// Runs until shutdown. Transient failures (PostgreSQL or NATS down) back off and retry;
    /// nothing is acked that was not applied.
    pub async fn run<F, Fut, E>(self, apply: F)
    where
        F: FnMut(Vec<Delivered>) -> Fut,
        Fut: Future<Output = Result<Vec<Disposition>, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        // Nothing to prepare, so nothing to overlap: fetching the next batch only after the
        // transaction lets it gather everything that arrived meanwhile (fewer, larger batches).
        self.stages(|batch| std::future::ready(Ok(batch)), apply, false)
            .await;
        self.finish().await;
    }

    /// [`run`](Self::run) in two stages: `prepare` (no effects a redelivery could not repeat:
    /// decoding, reading keys) runs for the next [`PREPARED_AHEAD`] batches, concurrently,
    /// while `apply` (the transaction) runs for the current one, so a backlog's reads and
    /// writes overlap. Batches are applied in the order they were fetched, one transaction at a
    /// time; each batch is acked as soon as its own transaction committed.
    pub async fn run_staged<P, PFut, T, F, Fut, E>(self, prepare: P, apply: F)
    where
        P: FnMut(Vec<Delivered>) -> PFut,
        PFut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        F: FnMut(T) -> Fut,
        Fut: Future<Output = Result<Vec<Disposition>, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        self.stages(prepare, apply, true).await;
        self.finish().await;
    }

    /// Waits for the acks still on their way, once the loop returned.
    async fn finish(&self) {
        self.settling.close();
        self.settling.wait().await;
    }

    /// The loop of both. With `overlap`, up to [`PREPARED_AHEAD`] further batches are fetched
    /// and prepared, concurrently, during the current one's apply; without, the next batch is
    /// fetched only after it. Batches are applied in the order they were fetched, one
    /// transaction at a time.
    async fn stages<P, PFut, T, F, Fut, E>(&self, mut prepare: P, mut apply: F, overlap: bool)
    where
        P: FnMut(Vec<Delivered>) -> PFut,
        PFut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        F: FnMut(T) -> Fut,
        Fut: Future<Output = Result<Vec<Disposition>, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let ahead = if overlap { PREPARED_AHEAD } else { 0 };
        // The fetch future is `async move` (it owns the lent stream) and borrows the runner.
        let this = self;
        let mut backoff = Duration::from_millis(100);
        'outer: loop {
            let messages = match self
                .consumer
                .stream()
                .max_messages_per_batch(self.batch)
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(projector = self.name, error = %e, "pull failed; retrying");
                    if self.pause(&mut backoff).await {
                        return;
                    }
                    continue;
                }
            };
            // Lent to the fetch in progress, which hands it back with its batch.
            let mut messages = Some(messages.fuse());
            // Batches in preparation, in fetch order; a finished one waits in `ready` until
            // every batch before it is applied.
            let mut preparing = futures::stream::FuturesOrdered::new();
            let mut ready: std::collections::VecDeque<PreparedBatch<T, E>> =
                std::collections::VecDeque::new();
            let mut applying: Option<ApplyingBatch<E>> = None;
            let mut fetching = None;
            // Why fetching stopped: the pull stream ended, or shutdown.
            let mut stopped = None;
            loop {
                if applying.is_none() {
                    if stopped == Some(Stopped::Shutdown) {
                        return;
                    }
                    if let Some((msgs, prepared)) = ready.pop_front() {
                        match prepared {
                            Ok(prepared) => {
                                // A task of its own, like each preparation: on this task,
                                // the next batches' CPU work (decoding, opening bodies) would
                                // be polled between the transaction's round trips and
                                // lengthen it, where the other core could do it meanwhile.
                                applying =
                                    Some((msgs, tokio::spawn(apply(prepared)), Instant::now()));
                            }
                            Err(e) => {
                                self.redeliver(&msgs, &e, backoff).await;
                                if self.pause(&mut backoff).await {
                                    return;
                                }
                            }
                        }
                        continue;
                    }
                    if stopped == Some(Stopped::End) && preparing.is_empty() {
                        continue 'outer;
                    }
                }
                let in_flight = ready.len() + preparing.len() + usize::from(applying.is_some());
                if stopped.is_none()
                    && in_flight <= ahead
                    && let Some(mut lent) = messages.take()
                {
                    fetching = Some(Box::pin(async move {
                        let fetched = this.fetch(&mut lent).await;
                        (lent, fetched)
                    }));
                }
                tokio::select! {
                    Some(result) = async { Some((&mut applying.as_mut()?.1).await) }, if applying.is_some() => {
                        let Some((msgs, _, started)) = applying.take() else { continue };
                        if self.settle_applied(msgs, joined(result), started.elapsed(), &mut backoff).await
                            && self.pause(&mut backoff).await
                        {
                            return;
                        }
                    }
                    Some((lent, fetched)) = async { Some(fetching.as_mut()?.await) }, if fetching.is_some() => {
                        fetching = None;
                        messages = Some(lent);
                        match fetched {
                            Fetched::Batch(msgs, batch) => {
                                let prepared = tokio::spawn(prepare(batch));
                                preparing.push_back(async move { (msgs, joined(prepared.await)) });
                            }
                            Fetched::Stopped(why) => stopped = Some(why),
                        }
                    }
                    Some(done) = preparing.next(), if !preparing.is_empty() => ready.push_back(done),
                }
            }
        }
    }

    /// Acks an applied batch as its projection decided, or has a failed one redelivered; true
    /// when it failed (the caller backs off).
    async fn settle_applied<E: std::fmt::Display>(
        &self,
        msgs: Vec<jetstream::Message>,
        result: Result<Vec<Disposition>, E>,
        applied: Duration,
        backoff: &mut Duration,
    ) -> bool {
        match result {
            Ok(dispositions) => {
                *backoff = Duration::from_millis(100);
                tracing::debug!(
                    projector = self.name,
                    events = msgs.len(),
                    apply_us = applied.as_micros() as u64,
                    "batch applied"
                );
                // The acks (a publish each) go out on a task of their own, so the next
                // transaction does not wait for them. Their order does not matter, and one
                // lost in a crash only redelivers an event the projection already holds.
                self.settling.spawn(settle(self.name, msgs, dispositions));
                false
            }
            Err(e) => {
                self.redeliver(&msgs, &e, *backoff).await;
                true
            }
        }
    }

    /// The next batch from the pull stream. The first message waits for nobody (but
    /// shutdown); then whatever else is ready joins it, and, with a linger, whatever arrives
    /// within the linger, up to a batch. So a backlog moves in full batches, and a steady
    /// stream of single events is applied in one transaction per linger, not one per event.
    async fn fetch<S>(&self, messages: &mut S) -> Fetched
    where
        S: futures::stream::FusedStream<Item = Result<jetstream::Message, MessagesError>> + Unpin,
    {
        loop {
            let first = tokio::select! {
                _ = self.shutdown.cancelled() => return Fetched::Stopped(Stopped::Shutdown),
                m = messages.next() => m,
            };
            let Some(first) = first else {
                return Fetched::Stopped(Stopped::End);
            };
            let mut chunk = vec![first];
            let deadline = tokio::time::Instant::now() + self.linger;
            while chunk.len() < self.batch {
                // `None` outside: nothing more in time; inside: the stream ended, which ends
                // this batch (being fused, the stream reports the end again next time).
                let next = if self.linger.is_zero() {
                    messages.next().now_or_never()
                } else {
                    tokio::time::timeout_at(deadline, messages.next())
                        .await
                        .ok()
                };
                let Some(Some(next)) = next else { break };
                chunk.push(next);
            }
            let mut msgs = Vec::with_capacity(chunk.len());
            for m in chunk {
                match m {
                    Ok(m) => msgs.push(m),
                    Err(e) => tracing::debug!(projector = self.name, error = %e, "pull status"),
                }
            }
            if msgs.is_empty() {
                continue;
            }
            let batch: Vec<Delivered> = msgs
                .iter()
                .map(|m| Delivered {
                    stream_seq: m.info().map(|i| i.stream_sequence).unwrap_or(0),
                    payload: m.payload.clone(),
                })
                .collect();
            return Fetched::Batch(msgs, batch);
        }
    }

    /// A batch that could not be prepared or applied: every message comes back after `delay`.
    async fn redeliver(
        &self,
        msgs: &[jetstream::Message],
        e: &impl std::fmt::Display,
        delay: Duration,
    ) {
        tracing::warn!(projector = self.name, error = %e, "batch failed; redelivering");
        for m in msgs {
            let _ = m.ack_with(AckKind::Nak(Some(delay))).await;
        }
    }

    /// Sleeps with exponential backoff; true when shutting down.
    async fn pause(&self, backoff: &mut Duration) -> bool {
        let d = *backoff;
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = self.shutdown.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }
}

/// Acks, naks or terms each message of an applied batch as its projection decided.
async fn settle(
    projector: &'static str,
    msgs: Vec<jetstream::Message>,
    dispositions: Vec<Disposition>,
) {
    for (m, d) in msgs.iter().zip(dispositions) {
        let kind = match d {
            Disposition::Ack => AckKind::Ack,
            Disposition::Retry(delay) => AckKind::Nak(Some(delay)),
            Disposition::Term => AckKind::Term,
        };
        if let Err(e) = m.ack_with(kind).await {
            // Unacked messages come back after ack_wait and are skipped as already applied.
            tracing::warn!(projector, error = %e, "ack failed");
        }
    }
}

/// Why a stage's task gave no result: the projection's error, or the task's panic (which
/// redelivers the batch like an error, instead of ending the projector).
enum StageError<E> {
    Failed(E),
    Panicked(tokio::task::JoinError),
}

impl<E: std::fmt::Display> std::fmt::Display for StageError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Failed(e) => e.fmt(f),
            Self::Panicked(e) => write!(f, "stage task failed: {e}"),
        }
    }
}

/// A stage task's outcome.
fn joined<X, E>(r: Result<Result<X, E>, tokio::task::JoinError>) -> Result<X, StageError<E>> {
    match r {
        Ok(Ok(x)) => Ok(x),
        Ok(Err(e)) => Err(StageError::Failed(e)),
        Err(e) => Err(StageError::Panicked(e)),
    }
}

/// Decodes a batch; undecodable messages are logged and become `None` (termed by the caller).
pub fn decode_all<E: parley_schemas::DomainEvent>(
    projector: &str,
    batch: &[Delivered],
) -> Vec<Option<parley_schemas::StoredEvent<E>>> {
    batch
        .iter()
        .map(|d| match parley_schemas::cloudevent::decode::<E>(&d.payload) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::error!(projector, stream_seq = d.stream_seq, error = %e, "undecodable event; terminating it");
                None
            }
        })
        .collect()
}

/// Records the stream-level progress of a projection, inside its batch transaction.
pub async fn checkpoint(
    tx: &mut sqlx::PgConnection,
    projection: &str,
    batch: &[Delivered],
) -> Result<(), sqlx::Error> {
    let Some(max) = batch.iter().map(|d| d.stream_seq).max() else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO projector_checkpoints (projection, stream_seq, updated_at) VALUES ($1, $2, now()) \
         ON CONFLICT (projection) DO UPDATE SET stream_seq = GREATEST(projector_checkpoints.stream_seq, EXCLUDED.stream_seq), updated_at = now()",
    )
    .bind(projection)
    .bind(max as i64)
    .execute(tx)
    .await?;
    Ok(())
}

/// The per-aggregate versions of a batch's aggregates, locked for its transaction: the
/// projection's checkpoints (ADR 2). An event applies only when it is exactly the next version.
pub struct Versions {
    map: std::collections::HashMap<uuid::Uuid, i64>,
    out_of_order_delay: Duration,
}

impl Versions {
    /// `lock_sql` selects `(id, version)` rows with `id = ANY($1)` … `FOR UPDATE`.
    pub async fn lock<E>(
        tx: &mut sqlx::PgConnection,
        lock_sql: &str,
        events: &[Option<parley_schemas::StoredEvent<E>>],
        out_of_order_delay: Duration,
    ) -> Result<Self, sqlx::Error> {
        let ids: Vec<uuid::Uuid> = events
            .iter()
            .flatten()
            .filter_map(|e| uuid::Uuid::parse_str(&e.meta.subject).ok())
            .collect();
        let rows: Vec<(uuid::Uuid, i64)> =
            sqlx::query_as(lock_sql).bind(&ids).fetch_all(tx).await?;
        Ok(Self {
            map: rows.into_iter().collect(),
            out_of_order_delay,
        })
    }

    /// The event and its aggregate id if it applies now; otherwise what to do with it: an
    /// undecodable event (`None`, logged by `decode_all`) or a non-UUID subject is terminated,
    /// a duplicate acked, an event ahead of a missing one retried later.
    pub fn admit<'e, E>(
        &self,
        event: &'e Option<parley_schemas::StoredEvent<E>>,
    ) -> Result<(uuid::Uuid, &'e parley_schemas::StoredEvent<E>), Disposition> {
        let Some(event) = event else {
            return Err(Disposition::Term);
        };
        let Ok(id) = uuid::Uuid::parse_str(&event.meta.subject) else {
            tracing::error!(subject = %event.meta.subject, "event with a non-UUID subject");
            return Err(Disposition::Term);
        };
        let current = self.map.get(&id).copied().unwrap_or(0);
        let seq = event.meta.sequence as i64;
        if seq <= current {
            Err(Disposition::Ack)
        } else if seq != current + 1 {
            Err(Disposition::Retry(self.out_of_order_delay))
        } else {
            Ok((id, event))
        }
    }

    /// Records that `id` is now at `seq` (later events of the batch build on it).
    pub fn advance(&mut self, id: uuid::Uuid, seq: i64) {
        self.map.insert(id, seq);
    }
}

#[cfg(test)]
mod tests {
    use super::Disposition::{self, *};
    use std::time::Duration;

    #[test]
    fn two_projections_ack_a_message_only_when_both_hold_it() {
        let soon = Retry(Duration::from_millis(100));
        let later = Retry(Duration::from_millis(300));
        let cases: [(Disposition, Disposition, Disposition); 7] = [
            (Ack, Ack, Ack),
            (Ack, soon, soon),
            (soon, Ack, soon),
            (soon, later, later),
            (Term, Ack, Term),
            (Ack, Term, Term),
            (later, Term, Term),
        ];
        for (a, b, want) in cases {
            assert_eq!(a.and(b), want, "{a:?} and {b:?}");
        }
    }
}
