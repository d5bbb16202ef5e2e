//! Optimistic concurrency under contention: many rounds of eight writers, each its own
//! process-like store (own cache, own lock), racing on one chat against a real `nats-server`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use parley_nats::{AppendContext, EventStore, JetStreamSettings};
use parley_schemas::{ChatId, EventId, UserId};
use parley_test_support::NatsServer;

use support::{Counter, any_event, stored};
use tokio::sync::Barrier;

const WRITERS: usize = 8;
/// The issue asks for 1,000 rounds; `PARLEY_CONTENTION_ROUNDS` runs a longer or shorter one.
fn rounds() -> usize {
    std::env::var("PARLEY_CONTENTION_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_writers_for_a_thousand_rounds_lose_nothing_and_retry_boundedly() {
    let server = NatsServer::start().await;
    let client = parley_nats::connect(&server.url()).await.unwrap();
    let js = jetstream::new(client);
    let buckets = parley_nats::ensure(&js, &JetStreamSettings::default())
        .await
        .unwrap();
    let chat = ChatId::new();
    let sender = UserId::new();
    let rounds = rounds();
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        // A store per writer: no shared cache or lock, so every race is decided by JetStream's
        // expected-sequence check, as between processes.
        let store: EventStore<Counter> = EventStore::new(
            js.clone(),
            buckets.snapshots.clone(),
            16,
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::with_capacity(rounds);
            let mut conflicts = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                barrier.wait().await;
                let ctx = AppendContext::new(sender);
                let out = store
                    .execute(*chat.as_uuid(), &ctx, |_: &Counter| {
                        Ok::<_, ()>(vec![any_event()])
                    })
                    .await
                    .expect("a writer gave up");
                won.push(out.appended[0].id);
                conflicts.push(out.conflicts);
            }
            (won, conflicts)
        }));
    }
    let mut won: Vec<EventId> = Vec::new();
    let mut conflicts: Vec<usize> = Vec::new();
    for t in tasks {
        let (w, c) = t.await.unwrap();
        won.extend(w);
        conflicts.extend(c);
    }

    let stored = stored(&js, chat).await;
    let total = rounds * WRITERS;
    let sequences: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        sequences,
        (1..=total as u64).collect::<Vec<_>>(),
        "gaps or doubles"
    );
    let stored_ids: HashSet<EventId> = stored.iter().map(|(_, id)| *id).collect();
    let won_ids: HashSet<EventId> = won.iter().copied().collect();
    assert_eq!(stored_ids.len(), total, "an event is stored twice");
    assert_eq!(stored_ids, won_ids, "an acknowledged write is missing");

    // In a round of eight, a writer can lose once to each of the other seven, plus once more on
    // its first attempt: its cache is as of its own append in the previous round, and the
    // writers that appended after it in that round make that attempt lose too.
    let max = conflicts.iter().copied().max().unwrap_or(0);
    let sum: usize = conflicts.iter().sum();
    conflicts.sort_unstable();
    let p99 = conflicts[conflicts.len() * 99 / 100];
    eprintln!(
        "contention: {total} appends in {rounds} rounds of {WRITERS}; conflicts total {sum}, \
         mean {:.2}, p99 {p99}, max {max}",
        sum as f64 / total as f64
    );
    assert!(
        max <= WRITERS,
        "a writer lost {max} times in one round of {WRITERS}"
    );
}
