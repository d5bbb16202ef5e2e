//! Message keys against a real nats-server: the pool hands out only keys the bucket already
//! holds, refills itself, and keys stored under the pre-pool name are still read and destroyed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::TryStreamExt;
use parley_nats::message_keys::{open, seal};
use parley_nats::{JetStreamSettings, KeyPool, MessageKeys};
use parley_schemas::{ChatId, MessageId};
use parley_test_support::{NatsServer, eventually};
use tokio_util::sync::CancellationToken;

async fn setup(server: &NatsServer) -> (jetstream::Context, kv::Store) {
    let client = parley_nats::connect(&server.url()).await.unwrap();
    let js = jetstream::new(client);
    let buckets = parley_nats::ensure(&js, &JetStreamSettings::default())
        .await
        .unwrap();
    (js, buckets.message_keys)
}

/// Whether the bucket itself (not a cache) holds a key for `message` under its name.
async fn in_bucket(bucket: &kv::Store, message: MessageId) -> bool {
    bucket
        .get(MessageKeys::kv_key(message))
        .await
        .unwrap()
        .is_some()
}

/// A key taken from the pool: waits (with a deadline) for the filler to have one ready.
async fn take(pool: &KeyPool, chat: ChatId) -> MessageId {
    eventually(Duration::from_secs(10), "a pooled key", || async {
        pool.take(chat).await
    })
    .await
}

#[tokio::test]
async fn a_pooled_key_is_in_the_bucket_before_it_is_handed_out_and_opens_for_every_reader() {
    let server = NatsServer::start().await;
    let (js, bucket) = setup(&server).await;
    let shutdown = CancellationToken::new();
    let keys = MessageKeys::new(bucket.clone(), js.clone());
    let pool = KeyPool::start(keys.clone(), 8, &shutdown);
    let chat = ChatId::new();

    // More than the pool holds at once: it refills while keys are taken.
    let mut taken = Vec::new();
    for _ in 0..40 {
        let message = take(&pool, chat).await;
        // Stored before it was handed out: read the bucket itself, not a cache.
        assert!(
            in_bucket(&bucket, message).await,
            "pooled key of {message} is not in the bucket"
        );
        taken.push(message);
    }
    let distinct: std::collections::HashSet<_> = taken.iter().collect();
    assert_eq!(distinct.len(), taken.len(), "a message id handed out twice");

    // The sender seals with the key this process holds (no round trip); another process,
    // with an empty cache, reads the same key from the bucket and opens the body.
    let message = taken[0];
    let sealing = keys.create(chat, message).await.unwrap();
    let sealed = seal(&sealing, chat, message, "hello from the pool");
    let reader = MessageKeys::new(bucket.clone(), js.clone());
    let read = reader.get(chat, message).await.unwrap().expect("key found");
    assert_eq!(
        open(&read, chat, message, &sealed).as_deref(),
        Some("hello from the pool")
    );

    // Deleting the message destroys the pooled key like any other.
    reader.destroy(chat, message).await.unwrap();
    assert!(
        MessageKeys::new(bucket, js)
            .get(chat, message)
            .await
            .unwrap()
            .is_none()
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_pool_of_size_zero_hands_out_nothing_and_sends_make_their_own_keys() {
    let server = NatsServer::start().await;
    let (js, bucket) = setup(&server).await;
    let shutdown = CancellationToken::new();
    let keys = MessageKeys::new(bucket.clone(), js.clone());
    let pool = KeyPool::start(keys.clone(), 0, &shutdown);
    let chat = ChatId::new();
    assert_eq!(pool.take(chat).await, None);
    let message = MessageId::new();
    keys.create(chat, message).await.unwrap();
    assert!(in_bucket(&bucket, message).await);
    // Nothing was stored ahead of need: the bucket holds that one key.
    let names: Vec<String> = bucket.keys().await.unwrap().try_collect().await.unwrap();
    assert_eq!(names, vec![MessageKeys::kv_key(message)]);
}

#[tokio::test]
async fn a_key_stored_under_the_pre_pool_name_is_still_read_kept_for_edits_and_destroyed() {
    let server = NatsServer::start().await;
    let (js, bucket) = setup(&server).await;
    let (chat, message) = (ChatId::new(), MessageId::new());
    let legacy = format!("{chat}.{message}");
    bucket
        .create(legacy.as_str(), bytes::Bytes::from(vec![7u8; 32]))
        .await
        .unwrap();

    let keys = MessageKeys::new(bucket.clone(), js.clone());
    let key = keys.get(chat, message).await.unwrap().expect("legacy key");
    let sealed = seal(&key, chat, message, "old message");
    // An edit seals under the key the original has, not a new one.
    let fresh = MessageKeys::new(bucket.clone(), js.clone());
    let for_edit = fresh.get_or_create(chat, message).await.unwrap();
    assert_eq!(
        open(&for_edit, chat, message, &sealed).as_deref(),
        Some("old message")
    );
    assert!(
        !in_bucket(&bucket, message).await,
        "no second key made for a message that has one"
    );

    fresh.destroy(chat, message).await.unwrap();
    assert!(bucket.get(legacy.as_str()).await.unwrap().is_none());
    assert!(
        MessageKeys::new(bucket, js)
            .get(chat, message)
            .await
            .unwrap()
            .is_none()
    );
}

/// Opens every sealed body with the keys `reader` gets (its cache, else the bucket); the
/// message at `destroyed` must have no key.
async fn assert_bodies_open(
    reader: &MessageKeys,
    messages: &[(ChatId, MessageId)],
    sealed: &[parley_schemas::events::SealedBody],
    destroyed: Option<usize>,
) {
    for (i, ((chat, message), sealed)) in messages.iter().zip(sealed).enumerate() {
        let key = reader.get(*chat, *message).await.unwrap();
        if Some(i) == destroyed {
            assert!(key.is_none(), "message {i}: its key was destroyed");
        } else {
            let key = key.unwrap_or_else(|| panic!("message {i}: no key"));
            assert_eq!(
                open(&key, *chat, *message, sealed),
                Some(format!("body {i}")),
                "message {i}"
            );
        }
    }
}

#[tokio::test]
async fn a_backlog_of_keys_is_read_in_one_scan_and_a_small_batch_is_not_scanned() {
    let server = NatsServer::start().await;
    let (js, bucket) = setup(&server).await;
    let writer = MessageKeys::new(bucket.clone(), js.clone());
    let chat = ChatId::new();
    // 100 messages' keys, in the order their ids were minted, with keys of other messages
    // (other chats, pooled keys never used) between them.
    let (mut messages, mut sealed) = (Vec::new(), Vec::new());
    for i in 0..100 {
        let message = MessageId::new();
        let key = writer.create(chat, message).await.unwrap();
        sealed.push(seal(&key, chat, message, &format!("body {i}")));
        messages.push((chat, message));
        if i % 10 == 0 {
            writer
                .create(ChatId::new(), MessageId::new())
                .await
                .unwrap();
        }
    }
    // The oldest message is deleted: the scan starts at the next one's key.
    writer.destroy(chat, messages[0].1).await.unwrap();

    let reader = MessageKeys::new(bucket.clone(), js.clone());
    assert_eq!(
        reader.prefetch(&messages[1..20]).await,
        0,
        "too few to scan"
    );
    assert_eq!(
        reader.prefetch(&messages).await,
        99,
        "all but the destroyed"
    );
    assert_eq!(
        reader.prefetch(&messages).await,
        0,
        "the scan filled the cache: nothing left to read"
    );
    assert_bodies_open(&reader, &messages, &sealed, Some(0)).await;
}

#[tokio::test]
async fn keys_stored_out_of_id_order_are_still_read_one_by_one() {
    let server = NatsServer::start().await;
    let (js, bucket) = setup(&server).await;
    let writer = MessageKeys::new(bucket.clone(), js.clone());
    let chat = ChatId::new();
    let messages: Vec<(ChatId, MessageId)> = (0..40).map(|_| (chat, MessageId::new())).collect();
    // Stored newest first: the oldest id's key is the last in the bucket, so a scan from it
    // finds that one key alone.
    let mut sealed = Vec::new();
    for (i, (chat, message)) in messages.iter().enumerate().rev() {
        let key = writer.create(*chat, *message).await.unwrap();
        sealed.push((i, seal(&key, *chat, *message, &format!("body {i}"))));
    }
    sealed.sort_by_key(|(i, _)| *i);
    let sealed: Vec<_> = sealed.into_iter().map(|(_, s)| s).collect();

    let reader = MessageKeys::new(bucket.clone(), js.clone());
    assert_eq!(reader.prefetch(&messages).await, 1);
    assert_bodies_open(&reader, &messages, &sealed, None).await;
}
