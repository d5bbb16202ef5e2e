//! Message keys against a real nats-server: the pool hands out only keys the bucket already
//! holds, a block of them at a time, and refills itself; destroying a key in a block keeps the
//! block's other keys and leaves the destroyed one nowhere in the store; keys of their own and
//! under the pre-pool name are still read and destroyed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::TryStreamExt;
use parley_nats::message_keys::{open, seal};
use parley_nats::{JetStreamSettings, KeyPool, MessageKeys};
use parley_schemas::events::KeyPlace;
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

/// Whether the bucket itself (not a cache) holds a key of its own for `message`.
async fn in_bucket(bucket: &kv::Store, message: MessageId) -> bool {
    bucket
        .get(MessageKeys::kv_key(message))
        .await
        .unwrap()
        .is_some()
}

/// The 32 bytes of `message`'s key as its block in the bucket holds them now (zero once
/// destroyed), or `None` if the bucket holds no block for it.
async fn slot_in_bucket(bucket: &kv::Store, message: MessageId) -> Option<Vec<u8>> {
    let block = bucket
        .get(MessageKeys::block_kv_key(message))
        .await
        .unwrap()?;
    assert_eq!(block.len(), 64 * 32, "a block holds 64 keys");
    Some(block[slot_of(message)].to_vec())
}

/// Where `message`'s key lies in its block: the slot its id's low 6 bits name.
fn slot_of(message: MessageId) -> std::ops::Range<usize> {
    let slot = (message.as_uuid().as_u128() & 63) as usize;
    slot * 32..(slot + 1) * 32
}

/// Messages whose sealed bodies say their keys are their own.
fn own(messages: &[(ChatId, MessageId)]) -> Vec<(ChatId, MessageId, Option<KeyPlace>)> {
    messages.iter().map(|&(c, m)| (c, m, None)).collect()
}

/// A key taken from the pool: waits (with a deadline) for the filler to have one ready.
async fn take(pool: &KeyPool, chat: ChatId) -> MessageId {
    eventually(Duration::from_secs(10), "a pooled key", || async {
        pool.take(chat).await
    })
    .await
}

#[tokio::test]
async fn pooled_keys_are_stored_a_block_at_a_time_before_they_are_handed_out_and_open_for_every_reader()
 {
    let server = NatsServer::start().await;
    let (js, bucket) = setup(&server).await;
    let shutdown = CancellationToken::new();
    let keys = MessageKeys::new(bucket.clone(), js.clone());
    let pool = KeyPool::start(keys.clone(), 8, &shutdown);
    let chat = ChatId::new();

    // More than a block and more than the pool holds at once: it refills while keys are taken.
    let mut taken = Vec::new();
    for _ in 0..150 {
        let message = take(&pool, chat).await;
        // Stored before it was handed out: read the bucket itself, not a cache.
        let slot = slot_in_bucket(&bucket, message).await;
        assert!(
            slot.is_some_and(|k| k.iter().any(|b| *b != 0)),
            "pooled key of {message} is not in its block"
        );
        assert!(!in_bucket(&bucket, message).await, "no entry of its own");
        taken.push(message);
    }
    let distinct: std::collections::HashSet<_> = taken.iter().collect();
    assert_eq!(distinct.len(), taken.len(), "a message id handed out twice");
    // One stored message per block, not per key: 150 keys are 3 blocks, plus what the filler
    // stored ahead (up to two blocks in flight, one being handed out).
    let names: Vec<String> = bucket.keys().await.unwrap().try_collect().await.unwrap();
    assert!(
        (3..=6).contains(&names.len()) && names.iter().all(|n| n.starts_with("b.")),
        "blocks in the bucket: {names:?}"
    );
    let blocks: std::collections::HashSet<_> = taken
        .iter()
        .map(|m| MessageKeys::block_kv_key(*m))
        .collect();
    assert!(blocks.len() >= 3 && blocks.iter().all(|b| names.contains(b)));

    // The sender seals with the key this process holds (no round trip), and the body says its
    // key is in a block; another process, with an empty cache, reads the block by the message
    // id alone and opens the body.
    let message = taken[70];
    let sealing = keys.create(chat, message).await.unwrap();
    let sealed = seal(&sealing, chat, message, "hello from the pool");
    assert_eq!(sealed.key, Some(KeyPlace::Block));
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

/// `n` keys taken from a fresh pool (one block's worth or less: the same block), each with a
/// body sealed under it.
async fn pooled_messages(
    keys: &MessageKeys,
    n: usize,
) -> (
    Vec<(ChatId, MessageId)>,
    Vec<parley_schemas::events::SealedBody>,
) {
    let shutdown = CancellationToken::new();
    let pool = KeyPool::start(keys.clone(), 64, &shutdown);
    let (mut messages, mut sealed) = (Vec::new(), Vec::new());
    for i in 0..n {
        let chat = ChatId::new();
        let message = take(&pool, chat).await;
        let key = keys.create(chat, message).await.unwrap();
        sealed.push(seal(&key, chat, message, &format!("body {i}")));
        messages.push((chat, message));
    }
    shutdown.cancel();
    (messages, sealed)
}

/// Whether `needle` occurs in any file under `dir`: what the server's store holds on disk.
fn in_store(dir: &std::path::Path, needle: &[u8]) -> bool {
    let mut found = false;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found |= in_store(&path, needle);
        } else if let Ok(bytes) = std::fs::read(&path) {
            found |= bytes.windows(needle.len()).any(|w| w == needle);
        }
    }
    found
}

/// Waits (with a deadline) until `bytes` are in the server's store files, or gone from them.
async fn until_on_disk(server: &NatsServer, bytes: &[u8], present: bool, what: &str) {
    eventually(Duration::from_secs(10), what, || async {
        (in_store(server.store(), bytes) == present).then_some(())
    })
    .await;
}

#[tokio::test]
async fn destroying_a_key_in_a_block_keeps_the_others_and_leaves_it_nowhere_in_the_store() {
    let server = NatsServer::start().await;
    let (js, bucket) = setup(&server).await;
    let keys = MessageKeys::new(bucket.clone(), js.clone());
    let (messages, sealed) = pooled_messages(&keys, 3).await;
    let (gone, kept) = (messages[1], messages[2]);
    assert_eq!(
        MessageKeys::block_kv_key(gone.1),
        MessageKeys::block_kv_key(kept.1),
        "one block"
    );
    let gone_key = slot_in_bucket(&bucket, gone.1).await.unwrap();
    let kept_key = slot_in_bucket(&bucket, kept.1).await.unwrap();
    // The block reached the store's files, so "not found" below means overwritten.
    until_on_disk(&server, &gone_key, true, "the block on disk").await;

    keys.destroy(gone.0, gone.1).await.unwrap();

    assert_eq!(slot_in_bucket(&bucket, gone.1).await, Some(vec![0u8; 32]));
    assert_eq!(
        slot_in_bucket(&bucket, kept.1).await.as_ref(),
        Some(&kept_key)
    );
    let reader = MessageKeys::new(bucket.clone(), js.clone());
    assert_bodies_open(&reader, &messages, &sealed, &[1]).await;
    // The block revision that held the key was erased, not just superseded: its bytes are in
    // no file of the store, while the kept key (in the block's new revision) still is.
    until_on_disk(
        &server,
        &gone_key,
        false,
        "the destroyed key erased on disk",
    )
    .await;
    assert!(in_store(server.store(), &kept_key));
    // Destroying again is a no-op.
    MessageKeys::new(bucket.clone(), js.clone())
        .destroy(gone.0, gone.1)
        .await
        .unwrap();
    assert_bodies_open(&reader, &messages, &sealed, &[1]).await;
}

#[tokio::test]
async fn concurrent_deletions_in_one_block_each_keep_the_others_keys_gone() {
    let server = NatsServer::start().await;
    let (js, bucket) = setup(&server).await;
    let keys = MessageKeys::new(bucket.clone(), js.clone());
    let (messages, sealed) = pooled_messages(&keys, 12).await;
    // Six deletions at once, each from a process of its own: every rewrite of the block
    // races the others.
    let deleted = [0usize, 2, 4, 6, 8, 10];
    let destroys = deleted.map(|i| {
        let keys = MessageKeys::new(bucket.clone(), js.clone());
        let (chat, message) = messages[i];
        async move { keys.destroy(chat, message).await }
    });
    for result in futures::future::join_all(destroys).await {
        result.unwrap();
    }
    let reader = MessageKeys::new(bucket.clone(), js.clone());
    assert_bodies_open(&reader, &messages, &sealed, &deleted).await;
    // And the block is down to its one latest revision.
    let subject = format!(
        "$KV.message_keys.{}",
        MessageKeys::block_kv_key(messages[0].1)
    );
    let stream = js.get_stream("KV_message_keys").await.unwrap();
    let first = stream
        .get_first_raw_message_by_subject(&subject, 0)
        .await
        .unwrap();
    let last = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    assert_eq!(first.sequence, last.sequence, "earlier revisions erased");
}

#[tokio::test]
async fn a_crash_between_rewriting_a_block_and_erasing_its_old_revision_is_mended_by_the_next_destroy()
 {
    let server = NatsServer::start().await;
    let (js, bucket) = setup(&server).await;
    let keys = MessageKeys::new(bucket.clone(), js.clone());
    let (messages, sealed) = pooled_messages(&keys, 2).await;
    let (chat, message) = messages[0];
    let name = MessageKeys::block_kv_key(message);
    let destroyed = slot_in_bucket(&bucket, message).await.unwrap();
    until_on_disk(&server, &destroyed, true, "the block on disk").await;
    // What a destroy that died after its rewrite left: the slot zeroed in a new revision, the
    // old revision (with the key) still stored.
    let entry = bucket.entry(name.as_str()).await.unwrap().unwrap();
    let mut value = entry.value.to_vec();
    value[slot_of(message)].fill(0);
    bucket
        .update(name.as_str(), value.into(), entry.revision)
        .await
        .unwrap();
    assert!(
        in_store(server.store(), &destroyed),
        "the old revision is still there"
    );

    // The projector's destroy of the same message (the slot is already zero) erases it.
    MessageKeys::new(bucket.clone(), js.clone())
        .destroy(chat, message)
        .await
        .unwrap();
    until_on_disk(&server, &destroyed, false, "the old revision erased").await;
    let reader = MessageKeys::new(bucket, js);
    assert_bodies_open(&reader, &messages, &sealed, &[0]).await;
}

#[tokio::test]
async fn a_batch_reads_each_key_block_once_and_keys_of_their_own_still_scan() {
    let server = NatsServer::start().await;
    let (js, bucket) = setup(&server).await;
    let writer = MessageKeys::new(bucket.clone(), js.clone());
    let (messages, sealed) = pooled_messages(&writer, 100).await;
    let in_blocks: Vec<_> = messages
        .iter()
        .map(|&(c, m)| (c, m, Some(KeyPlace::Block)))
        .collect();
    let reader = MessageKeys::new(bucket.clone(), js.clone());
    assert_eq!(
        reader.prefetch(&in_blocks[..3]).await,
        3,
        "a few: their block"
    );
    assert_eq!(
        reader.prefetch(&in_blocks).await,
        in_blocks
            .iter()
            .filter(|(_, m, _)| MessageKeys::block_kv_key(*m)
                != MessageKeys::block_kv_key(messages[0].1))
            .count(),
        "the rest: the blocks not read yet"
    );
    assert_eq!(reader.prefetch(&in_blocks).await, 0, "all cached");
    assert_bodies_open(&reader, &messages, &sealed, &[]).await;
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
    destroyed: &[usize],
) {
    for (i, ((chat, message), sealed)) in messages.iter().zip(sealed).enumerate() {
        let key = reader.get(*chat, *message).await.unwrap();
        if destroyed.contains(&i) {
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
        reader.prefetch(&own(&messages[1..20])).await,
        0,
        "too few to scan"
    );
    assert_eq!(
        reader.prefetch(&own(&messages)).await,
        99,
        "all but the destroyed"
    );
    assert_eq!(
        reader.prefetch(&own(&messages)).await,
        0,
        "the scan filled the cache: nothing left to read"
    );
    assert_bodies_open(&reader, &messages, &sealed, &[0]).await;
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
    assert_eq!(reader.prefetch(&own(&messages)).await, 1);
    assert_bodies_open(&reader, &messages, &sealed, &[]).await;
}
