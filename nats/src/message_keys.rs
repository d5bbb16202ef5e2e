//! Message keys, for crypto-shredding (ADR 7): every message body in `CHATS` is sealed with
//! XChaCha20-Poly1305 under a random 256-bit key of its own, kept in the `message_keys` KV
//! bucket at `m.<message_id>` (keys made before the pool existed: `<chat_id>.<message_id>`).
//! Deleting a message destroys its key by *erasing* the KV message in place, after which no
//! replay of the stream can open the body again.
//!
//! A key must be durable before the event that needs it, which put a KV round trip in front
//! of every append. [`KeyPool`] takes it off the send path: it keeps keys for fresh message
//! ids already stored, so sendMessage mints the id of a pooled key and appends at once.

use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex as StdMutex;

use async_nats::jetstream::{self, kv, response::Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use futures::StreamExt;
use parley_schemas::events::SealedBody;
use parley_schemas::{ChatEvent, ChatId, MessageId};
use rand::RngCore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroize;

/// The KV bucket of message keys.
pub const BUCKET: &str = "message_keys";

/// Fewer missing keys than this are read one by one ([`MessageKeys::prefetch`] does nothing):
/// live traffic's small batches, where a scan's consumer would cost more than it saves.
pub const BULK_READ_MIN: usize = 32;

/// The most messages one [`MessageKeys::prefetch`] scan reads.
const BULK_READ_MAX: usize = 4_096;

/// How long one [`MessageKeys::prefetch`] may take before its batch falls back to reads one
/// by one.
const BULK_READ_DEADLINE: Duration = Duration::from_secs(5);

/// The one algorithm `SealedBody::alg` names.
pub const ALG: &str = "xchacha20poly1305";

/// A message's 256-bit key. Zeroed in memory when dropped; never logged.
pub struct MessageKey([u8; 32]);

impl MessageKey {
    fn random() -> Self {
        let mut k = [0u8; 32];
        rand::rng().fill_bytes(&mut k);
        Self(k)
    }

    fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(b).ok().map(Self)
    }
}

impl Drop for MessageKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKey(***)")
    }
}

/// The associated data binds a sealed body to its chat and message: a ciphertext copied into
/// another message's event does not open there.
fn aad(chat: ChatId, message: MessageId) -> Vec<u8> {
    format!("parley/{chat}/{message}").into_bytes()
}

/// Seals `plaintext` under `key` with a fresh random 192-bit nonce (random nonces are safe at
/// that size, whatever the number of edits).
pub fn seal(key: &MessageKey, chat: ChatId, message: MessageId, plaintext: &str) -> SealedBody {
    let cipher = XChaCha20Poly1305::new(Key::from_slice(&key.0));
    let mut nonce = [0u8; 24];
    rand::rng().fill_bytes(&mut nonce);
    let aad = aad(chat, message);
    // Encryption fails only for plaintexts beyond 256 GiB; bodies are at most 16 KB.
    let ciphertext = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext.as_bytes(),
                aad: &aad,
            },
        )
        .unwrap_or_default();
    SealedBody {
        alg: ALG.to_owned(),
        nonce: STANDARD.encode(nonce),
        ciphertext: STANDARD.encode(ciphertext),
    }
}

/// Opens a sealed body; `None` if it does not open under this key for this chat and message
/// (tampered, moved, or an unknown algorithm).
pub fn open(
    key: &MessageKey,
    chat: ChatId,
    message: MessageId,
    sealed: &SealedBody,
) -> Option<String> {
    if sealed.alg != ALG {
        return None;
    }
    let nonce = STANDARD.decode(&sealed.nonce).ok()?;
    if nonce.len() != 24 {
        return None;
    }
    let ciphertext = STANDARD.decode(&sealed.ciphertext).ok()?;
    let cipher = XChaCha20Poly1305::new(Key::from_slice(&key.0));
    let aad = aad(chat, message);
    let plain = cipher
        .decrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &ciphertext,
                aad: &aad,
            },
        )
        .ok()?;
    String::from_utf8(plain).ok()
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    #[error("message key store unavailable: {0}")]
    Nats(String),
    #[error("message key could not be destroyed: {0}")]
    NotDestroyed(String),
}

fn nats_err(e: impl std::fmt::Display) -> KeyError {
    KeyError::Nats(e.to_string())
}

/// The message keys, with a small in-memory cache of keys that exist. Cheap to clone.
///
/// Only present keys are cached, for a few minutes; a process that sees a `message_deleted`
/// event calls [`MessageKeys::forget`], and everything that sees it after reads the bucket.
#[derive(Clone)]
pub struct MessageKeys {
    kv: kv::Store,
    js: jetstream::Context,
    cache: moka::future::Cache<(ChatId, MessageId), Arc<MessageKey>>,
}

impl MessageKeys {
    pub fn new(kv: kv::Store, js: jetstream::Context) -> Self {
        Self {
            kv,
            js,
            cache: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
        }
    }

    /// The KV key of a message's key: the message id alone (a validated id), so that a key can
    /// be made before anyone knows which chat its message will go to ([`KeyPool`]).
    pub fn kv_key(message: MessageId) -> String {
        format!("m.{message}")
    }

    /// Where keys made before [`KeyPool`] live; still read and destroyed.
    fn legacy_kv_key(chat: ChatId, message: MessageId) -> String {
        format!("{chat}.{message}")
    }

    /// Makes the message's key, create-only; a key this process already holds for it (a pooled
    /// one, or a retried command's) is used as it is. The message id is minted per command,
    /// so a retried command finds its own key and seals with it again.
    pub async fn create(
        &self,
        chat: ChatId,
        message: MessageId,
    ) -> Result<Arc<MessageKey>, KeyError> {
        if let Some(k) = self.cache.get(&(chat, message)).await {
            return Ok(k);
        }
        match self.store_new(message).await? {
            Some(key) => {
                self.cache.insert((chat, message), key.clone()).await;
                Ok(key)
            }
            None => self
                .get(chat, message)
                .await?
                .ok_or_else(|| KeyError::Nats("message key vanished while being created".into())),
        }
    }

    /// The message's key if it has one (a v1 plaintext message may not), else a new one: for
    /// edits, which must seal under the key the original body has.
    pub async fn get_or_create(
        &self,
        chat: ChatId,
        message: MessageId,
    ) -> Result<Arc<MessageKey>, KeyError> {
        match self.get(chat, message).await? {
            Some(key) => Ok(key),
            None => self.create(chat, message).await,
        }
    }

    /// Stores a new random key for `message`, create-only: `None` if it already has one.
    async fn store_new(&self, message: MessageId) -> Result<Option<Arc<MessageKey>>, KeyError> {
        let key = MessageKey::random();
        match self
            .kv
            .create(
                Self::kv_key(message).as_str(),
                bytes::Bytes::copy_from_slice(&key.0),
            )
            .await
        {
            Ok(_) => Ok(Some(Arc::new(key))),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(nats_err(e)),
        }
    }

    /// The message's key, or `None` once destroyed.
    pub async fn get(
        &self,
        chat: ChatId,
        message: MessageId,
    ) -> Result<Option<Arc<MessageKey>>, KeyError> {
        if let Some(k) = self.cache.get(&(chat, message)).await {
            return Ok(Some(k));
        }
        let mut stored = self.kv.get(Self::kv_key(message)).await.map_err(nats_err)?;
        if stored.is_none() {
            stored = self
                .kv
                .get(Self::legacy_kv_key(chat, message))
                .await
                .map_err(nats_err)?;
        }
        let Some(key) = stored.and_then(|b| MessageKey::from_slice(&b)) else {
            return Ok(None);
        };
        let key = Arc::new(key);
        self.cache.insert((chat, message), key.clone()).await;
        Ok(Some(key))
    }

    /// Reads the keys of many messages with one scan of the bucket's stream instead of one
    /// request per key, into this process's cache: for a projector batch of a backlog, where
    /// key reads one by one were the slowest stage (`docs/benchmarks.md`, "Session 11").
    /// Returns how many keys it loaded; a key it did not find (destroyed, stored under the
    /// legacy name, or written out of the scanned order) is left for [`Self::get`], and any
    /// failure only means the keys are read one by one as before.
    ///
    /// Keys are written in about the order of their message ids (UUIDv7, minted just before
    /// the key is stored, by the pool or the send itself) and the messages reach the stream
    /// in about that order too, so a backlog's keys lie close together: the scan starts at
    /// the stored revision of the batch's oldest id and stops once every key is found, after
    /// twice as many messages as it wants (plus a margin), or at the end of the bucket.
    pub async fn prefetch(&self, wanted: &[(ChatId, MessageId)]) -> usize {
        let mut missing = std::collections::HashMap::with_capacity(wanted.len());
        for &(chat, message) in wanted {
            if !self.cache.contains_key(&(chat, message)) {
                missing.insert(message, chat);
            }
        }
        if missing.len() < BULK_READ_MIN {
            return 0;
        }
        let want = missing.len();
        let started = std::time::Instant::now();
        match tokio::time::timeout(BULK_READ_DEADLINE, self.scan(&mut missing)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "bulk read of message keys failed"),
            Err(_) => tracing::warn!(want, "bulk read of message keys timed out"),
        }
        let found = want - missing.len();
        tracing::debug!(want, found, elapsed = ?started.elapsed(), "message keys read in bulk");
        found
    }

    /// The scan behind [`Self::prefetch`]: an ephemeral pull consumer on the bucket's stream,
    /// no acks, from the revision of the oldest missing key; every key found goes to the cache
    /// and leaves `missing`.
    async fn scan(
        &self,
        missing: &mut std::collections::HashMap<MessageId, ChatId>,
    ) -> Result<(), KeyError> {
        let mut oldest: Vec<MessageId> = missing.keys().copied().collect();
        oldest.sort_unstable_by_key(|m| *m.as_uuid());
        // The oldest few, in case the very oldest has no key under its name (destroyed, legacy).
        let mut start = None;
        for message in oldest.iter().take(4) {
            if let Some(entry) = self
                .kv
                .entry(Self::kv_key(*message))
                .await
                .map_err(nats_err)?
            {
                start = Some(entry.revision);
                break;
            }
        }
        let Some(start_sequence) = start else {
            return Ok(());
        };
        let consumer = self
            .kv
            .stream
            .create_consumer(jetstream::consumer::pull::Config {
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence,
                },
                // No filter, though the scan only wants `m.*`: nats-server 2.9 counts a
                // filtered consumer's pending messages over the rest of the stream when it
                // creates it (measured: 33–48 ms on a 50k-key bucket, against under 1 ms
                // unfiltered), and the bucket holds little besides (legacy names, skipped).
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(nats_err)?;
        // Pulled in pieces the size of what is still missing: the server sends a whole pull
        // request's messages whether or not the scan still wants them.
        let name_prefix = format!("{}m.", self.kv.prefix);
        let mut budget = (missing.len() * 2 + 64).min(BULK_READ_MAX);
        while !missing.is_empty() && budget > 0 {
            let asked = (missing.len() + 32).min(budget);
            budget -= asked;
            let mut messages = consumer
                .fetch()
                .max_messages(asked)
                .messages()
                .await
                .map_err(nats_err)?;
            let mut got = 0;
            while let Some(message) = messages.next().await {
                let message = message.map_err(nats_err)?;
                got += 1;
                let Some(id) = message
                    .subject
                    .as_str()
                    .strip_prefix(name_prefix.as_str())
                    .and_then(|id| MessageId::parse(id).ok())
                else {
                    continue;
                };
                if let Some(&chat) = missing.get(&id)
                    && let Some(key) = MessageKey::from_slice(&message.payload)
                {
                    missing.remove(&id);
                    self.cache.insert((chat, id), Arc::new(key)).await;
                }
            }
            if got < asked {
                break; // the end of the bucket
            }
        }
        // Not awaited: the batch need not wait for the clean-up, and the server drops an idle
        // ephemeral consumer by itself anyway.
        let stream = self.kv.stream.clone();
        let name = consumer.cached_info().name.clone();
        tokio::spawn(async move {
            if let Err(error) = stream.delete_consumer(&name).await {
                tracing::debug!(%error, "deleting a key-scan consumer failed");
            }
        });
        Ok(())
    }

    /// Drops a key from this process's cache (its message was deleted).
    pub async fn forget(&self, chat: ChatId, message: MessageId) {
        self.cache.invalidate(&(chat, message)).await;
    }

    /// Destroys the message's key for good: its KV message is erased in place (JetStream's
    /// secure delete overwrites the stored record; a plain delete or purge would only unlink
    /// it). Idempotent: a key already gone is success, so the command-api and the projector
    /// can both do it, in any order, any number of times.
    pub async fn destroy(&self, chat: ChatId, message: MessageId) -> Result<(), KeyError> {
        self.forget(chat, message).await;
        self.erase(&Self::kv_key(message)).await?;
        self.erase(&Self::legacy_kv_key(chat, message)).await
    }

    /// Erases the KV key `name` in place; a name that holds nothing is success.
    async fn erase(&self, name: &str) -> Result<(), KeyError> {
        let stream = format!("KV_{BUCKET}");
        for _ in 0..3 {
            let Some(entry) = self.kv.entry(name).await.map_err(nats_err)? else {
                return Ok(());
            };
            let res: Response<serde_json::Value> = self
                .js
                .request(
                    format!("STREAM.MSG.DELETE.{stream}"),
                    &serde_json::json!({"seq": entry.revision, "no_erase": false}),
                )
                .await
                .map_err(nats_err)?;
            if let Response::Err { error } = res {
                // Someone else erased it first, or it was rolled over: look again.
                tracing::debug!(%name, %error, "erase of a message key failed");
            }
        }
        match self.kv.entry(name).await.map_err(nats_err)? {
            None => Ok(()),
            Some(e) => Err(KeyError::NotDestroyed(format!(
                "{name} still at revision {}",
                e.revision
            ))),
        }
    }

    /// The plaintext of the sealed body `event` carries (a v2 message or an edit): `None` when
    /// it carries none, or when it can no longer be read (the message was deleted).
    pub async fn open_event(
        &self,
        chat: ChatId,
        event: &ChatEvent,
    ) -> Result<Option<String>, KeyError> {
        let (Some(sealed), Some(message)) = (event.sealed_body(), event.message_id()) else {
            return Ok(None);
        };
        let Some(key) = self.get(chat, message).await? else {
            return Ok(None);
        };
        let opened = open(&key, chat, message, sealed);
        if opened.is_none() {
            tracing::warn!(%chat, %message, "a sealed body does not open under its message key");
        }
        Ok(opened)
    }
}

/// Keys stored ahead of need, each for a fresh message id, so that sendMessage does not wait
/// for a KV write before its append. Cheap to clone.
///
/// A background task keeps up to `size` keys ready, `PIPELINE` writes in flight; a key enters
/// the pool only once the bucket has acknowledged it, so a message sealed with a pooled key can
/// always be opened. A key taken and never used (the command was then refused, or the process
/// stopped with keys still pooled) stays in the bucket unread: 32 bytes, at most `size` per
/// process start plus one per refused command of a member (strangers are refused before a key
/// is taken).
#[derive(Clone)]
pub struct KeyPool {
    keys: MessageKeys,
    ready: Arc<StdMutex<mpsc::Receiver<Pooled>>>,
}

/// A fresh message id and its key, already in the bucket.
type Pooled = (MessageId, Arc<MessageKey>);

/// Key writes a pool keeps in flight while it refills.
const PIPELINE: usize = 32;

impl KeyPool {
    /// Starts filling a pool of `size` keys (0: no pool, every command writes its own key);
    /// the filler stops with `shutdown`.
    pub fn start(keys: MessageKeys, size: usize, shutdown: &CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(size.max(1));
        if size > 0 {
            let (keys, shutdown) = (keys.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = fill(keys, tx) => {}
                    () = shutdown.cancelled() => {}
                }
            });
        }
        Self {
            keys,
            ready: Arc::new(StdMutex::new(rx)),
        }
    }

    /// A fresh message id whose key is already stored, now held by this process for `chat`
    /// ([`MessageKeys::create`] finds it without a round trip); `None` when the pool is empty.
    pub async fn take(&self, chat: ChatId) -> Option<MessageId> {
        let (message, key) = self.ready.lock().ok()?.try_recv().ok()?;
        self.keys.cache.insert((chat, message), key).await;
        Some(message)
    }
}

/// Stores keys for fresh message ids and hands each over once stored, until nobody takes them.
async fn fill(keys: MessageKeys, tx: mpsc::Sender<Pooled>) {
    let made = futures::stream::repeat(()).map(|()| {
        let keys = keys.clone();
        async move {
            let message = MessageId::new();
            (message, keys.store_new(message).await)
        }
    });
    let mut made = std::pin::pin!(made.buffer_unordered(PIPELINE));
    while let Some((message, stored)) = made.next().await {
        match stored {
            Ok(Some(key)) => {
                if tx.send((message, key)).await.is_err() {
                    return;
                }
            }
            // A fresh UUIDv7 is never taken; if it were, skipping it is all it takes.
            Ok(None) => {}
            Err(error) => {
                // Commands make their own keys meanwhile; try again shortly.
                tracing::warn!(%error, "refilling the message key pool failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_body_opens_only_with_its_key_chat_and_message() {
        let key = MessageKey::random();
        let (chat, msg) = (ChatId::new(), MessageId::new());
        let sealed = seal(&key, chat, msg, "hello, Bob");
        assert_eq!(
            open(&key, chat, msg, &sealed).as_deref(),
            Some("hello, Bob")
        );
        assert!(!sealed.ciphertext.contains("hello"));
        assert_eq!(open(&MessageKey::random(), chat, msg, &sealed), None);
        assert_eq!(open(&key, ChatId::new(), msg, &sealed), None);
        assert_eq!(open(&key, chat, MessageId::new(), &sealed), None);
        let mut tampered = sealed.clone();
        tampered.ciphertext = STANDARD.encode(b"not the ciphertext at all, no");
        assert_eq!(open(&key, chat, msg, &tampered), None);
    }

    #[test]
    fn sealing_twice_uses_fresh_nonces() {
        let key = MessageKey::random();
        let (chat, msg) = (ChatId::new(), MessageId::new());
        assert_ne!(
            seal(&key, chat, msg, "x").nonce,
            seal(&key, chat, msg, "x").nonce
        );
    }
}
