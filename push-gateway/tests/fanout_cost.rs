//! Measures the two ways live chat events can reach one gateway serving N members of a channel
//! (docs/delivery.md, "Channel fan-out"), over a real nats-server:
//!
//! - per chat (what `hub.rs` does): the gateway holds one subscription on `live.chats.<id>`; one
//!   NATS message per event, copied in memory to the N local connections;
//! - per member: one `notify.user.<id>` message per member per event, N subscriptions.
//!
//! The small run below always runs and checks that both deliver everything, and that per chat
//! moves N times fewer NATS messages. The figures in docs/delivery.md come from the ignored
//! run: `cargo test -p parley-push-gateway --release --test fanout_cost -- --ignored --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use parley_test_support::NatsServer;
use tokio::sync::mpsc;

/// About the size of a rendered `newMessage` frame with a short body.
const PAYLOAD: usize = 512;
const DEADLINE: Duration = Duration::from_secs(120);

struct Run {
    /// NATS messages the gateway received.
    nats_messages: u64,
    /// Frames handed to local connections.
    frames: u64,
    elapsed: Duration,
}

async fn per_chat(url: &str, members: usize, events: usize) -> Run {
    let gateway = async_nats::connect(url).await.unwrap();
    let publisher = async_nats::connect(url).await.unwrap();
    let mut sub = gateway.subscribe("live.chats.bench").await.unwrap();
    gateway.flush().await.unwrap();
    // One bounded queue per connection, as the gateway keeps; large enough to never drop here.
    let (txs, mut rxs): (Vec<_>, Vec<_>) = (0..members)
        .map(|_| mpsc::channel::<Arc<Bytes>>(events))
        .unzip();
    let start = Instant::now();
    let receiver = tokio::spawn(async move {
        let (mut nats_messages, mut frames) = (0u64, 0u64);
        while nats_messages < events as u64 {
            let msg = sub.next().await.expect("subscription open");
            nats_messages += 1;
            let frame = Arc::new(msg.payload);
            for tx in &txs {
                tx.try_send(Arc::clone(&frame)).expect("queue has room");
                frames += 1;
            }
        }
        (nats_messages, frames)
    });
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    for _ in 0..events {
        publisher
            .publish("live.chats.bench", payload.clone())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let (nats_messages, frames) = tokio::time::timeout(DEADLINE, receiver)
        .await
        .expect("per-chat delivery within the deadline")
        .unwrap();
    let elapsed = start.elapsed();
    for rx in &mut rxs {
        assert_eq!(rx.len(), events, "every connection got every event");
    }
    Run {
        nats_messages,
        frames,
        elapsed,
    }
}

async fn per_member(url: &str, members: usize, events: usize) -> Run {
    let gateway = async_nats::connect(url).await.unwrap();
    let publisher = async_nats::connect(url).await.unwrap();
    let mut subs = Vec::with_capacity(members);
    for i in 0..members {
        subs.push(gateway.subscribe(format!("notify.user.{i}")).await.unwrap());
    }
    gateway.flush().await.unwrap();
    let mut all = futures::stream::select_all(subs);
    let total = (members * events) as u64;
    let start = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut n = 0u64;
        while n < total {
            all.next().await.expect("subscriptions open");
            n += 1;
        }
        n
    });
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    for _ in 0..events {
        for i in 0..members {
            publisher
                .publish(format!("notify.user.{i}"), payload.clone())
                .await
                .unwrap();
        }
        // Core NATS has no flow control: an unflushed burst of members × events messages to a
        // reader that a busy machine starves can make the server cut it off as a slow consumer,
        // and what it drops never arrives (this once hung a CI run). One round trip per event.
        publisher.flush().await.unwrap();
    }
    publisher.flush().await.unwrap();
    let received = tokio::time::timeout(DEADLINE, receiver)
        .await
        .expect("per-member delivery within the deadline")
        .unwrap();
    Run {
        nats_messages: received,
        frames: received,
        elapsed: start.elapsed(),
    }
}

async fn compare(members: usize, events: usize) -> (Run, Run) {
    let nats = NatsServer::start().await;
    let chat = per_chat(&nats.url(), members, events).await;
    let member = per_member(&nats.url(), members, events).await;
    eprintln!(
        "members={members:>6} events={events}: per chat {:>7} NATS msgs {:>9.1} ms | per member {:>8} NATS msgs {:>9.1} ms",
        chat.nats_messages,
        chat.elapsed.as_secs_f64() * 1e3,
        member.nats_messages,
        member.elapsed.as_secs_f64() * 1e3,
    );
    (chat, member)
}

// Two threads: the readers keep draining while the publisher sends (as in a gateway process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_chat_subscription_delivers_everything_with_one_nats_message_per_event() {
    let (members, events) = (200, 20);
    let (chat, member) = compare(members, events).await;
    assert_eq!(chat.nats_messages, events as u64);
    assert_eq!(chat.frames, (members * events) as u64);
    assert_eq!(member.nats_messages, (members * events) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run on demand with --release --ignored --nocapture"]
async fn measure_channel_fan_out_per_chat_against_per_member() {
    for members in [100, 1_000, 10_000] {
        compare(members, 20).await;
    }
    // A full channel: per member would be 100,000 NATS messages per event (and as many
    // subscriptions), far past the deadline; per chat is still one message per event.
    let nats = NatsServer::start().await;
    let chat = per_chat(&nats.url(), 100_000, 20).await;
    eprintln!(
        "members=100000 events=20: per chat {:>7} NATS msgs {:>9.1} ms",
        chat.nats_messages,
        chat.elapsed.as_secs_f64() * 1e3
    );
}
