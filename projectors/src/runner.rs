//! The consumer loop every projector shares: pull what is ready (up to a batch), hand it to the
//! projection, then ack, nak or term each message as the projection says — only after its
//! transaction committed, so a crash anywhere redelivers and never skips. A projection with
//! reads to do before its transaction (the chats projection opens message bodies with keys from
//! NATS) runs in two stages, the next batch's reads overlapping the current one's transaction.

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
use tokio_util::sync::CancellationToken;

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

/// A message of a batch: the stream sequence and the payload.
pub struct Delivered {
    pub stream_seq: u64,
    pub payload: bytes::Bytes,
}

/// What the fetch stage hands the apply stage.
enum Fetched<T, E> {
    /// A batch's messages (for acking) and its preparation.
    Batch(Vec<jetstream::Message>, Result<T, E>),
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
        })
    }

    /// Runs until shutdown. Transient failures (PostgreSQL or NATS down) back off and retry;
    /// nothing is acked that was not applied.
    pub async fn run<F, Fut, E>(self, apply: F)
    where
        F: FnMut(Vec<Delivered>) -> Fut,
        Fut: Future<Output = Result<Vec<Disposition>, E>>,
        E: std::fmt::Display,
    {
        // Nothing to prepare, so nothing to overlap: fetching the next batch only after the
        // transaction lets it gather everything that arrived meanwhile (fewer, larger batches).
        self.pipeline(|batch| std::future::ready(Ok(batch)), apply, false)
            .await
    }

    /// [`run`](Self::run) in two stages: `prepare` (no effects a redelivery could not repeat:
    /// decoding, reading keys) runs for the next batch while `apply` (the transaction) runs for
    /// the current one, so a backlog's reads and writes overlap. Batches are prepared in order
    /// and applied in order, one transaction at a time; each batch is acked as soon as its own
    /// transaction committed.
    pub async fn run_staged<P, PFut, T, F, Fut, E>(self, prepare: P, apply: F)
    where
        P: FnMut(Vec<Delivered>) -> PFut,
        PFut: Future<Output = Result<T, E>>,
        F: FnMut(T) -> Fut,
        Fut: Future<Output = Result<Vec<Disposition>, E>>,
        E: std::fmt::Display,
    {
        self.pipeline(prepare, apply, true).await
    }

    /// The loop of both: with `overlap`, the next batch is fetched and prepared during the
    /// current one's apply; without, after it.
    async fn pipeline<P, PFut, T, F, Fut, E>(self, mut prepare: P, mut apply: F, overlap: bool)
    where
        P: FnMut(Vec<Delivered>) -> PFut,
        PFut: Future<Output = Result<T, E>>,
        F: FnMut(T) -> Fut,
        Fut: Future<Output = Result<Vec<Disposition>, E>>,
        E: std::fmt::Display,
    {
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
            let mut messages = messages.fuse();
            let mut next = self.fetch(&mut messages, &mut prepare).await;
            loop {
                let (msgs, prepared) = match next {
                    Fetched::Batch(msgs, prepared) => (msgs, prepared),
                    Fetched::End => continue 'outer,
                    Fetched::Shutdown => return,
                };
                let prepared = match prepared {
                    Ok(prepared) => prepared,
                    Err(e) => {
                        self.redeliver(&msgs, &e, backoff).await;
                        if self.pause(&mut backoff).await {
                            return;
                        }
                        next = self.fetch(&mut messages, &mut prepare).await;
                        continue;
                    }
                };
                // The transaction of this batch, and meanwhile (with `overlap`) the next
                // batch's fetch and preparation; this batch is acked the moment its
                // transaction is done.
                let started = Instant::now();
                let applying = apply(prepared);
                let fetching = self.fetch(&mut messages, &mut prepare);
                tokio::pin!(applying, fetching);
                let mut fetched = None;
                let result = loop {
                    tokio::select! {
                        r = &mut applying => break r,
                        f = &mut fetching, if overlap && fetched.is_none() => fetched = Some(f),
                    }
                };
                let applied = started.elapsed();
                let failed = match result {
                    Ok(dispositions) => {
                        backoff = Duration::from_millis(100);
                        self.settle(&msgs, dispositions).await;
                        tracing::debug!(
                            projector = self.name,
                            events = msgs.len(),
                            apply_us = applied.as_micros() as u64,
                            "batch applied"
                        );
                        false
                    }
                    Err(e) => {
                        self.redeliver(&msgs, &e, backoff).await;
                        true
                    }
                };
                next = match fetched {
                    Some(f) => f,
                    None => fetching.await,
                };
                if failed && self.pause(&mut backoff).await {
                    return;
                }
            }
        }
    }

    /// The next batch from the pull stream, prepared. The first message waits for nobody (but
    /// shutdown); then whatever else is ready joins it, and, with a linger, whatever arrives
    /// within the linger, up to a batch. So a backlog moves in full batches, and a steady
    /// stream of single events is applied in one transaction per linger, not one per event.
    async fn fetch<S, P, PFut, T, E>(&self, messages: &mut S, prepare: &mut P) -> Fetched<T, E>
    where
        S: futures::stream::FusedStream<Item = Result<jetstream::Message, MessagesError>> + Unpin,
        P: FnMut(Vec<Delivered>) -> PFut,
        PFut: Future<Output = Result<T, E>>,
    {
        loop {
            let first = tokio::select! {
                _ = self.shutdown.cancelled() => return Fetched::Shutdown,
                m = messages.next() => m,
            };
            let Some(first) = first else {
                return Fetched::End;
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
            let prepared = prepare(batch).await;
            return Fetched::Batch(msgs, prepared);
        }
    }

    /// Acks, naks or terms each message of an applied batch as its projection decided.
    async fn settle(&self, msgs: &[jetstream::Message], dispositions: Vec<Disposition>) {
        for (m, d) in msgs.iter().zip(dispositions) {
            let kind = match d {
                Disposition::Ack => AckKind::Ack,
                Disposition::Retry(delay) => AckKind::Nak(Some(delay)),
                Disposition::Term => AckKind::Term,
            };
            if let Err(e) = m.ack_with(kind).await {
                // Unacked messages come back after ack_wait and are skipped as already
                // applied.
                tracing::warn!(projector = self.name, error = %e, "ack failed");
            }
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
