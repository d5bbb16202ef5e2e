//! The event store against a private, real `nats-server`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use parley_nats::{AppendContext, EventStore, ExecuteError, JetStreamSettings, Outcome, streams};
use parley_schemas::cloudevent::{self, StoredEvent};
use parley_schemas::events::MessageSent;
use parley_schemas::{ChatEvent, ChatId, MessageId, UserId};
use parley_test_support::NatsServer;
use support::{Counter, stored};

fn message(sender: UserId, id: MessageId) -> ChatEvent {
    ChatEvent::MessageSent(MessageSent {
        message_id: id,
        sender_id: sender,
        body: "hi".into(),
        reply_to: None,
        attachments: vec![],
        thread_root: None,
        mentions: vec![],
    })
}

async fn setup(
    server: &NatsServer,
) -> (jetstream::Context, EventStore<Counter>, EventStore<Counter>) {
    let client = parley_nats::connect(&server.url()).await.unwrap();
    // The context every Parley process uses (`parley_nats::context`), bounds included.
    let js = parley_nats::context(client);
    let buckets = parley_nats::ensure(&js, &JetStreamSettings::default())
        .await
        .unwrap();
    // Two stores stand for two command-api processes: separate caches, one stream.
    let a = EventStore::new(
        js.clone(),
        buckets.snapshots.clone(),
        1000,
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let b = EventStore::new(
        js.clone(),
        buckets.snapshots,
        1000,
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    (js, a, b)
}

/// One message appended to `chat` through `store`.
async fn append_message(store: EventStore<Counter>, chat: ChatId, sender: UserId) -> Outcome {
    let id = MessageId::new();
    store
        .execute(
            *chat.as_uuid(),
            &AppendContext::new(sender),
            |_: &Counter| Ok::<_, ()>(vec![message(sender, id)]),
        )
        .await
        .unwrap()
}

async fn sequences(js: &jetstream::Context, chat: ChatId) -> Vec<u64> {
    stored(js, chat)
        .await
        .into_iter()
        .map(|(seq, _)| seq)
        .collect()
}

#[tokio::test]
async fn concurrent_appends_from_two_processes_give_contiguous_sequences_with_nothing_lost() {
    let server = NatsServer::start().await;
    let (js, a, b) = setup(&server).await;
    let chat = ChatId::new();
    let sender = UserId::new();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                let ctx = AppendContext::new(sender);
                let id = MessageId::new();
                store
                    .execute(*chat.as_uuid(), &ctx, |_: &Counter| {
                        Ok::<_, ()>(vec![message(sender, id)])
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seqs = sequences(&js, chat).await;
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
    let (count, version) = a
        .read(*chat.as_uuid(), |s, v| (s.messages, v))
        .await
        .unwrap();
    assert_eq!((count, version), (200, 200));
}

#[tokio::test]
async fn a_retried_append_with_the_same_msg_id_is_stored_once() {
    let server = NatsServer::start().await;
    let (js, a, b) = setup(&server).await;
    let chat = ChatId::new();
    let sender = UserId::new();
    let id = MessageId::new();
    let mut ctx = AppendContext::new(sender);
    ctx.msg_id = Some("idem-key-1".into());
    let first = a
        .execute(*chat.as_uuid(), &ctx, |_: &Counter| {
            Ok::<_, ()>(vec![message(sender, id)])
        })
        .await
        .unwrap();
    // The retry lands on another process whose cache knows nothing: still one event.
    let again = b
        .execute(*chat.as_uuid(), &ctx, |_: &Counter| {
            Ok::<_, ()>(vec![message(sender, id)])
        })
        .await
        .unwrap();
    assert_eq!(sequences(&js, chat).await, vec![1]);
    assert_eq!(first.appended[0].id, again.appended[0].id);
    assert_eq!(again.appended[0].sequence, 1);
}

#[tokio::test]
async fn a_rejected_decision_appends_nothing() {
    let server = NatsServer::start().await;
    let (js, a, _) = setup(&server).await;
    let chat = ChatId::new();
    let res = a
        .execute(
            *chat.as_uuid(),
            &AppendContext::new(UserId::new()),
            |_: &Counter| Err::<Vec<ChatEvent>, _>("no"),
        )
        .await;
    assert!(matches!(res, Err(ExecuteError::Rejected("no"))));
    assert!(sequences(&js, chat).await.is_empty());
}

#[tokio::test]
async fn a_cold_load_starts_from_the_snapshot_and_reads_only_newer_events() {
    let server = NatsServer::start().await;
    let (js, a, _) = setup(&server).await;
    let chat = ChatId::new();
    let sender = UserId::new();
    let append = |store: EventStore<Counter>| append_message(store, chat, sender);
    for _ in 0..30 {
        append(a.clone()).await;
    }
    a.flush_snapshots().await;
    append(a.clone()).await;
    // Purge the first 30 events: only the snapshot can now account for them.
    js.get_stream(streams::CHATS)
        .await
        .unwrap()
        .purge()
        .filter(format!("chats.{chat}"))
        .sequence(31)
        .await
        .unwrap();
    let kv = js.get_key_value("snapshots").await.unwrap();
    let fresh = EventStore::<Counter>::new(js.clone(), kv, 10, Duration::from_secs(3600))
        .await
        .unwrap();
    let (count, version) = fresh
        .read(*chat.as_uuid(), |s, v| (s.messages, v))
        .await
        .unwrap();
    assert_eq!((count, version), (31, 31));
}

#[tokio::test]
async fn a_long_tail_without_a_snapshot_is_read_whole_and_in_order() {
    let server = NatsServer::start().await;
    let (js, a, b) = setup(&server).await;
    let chat = ChatId::new();
    let sender = UserId::new();
    // Store `b` caches the chat at 1 event; `a` then appends 1,999 more, far past the direct
    // gets a catch-up starts with, and no snapshot covers them.
    let append = |store: EventStore<Counter>| append_message(store, chat, sender);
    append(b.clone()).await;
    for _ in 0..1999 {
        append(a.clone()).await;
    }
    // A warm store catches up the tail, and a cold one loads all of it.
    let warm = b
        .read(*chat.as_uuid(), |s, v| (s.messages, v))
        .await
        .unwrap();
    assert_eq!(warm, (2000, 2000));
    let kv = js.get_key_value("snapshots").await.unwrap();
    let cold = EventStore::<Counter>::new(js.clone(), kv, 10, Duration::from_secs(3600))
        .await
        .unwrap();
    let loaded = cold
        .read(*chat.as_uuid(), |s, v| (s.messages, v))
        .await
        .unwrap();
    assert_eq!(loaded, (2000, 2000));
    // And it appends at the right place: the next event is 2001, once.
    let out = append(cold.clone()).await;
    assert_eq!(out.appended[0].sequence, 2001);
    assert_eq!(out.conflicts, 0, "the load was complete");
}

#[tokio::test]
async fn stored_chat_events_are_republished_on_the_live_subject_in_order() {
    let server = NatsServer::start().await;
    let (_, a, _) = setup(&server).await;
    let chat = ChatId::new();
    let sender = UserId::new();
    let mut live = async_nats::connect(server.url())
        .await
        .unwrap()
        .subscribe(format!("live.chats.{chat}"))
        .await
        .unwrap();
    for _ in 0..3 {
        let id = MessageId::new();
        a.execute(
            *chat.as_uuid(),
            &AppendContext::new(sender),
            |_: &Counter| Ok::<_, ()>(vec![message(sender, id)]),
        )
        .await
        .unwrap();
    }
    for want in 1..=3u64 {
        let msg = tokio::time::timeout(Duration::from_secs(5), live.next())
            .await
            .expect("no republished event")
            .unwrap();
        let ev: StoredEvent<ChatEvent> = cloudevent::decode(&msg.payload).unwrap();
        assert_eq!(ev.meta.sequence, want);
    }
}

/// Publishes whose ack is pending are bounded per context (5,000, shared by the process).
/// Past the bound an append fails at once, and loudly, instead of waiting for a permit with no
/// deadline: that wait once stalled every command of a process with nothing in the log. Once
/// the pending acks are settled, appends work again.
#[tokio::test]
async fn an_append_past_the_pending_ack_bound_fails_at_once_and_works_once_acks_settle() {
    let server = NatsServer::start().await;
    let (js, store, _) = setup(&server).await;
    js.create_stream(jetstream::stream::Config {
        name: "HOLD".into(),
        subjects: vec!["hold.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    // Publish without awaiting the acks until the context refuses: every permit is held.
    let mut held = Vec::new();
    loop {
        let published =
            tokio::time::timeout(Duration::from_secs(5), js.publish("hold.x", "x".into()))
                .await
                .expect("a publish past the bound is refused at once, not held for a permit");
        match published {
            Ok(ack) => held.push(ack),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::MaxAckPending => break,
            Err(e) => panic!("unexpected publish error: {e}"),
        }
        assert!(
            held.len() <= 5_000,
            "the context bounds pending acks at 5,000"
        );
    }
    let (chat, sender) = (ChatId::new(), UserId::new());
    let send = || async {
        store
            .execute(
                *chat.as_uuid(),
                &AppendContext::new(sender),
                move |_: &Counter| Ok::<_, ()>(vec![message(sender, MessageId::new())]),
            )
            .await
    };
    let refused = tokio::time::timeout(Duration::from_secs(5), send())
        .await
        .expect("an append past the bound answers at once, not after a permit frees up");
    assert!(
        matches!(refused, Err(ExecuteError::Store(_))),
        "refused as a store error (503), got {refused:?}"
    );
    // Dropped, the pending acks are settled in the background (their acks are in already).
    drop(held);
    let outcome = parley_test_support::eventually_result(Duration::from_secs(10), send)
        .await
        .expect("appends work again once the pending acks are settled");
    assert_eq!(outcome.version, 1);
}

/// The log lines of the current thread's work, for a test that checks what a store reported.
#[derive(Clone, Default)]
struct Log(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A stream that stops answering part way through a long catch-up (the server frozen for
/// longer than the store waits on a stalled stream) costs the load one block of direct gets,
/// and then the rest is streamed again, not read one round trip per event: once a full
/// benchmark run saw a 1M-event tail stall for 2 s, and the rest, read event by event, took
/// longer than the client waited. The load is whole, in order, each event applied once.
#[tokio::test]
async fn a_catch_up_whose_stream_stalls_reads_a_block_by_direct_gets_then_streams_the_rest() {
    const EVENTS: u64 = 100_000;
    let server = NatsServer::start().await;
    let (js, _, _) = setup(&server).await;
    let chat = ChatId::new();
    parley_test_support::fill_chat(&js, &chat.to_string(), UserId::new(), 1..=EVENTS)
        .await
        .unwrap();
    let log = Log::default();
    let writer = log.clone();
    // The current-thread test runtime runs the store's catch-up on this thread.
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );
    let kv = js.get_key_value("snapshots").await.unwrap();
    let cold = EventStore::<Counter>::new(js.clone(), kv, 10, Duration::from_secs(3600))
        .await
        .unwrap();
    let watcher = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let read = cold.read(*chat.as_uuid(), |s, v| (s.messages, v));
    let stall = async {
        // Once the catch-up's ordered consumer exists, the tail is streaming: freeze the
        // server for longer than the 2 s the store waits for the stream's next event.
        parley_test_support::eventually(Duration::from_secs(30), "the catch-up's consumer", || {
            let watcher = watcher.clone();
            async move {
                let mut stream = watcher.get_stream(streams::CHATS).await.ok()?;
                let info = stream.info().await.ok()?;
                (info.state.consumer_count > 0).then_some(())
            }
        })
        .await;
        server.pause();
        tokio::time::sleep(Duration::from_secs(3)).await;
        server.resume();
    };
    let (loaded, ()) = tokio::join!(read, stall);
    assert_eq!(
        loaded.unwrap(),
        (EVENTS, EVENTS),
        "(events applied, version)"
    );
    let log = log.text();
    let failures = log.matches("streaming a long catch-up failed").count();
    assert_eq!(failures, 1, "one stall, one failure; the log:\n{log}");
    assert!(
        log.contains("a long catch-up streamed again after a failure and is complete"),
        "the rest was not streamed; the log:\n{log}"
    );
    assert!(!log.contains("not contiguous"), "the log:\n{log}");
    // And it appends at the right place: the next event is EVENTS + 1, once.
    let out = append_message(cold.clone(), chat, UserId::new()).await;
    assert_eq!(out.appended[0].sequence, EVENTS + 1);
    assert_eq!(out.conflicts, 0, "the load was complete");
}
