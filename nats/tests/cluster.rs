//! A real 3-node JetStream cluster on loopback with R3 streams: SIGKILLing the stream leader
//! under load loses no acknowledged append, doubles none, and leaves no gap.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use parley_nats::{AppendContext, EventStore, JetStreamSettings, streams};
use parley_schemas::{ChatId, EventId, UserId};
use parley_test_support::{NatsCluster, eventually_result};

use support::{Counter, any_event, stored_by_leader};
use tokio::sync::Mutex;

const CHATS: usize = 16;
const WRITERS: usize = 8;
const APPENDS: usize = 1200;
const KILL_AFTER: usize = 300;
/// How long one append may go unacknowledged across the failover before the test fails.
const ACK_DEADLINE: Duration = Duration::from_secs(30);

// Once (1 run in 4, before two changes) an acknowledged append looked lost after the leader's
// SIGKILL: acked 73, stored 72 in one chat. Two readers could be answered by a follower still
// catching up: this checker (an ordered consumer) and the event store's duplicate path (a
// direct get). Both now read from the leader (`stored_by_leader`, `EventStore::event_at`);
// 9 of 9 runs passed since, on a loaded machine (docs/reliability.md).
//
// A later CI run failed the ack deadline instead: after an error the store reloads the chat,
// and its catch-up created an ordered consumer, which waits for the meta leader (~25 s here
// after the kill). Catch-up now falls back to direct gets; the longest wait for one ack went
// from 25–30 s to ~7 s (printed at the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_stream_leader_under_load_loses_no_acknowledged_append() {
    let mut cluster = NatsCluster::start(3).await;
    let client = parley_nats::connect(&cluster.url()).await.unwrap();
    let js = jetstream::new(client);
    let settings = JetStreamSettings {
        replicas: 3,
        ..JetStreamSettings::default()
    };
    // R3 streams need every peer known to the meta leader; that can take a moment after start.
    let buckets = eventually_result(Duration::from_secs(30), || {
        let js = js.clone();
        let settings = settings.clone();
        async move { parley_nats::ensure(&js, &settings).await }
    })
    .await
    .expect("R3 streams and buckets");
    let store: EventStore<Counter> = EventStore::new(
        js.clone(),
        buckets.snapshots,
        1000,
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let chats: Vec<ChatId> = (0..CHATS).map(|_| ChatId::new()).collect();
    let sender = UserId::new();
    let acked: Arc<Mutex<HashMap<ChatId, Vec<EventId>>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let longest_ms = Arc::new(AtomicUsize::new(0));

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (store, chats, acked, done, retries, longest_ms) = (
            store.clone(),
            chats.clone(),
            acked.clone(),
            done.clone(),
            retries.clone(),
            longest_ms.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for n in 0.. {
                if done.load(Ordering::SeqCst) >= APPENDS {
                    return;
                }
                let chat = chats[(w + n * WRITERS) % CHATS];
                // A client retries a command with the same key until it is acknowledged; the
                // Msg-Id makes the retry of an append that was stored (ack lost) a no-op.
                let ctx = AppendContext::idempotent(sender, Some(format!("w{w}-{n}")));
                let event = any_event();
                let first_try = Instant::now();
                let meta = loop {
                    match store
                        .execute(*chat.as_uuid(), &ctx, |_: &Counter| {
                            Ok::<_, ()>(vec![event.clone()])
                        })
                        .await
                    {
                        Ok(out) => break out.appended[0].clone(),
                        Err(e) => {
                            assert!(
                                first_try.elapsed() < ACK_DEADLINE,
                                "no ack within {ACK_DEADLINE:?}: {e}"
                            );
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                };
                longest_ms.fetch_max(first_try.elapsed().as_millis() as usize, Ordering::Relaxed);
                acked.lock().await.entry(chat).or_default().push(meta.id);
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    // Wait for some load, then SIGKILL whichever node leads the CHATS stream.
    parley_test_support::eventually(Duration::from_secs(60), "load before the kill", || {
        let done = done.clone();
        async move { (done.load(Ordering::SeqCst) >= KILL_AFTER).then_some(()) }
    })
    .await;
    let mut stream = js.get_stream(streams::CHATS).await.unwrap();
    let leader = stream
        .info()
        .await
        .unwrap()
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("CHATS has a leader");
    let victim = cluster.index_of(&leader).expect("leader is one of ours");
    cluster.kill(victim);
    eprintln!(
        "killed stream leader {leader} after {} acked appends",
        done.load(Ordering::SeqCst)
    );

    for t in tasks {
        t.await.unwrap();
    }
    cluster.restart(victim).await;

    let acked = acked.lock().await;
    // Read what the stream holds from its leader, once it has one again (a consumer or a direct
    // get may be served by a follower still catching up, which would look like a lost append).
    parley_test_support::eventually(Duration::from_secs(60), "a CHATS leader", || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(streams::CHATS).await.ok()?;
            let info = stream.info().await.ok()?;
            info.cluster.as_ref()?.leader.as_ref().map(|_| ())
        }
    })
    .await;
    let mut by_chat = stored_by_leader(&js).await;
    let mut total = 0;
    for chat in &chats {
        let stored = by_chat.remove(chat).unwrap_or_default();
        let want: HashSet<EventId> = acked.get(chat).into_iter().flatten().copied().collect();
        let seqs: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "gap in {chat}"
        );
        let got: HashSet<EventId> = stored.iter().map(|(_, id)| *id).collect();
        assert_eq!(got.len(), stored.len(), "an event stored twice in {chat}");
        let missing: Vec<&EventId> = want.difference(&got).collect();
        let extra: Vec<&EventId> = got.difference(&want).collect();
        assert!(
            missing.is_empty(),
            "acknowledged appends missing in {chat}: {missing:?}; stored but not acked: \
             {extra:?}; acked {} stored {}",
            want.len(),
            got.len()
        );
        // Every stored event was acknowledged to some writer (a lost ack was retried).
        assert_eq!(
            got, want,
            "stored events that no writer saw acknowledged in {chat}"
        );
        total += stored.len();
    }
    eprintln!(
        "cluster: {total} appends stored and acknowledged, {} retries across the failover, \
         longest wait for one ack {} ms",
        retries.load(Ordering::Relaxed),
        longest_ms.load(Ordering::Relaxed)
    );
    assert!(
        by_chat.is_empty(),
        "events of chats no writer used: {by_chat:?}"
    );
    assert!(total >= APPENDS);
}
