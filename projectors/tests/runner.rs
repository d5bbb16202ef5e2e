//! The consumer loop every projector shares, against a real JetStream: the next batches are
//! prepared (two at once, no more) while the current one is applied, a batch is acked the
//! moment it is applied (not when the next one arrives), a batch that failed (or whose stage
//! panicked) comes back, and a linger gathers what arrives within it without holding back a
//! full batch.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use futures::StreamExt;
use parley_nats::{streams, subjects};
use parley_projectors::ProjectorConfig;
use parley_projectors::runner::{Delivered, Disposition, Runner};
use parley_schemas::ChatId;
use parley_test_support::{TestStack, eventually};
use tokio::sync::{Notify, mpsc};

const DEADLINE: Duration = Duration::from_secs(10);

/// Publishes `n` raw messages on one chat's subject (the runner does not decode them).
async fn publish(stack: &TestStack, n: usize) {
    let subject = subjects::chat(ChatId::new());
    for i in 0..n {
        stack
            .infra
            .js
            .publish(subject.clone(), format!("m{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

async fn runner(stack: &TestStack, name: &'static str, batch: usize) -> Runner {
    lingering_runner(stack, name, batch, Duration::ZERO).await
}

async fn lingering_runner(
    stack: &TestStack,
    name: &'static str,
    batch: usize,
    linger: Duration,
) -> Runner {
    let config = ProjectorConfig {
        batch,
        linger,
        ..Default::default()
    };
    Runner::new(&stack.infra, name, streams::CHATS, &config, true)
        .await
        .unwrap()
}

/// A first stage with nothing to do: the staged loop (fetching ahead) with the plain apply.
fn prepare_nothing(batch: Vec<Delivered>) -> std::future::Ready<Result<Vec<Delivered>, String>> {
    std::future::ready(Ok(batch))
}

/// Waits until the durable `proj-<name>` has delivered everything and exactly `unacked`
/// messages are delivered but not acked.
async fn consumer_reaches(stack: &TestStack, name: &str, unacked: usize, what: &str) {
    let stream = stack.infra.js.get_stream(streams::CHATS).await.unwrap();
    eventually(DEADLINE, what, || {
        let stream = stream.clone();
        async move {
            let mut consumer = stream
                .get_consumer::<pull::Config>(&format!("proj-{name}"))
                .await
                .ok()?;
            let info = consumer.info().await.ok()?;
            (info.num_pending == 0 && info.num_ack_pending == unacked).then_some(())
        }
    })
    .await;
}

/// Waits until the durable `proj-<name>` has nothing pending and nothing unacked.
async fn all_acked(stack: &TestStack, name: &str, what: &str) {
    consumer_reaches(stack, name, 0, what).await;
}

/// An apply that acks every message of its batch.
fn ack_all(batch: Vec<Delivered>) -> std::future::Ready<Result<Vec<Disposition>, String>> {
    std::future::ready(Ok(vec![Disposition::Ack; batch.len()]))
}

/// The next value on `rx`, within the deadline; `what` names what failed to arrive.
async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what} within {DEADLINE:?}"))
        .unwrap()
}

/// Everything `rx` holds now, without waiting.
fn drained<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

/// Shuts the stack down and waits for the runner's task to return.
async fn stop(stack: &TestStack, task: tokio::task::JoinHandle<()>) {
    stack.infra.shutdown.cancel();
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn the_next_batch_is_prepared_while_the_current_one_is_applied() {
    let stack = TestStack::start().await;
    publish(&stack, 2).await;
    let runner = runner(&stack, "staged", 1).await;

    // The first apply holds its "transaction" open until the test sees the second batch
    // prepared; a runner that prepares only after applying never gets there.
    let (prepared_tx, mut prepared_rx) = mpsc::unbounded_channel::<(u64, bool)>();
    let applying = Arc::new(AtomicBool::new(false));
    let release = Arc::new(Notify::new());
    let task = tokio::spawn({
        let (applying_p, applying_a, release) =
            (applying.clone(), applying.clone(), release.clone());
        runner.run_staged(
            move |batch: Vec<Delivered>| {
                let during_apply = applying_p.load(Ordering::SeqCst);
                prepared_tx
                    .send((batch[0].stream_seq, during_apply))
                    .unwrap();
                std::future::ready(Ok::<_, String>(batch))
            },
            move |batch: Vec<Delivered>| {
                let (applying, release) = (applying_a.clone(), release.clone());
                async move {
                    applying.store(true, Ordering::SeqCst);
                    if batch[0].stream_seq == 1 {
                        release.notified().await;
                    }
                    applying.store(false, Ordering::SeqCst);
                    ack_all(batch).await
                }
            },
        )
    });

    let first = tokio::time::timeout(DEADLINE, prepared_rx.recv())
        .await
        .unwrap();
    assert_eq!(first, Some((1, false)));
    let second = tokio::time::timeout(DEADLINE, prepared_rx.recv())
        .await
        .expect("the second batch was not prepared while the first was being applied");
    assert_eq!(
        second,
        Some((2, true)),
        "the second batch is prepared during the first one's apply"
    );
    release.notify_one();
    all_acked(&stack, "staged", "both batches acked").await;
    stop(&stack, task).await;
}

#[tokio::test]
async fn two_batches_are_prepared_at_once_ahead_of_the_one_applied_and_no_third() {
    let stack = TestStack::start().await;
    publish(&stack, 5).await;
    let runner = runner(&stack, "ahead", 1).await;

    // Batch 1's apply and batch 2's preparation hold until released. Each preparation
    // records whether batch 2's was still running and whether batch 1 was applied yet.
    let (called_tx, mut called_rx) = mpsc::unbounded_channel::<(u64, bool, bool)>();
    let (applied_tx, mut applied_rx) = mpsc::unbounded_channel::<u64>();
    let first_applied = Arc::new(AtomicBool::new(false));
    let second_preparing = Arc::new(AtomicBool::new(false));
    let release_apply = Arc::new(Notify::new());
    let release_prepare = Arc::new(Notify::new());
    let task = tokio::spawn({
        let (first_applied_p, first_applied_a) = (first_applied.clone(), first_applied.clone());
        let (second_preparing, release_apply, release_prepare) = (
            second_preparing.clone(),
            release_apply.clone(),
            release_prepare.clone(),
        );
        runner.run_staged(
            move |batch: Vec<Delivered>| {
                let seq = batch[0].stream_seq;
                if seq == 2 {
                    second_preparing.store(true, Ordering::SeqCst);
                }
                called_tx
                    .send((
                        seq,
                        second_preparing.load(Ordering::SeqCst),
                        first_applied_p.load(Ordering::SeqCst),
                    ))
                    .unwrap();
                let (second_preparing, release) =
                    (second_preparing.clone(), release_prepare.clone());
                async move {
                    if seq == 2 {
                        release.notified().await;
                        second_preparing.store(false, Ordering::SeqCst);
                    }
                    Ok::<_, String>(batch)
                }
            },
            move |batch: Vec<Delivered>| {
                let (first_applied, release, applied_tx) = (
                    first_applied_a.clone(),
                    release_apply.clone(),
                    applied_tx.clone(),
                );
                async move {
                    let seq = batch[0].stream_seq;
                    if seq == 1 {
                        release.notified().await;
                        first_applied.store(true, Ordering::SeqCst);
                    }
                    applied_tx.send(seq).unwrap();
                    ack_all(batch).await
                }
            },
        )
    });

    assert_eq!(
        next(&mut called_rx, "a batch was not prepared").await,
        (1, false, false)
    );
    assert_eq!(
        next(&mut called_rx, "a batch was not prepared").await,
        (2, true, false),
        "batch 2 before batch 1 is applied"
    );
    assert_eq!(
        next(&mut called_rx, "a batch was not prepared").await,
        (3, true, false),
        "batch 3 while batch 2 is still being prepared and batch 1 applied"
    );
    // Batch 4 is in the stream and would be fetched within milliseconds by a runner allowed a
    // third batch ahead (measured so); a second is a wide margin for absence.
    let third_ahead = tokio::time::timeout(Duration::from_secs(1), called_rx.recv()).await;
    assert!(
        third_ahead.is_err(),
        "no third batch is prepared ahead: {third_ahead:?}"
    );
    release_apply.notify_one();
    assert_eq!(
        next(&mut called_rx, "a batch was not prepared").await,
        (4, true, true),
        "batch 4 once batch 1 is applied"
    );
    release_prepare.notify_one();
    let mut order = Vec::new();
    while order.len() < 5 {
        order.push(next(&mut applied_rx, "a batch was not applied").await);
    }
    assert_eq!(order, [1, 2, 3, 4, 5], "applied in the order fetched");
    all_acked(&stack, "ahead", "every batch acked").await;
    stop(&stack, task).await;
}

#[tokio::test]
async fn a_batch_is_acked_as_soon_as_it_is_applied_with_no_next_batch_in_sight() {
    let stack = TestStack::start().await;
    publish(&stack, 1).await;
    let runner = runner(&stack, "lone", 500).await;
    let task = tokio::spawn(runner.run_staged(prepare_nothing, ack_all));
    // Nothing else is published: the fetch of a next batch stays pending for good, and the
    // ack must not wait for it (it would be redelivered after ack_wait, 30 s).
    all_acked(&stack, "lone", "the lone batch acked").await;
    stop(&stack, task).await;
}

#[tokio::test]
async fn a_batch_whose_apply_failed_is_redelivered_and_applied() {
    let stack = TestStack::start().await;
    publish(&stack, 3).await;
    let runner = runner(&stack, "flaky", 1).await;
    let (applied_tx, mut applied_rx) = mpsc::unbounded_channel::<(u64, bool)>();
    let failed_once = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(
        runner.run_staged(prepare_nothing, move |batch: Vec<Delivered>| {
            let (applied_tx, failed_once) = (applied_tx.clone(), failed_once.clone());
            async move {
                let seq = batch[0].stream_seq;
                // The second message fails once, as a transaction would when PostgreSQL is away.
                if seq == 2 && !failed_once.swap(true, Ordering::SeqCst) {
                    applied_tx.send((seq, false)).unwrap();
                    return Err("PostgreSQL is away".to_owned());
                }
                applied_tx.send((seq, true)).unwrap();
                ack_all(batch).await
            }
        }),
    );
    all_acked(&stack, "flaky", "every message acked").await;
    stop(&stack, task).await;

    let seen = drained(&mut applied_rx);
    let mut committed: Vec<u64> = seen.iter().filter(|(_, ok)| *ok).map(|(s, _)| *s).collect();
    committed.sort_unstable();
    assert_eq!(
        committed,
        vec![1, 2, 3],
        "each message applied exactly once: {seen:?}"
    );
    assert!(seen.contains(&(2, false)), "the failure happened: {seen:?}");
}

#[tokio::test]
async fn a_batch_whose_preparation_or_apply_panicked_is_redelivered_and_the_projector_goes_on() {
    let stack = TestStack::start().await;
    publish(&stack, 3).await;
    let runner = runner(&stack, "panicky", 1).await;
    let (applied_tx, mut applied_rx) = mpsc::unbounded_channel::<u64>();
    let (prepare_panicked, apply_panicked) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    // Each stage runs on a task of its own; a bug that panics in one must cost the batch a
    // redelivery, not the projector its task (which would leave every later event unapplied).
    let task = tokio::spawn(runner.run_staged(
        move |batch: Vec<Delivered>| {
            let panicked = prepare_panicked.clone();
            async move {
                if batch[0].stream_seq == 3 && !panicked.swap(true, Ordering::SeqCst) {
                    panic!("a preparation bug");
                }
                Ok::<_, String>(batch)
            }
        },
        move |batch: Vec<Delivered>| {
            let (applied_tx, panicked) = (applied_tx.clone(), apply_panicked.clone());
            async move {
                let seq = batch[0].stream_seq;
                if seq == 2 && !panicked.swap(true, Ordering::SeqCst) {
                    panic!("an apply bug");
                }
                applied_tx.send(seq).unwrap();
                ack_all(batch).await
            }
        },
    ));
    all_acked(&stack, "panicky", "every message acked after the panics").await;
    stop(&stack, task).await;

    let mut applied = drained(&mut applied_rx);
    applied.sort_unstable();
    assert_eq!(applied, vec![1, 2, 3], "each message applied exactly once");
}

#[tokio::test]
async fn events_arriving_within_the_linger_are_applied_in_one_batch() {
    let stack = TestStack::start().await;
    publish(&stack, 1).await;
    let runner = lingering_runner(&stack, "linger", 500, Duration::from_secs(3)).await;
    let (batches_tx, mut batches_rx) = mpsc::unbounded_channel::<Vec<u64>>();
    let task = tokio::spawn(runner.run(move |batch: Vec<Delivered>| {
        let batches_tx = batches_tx.clone();
        async move {
            batches_tx
                .send(batch.iter().map(|d| d.stream_seq).collect())
                .unwrap();
            ack_all(batch).await
        }
    }));
    // The first message is with the runner and not applied (it lingers); two more arrive.
    consumer_reaches(
        &stack,
        "linger",
        1,
        "the first message delivered, not acked",
    )
    .await;
    assert!(
        batches_rx.try_recv().is_err(),
        "applied before the linger ended"
    );
    publish(&stack, 2).await;
    let first = tokio::time::timeout(DEADLINE, batches_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        vec![1, 2, 3],
        "one batch for everything within the linger"
    );
    stop(&stack, task).await;
}

#[tokio::test]
async fn a_full_batch_does_not_wait_for_the_linger() {
    let stack = TestStack::start().await;
    publish(&stack, 2).await;
    // A linger far beyond the deadline: only a full batch can be applied in time.
    let runner = lingering_runner(&stack, "full", 2, Duration::from_secs(600)).await;
    let task = tokio::spawn(runner.run(ack_all));
    all_acked(&stack, "full", "the full batch applied at once").await;
    stop(&stack, task).await;
}

#[tokio::test]
async fn starting_the_projectors_retires_the_consumers_of_readers_folded_into_the_chats_projector()
{
    let stack = TestStack::start().await;
    let chats = stack.infra.js.get_stream(streams::CHATS).await.unwrap();
    for retired in ["proj-fanout", "proj-activity-chats"] {
        chats
            .create_consumer(pull::Config {
                durable_name: Some(retired.into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let tracker = tokio_util::task::TaskTracker::new();
    parley_projectors::spawn(&stack.infra, ProjectorConfig::default(), &tracker)
        .await
        .unwrap();
    let names: Vec<String> = chats
        .consumer_names()
        .map(|n| n.unwrap())
        .collect::<Vec<_>>()
        .await;
    let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
    names.sort_unstable();
    // The chats projector reads for the activity rollup too; nothing else reads CHATS.
    assert_eq!(names, ["proj-chats"]);
    stack.infra.shutdown.cancel();
    tracker.close();
    tokio::time::timeout(DEADLINE, tracker.wait())
        .await
        .unwrap();
}
