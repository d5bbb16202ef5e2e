//! Message keys, for crypto-shredding (ADR 7): every message body in `CHATS` is sealed with
//! XChaCha20-Poly1305 under a random 256-bit key of its own, kept in the `message_keys` KV
//! bucket: in a slot of a key block `b.<block_id>` (64 keys in one entry, the message id names
//! the block and the slot), or in an entry of its own at `m.<message_id>` (keys made before
//! the pool existed: `<chat_id>.<message_id>`). Deleting a message destroys its key by
//! *erasing* the KV message that holds it in place (a block is first rewritten without the
//! key), after which no replay of the stream can open the body again.
//!
//! A key must be durable before the event that needs it, which put a KV round trip in front
//! of every append. [`KeyPool`] takes it off the send path: it stores keys a block at a time,
//! each for a fresh message id, so sendMessage takes the id of a stored key and appends at once.

use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex as StdMutex;

use async_nats::jetstream::{self, kv, response::Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use futures::StreamExt;
use parley_schemas::events::{KeyPlace, SealedBody};
use parley_schemas::{ChatEvent, ChatId, MessageId};
use rand::RngCore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
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

/// Keys in one block. The ids of a block's messages share all but their low 6 bits, which are
/// the slot: the id alone finds the key, for an edit or a deletion, which know nothing else.
pub const BLOCK_SLOTS: usize = 64;

/// A block's value: its keys, slot by slot; a destroyed key is 32 zero bytes.
const BLOCK_BYTES: usize = BLOCK_SLOTS * KEY_BYTES;

const KEY_BYTES: usize = 32;

/// Block writes a pool keeps in flight while it refills: two blocks are 128 keys.
const BLOCKS_IN_FLIGHT: usize = 2;

/// Revisions the bucket keeps of a key (JetStream KV's most). A block is rewritten once per
/// key destroyed in it and every earlier revision erased right after, so it holds more than
/// one only between the two, or after a crash there; the server never has to drop one by
/// itself, which would unlink the old block without overwriting it.
pub const KEY_HISTORY: i64 = 64;

/// A message's 256-bit key and where it is kept. Zeroed in memory when dropped; never logged.
pub struct MessageKey {
    bytes: [u8; KEY_BYTES],
    place: Option<KeyPlace>,
}

impl MessageKey {
    fn random() -> Self {
        let mut bytes = [0u8; KEY_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        Self { bytes, place: None }
    }

    fn from_slice(b: &[u8], place: Option<KeyPlace>) -> Option<Self> {
        let bytes = <[u8; KEY_BYTES]>::try_from(b).ok()?;
        Some(Self { bytes, place })
    }
}

impl Drop for MessageKey {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

/// The block a message id names (the id with its slot bits cleared) and its slot there. Every
/// id names one; only the ids a pool minted from a block have a key in it.
fn block_of(message: MessageId) -> (Uuid, usize) {
    let id = message.as_uuid().as_u128();
    let slot_bits = BLOCK_SLOTS as u128 - 1;
    (Uuid::from_u128(id & !slot_bits), (id & slot_bits) as usize)
}

/// The message id of `slot` in `block`.
fn message_in(block: Uuid, slot: usize) -> MessageId {
    MessageId::from_uuid(Uuid::from_u128(block.as_u128() | slot as u128))
}

/// The KV key of a block.
fn block_name(block: Uuid) -> String {
    format!("b.{block}")
}

/// Where a slot's key lies in its block's value.
fn slot_bytes(slot: usize) -> std::ops::Range<usize> {
    slot * KEY_BYTES..(slot + 1) * KEY_BYTES
}

/// A slot of 32 zero bytes holds no key: destroyed (a random key is all zero with a chance of
/// 2^-256, and the pool leaves such a one unused).
fn is_destroyed(key: &[u8]) -> bool {
    key.iter().all(|b| *b == 0)
}

/// The keys of one block, by slot: `None` where destroyed (everywhere, for a block that does
/// not exist).
struct Block(Vec<Option<Arc<MessageKey>>>);

impl Block {
    fn parse(name: &str, value: Option<&[u8]>) -> Self {
        let Some(value) = value else {
            return Self((0..BLOCK_SLOTS).map(|_| None).collect());
        };
        if value.len() != BLOCK_BYTES {
            tracing::warn!(%name, len = value.len(), "a message key block of the wrong size");
            return Self::parse(name, None);
        }
        Self(
            value
                .chunks_exact(KEY_BYTES)
                .map(|k| {
                    let key = MessageKey::from_slice(k, Some(KeyPlace::Block));
                    key.filter(|_| !is_destroyed(k)).map(Arc::new)
                })
                .collect(),
        )
    }
}

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageKey(***, {:?})", self.place)
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
    let cipher = XChaCha20Poly1305::new(Key::from_slice(&key.bytes));
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
        key: key.place,
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
    let cipher = XChaCha20Poly1305::new(Key::from_slice(&key.bytes));
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

/// The message keys, with small in-memory caches of keys that exist. Cheap to clone.
///
/// Only present keys are cached, for a few minutes; a process that sees a `message_deleted`
/// event calls [`MessageKeys::forget`], and everything that sees it after reads the bucket.
#[derive(Clone)]
pub struct MessageKeys {
    kv: kv::Store,
    js: jetstream::Context,
    /// Keys by message and place: a message can have both a block slot and an entry of its own
    /// (a command retried by another process, which found no block key in its cache).
    cache: moka::future::Cache<(ChatId, MessageId, Option<KeyPlace>), Arc<MessageKey>>,
    /// Blocks read whole, by block id: one read opens the bodies of up to 64 messages.
    blocks: moka::future::Cache<Uuid, Arc<Block>>,
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
            // 2 KiB a block: 4,096 blocks are 8 MiB and a quarter of a million keys.
            blocks: moka::future::Cache::builder()
                .max_capacity(4_096)
                .time_to_live(Duration::from_secs(300))
                .build(),
        }
    }

    /// The KV key of a message's own key: the message id alone (a validated id), so that a key
    /// can be made before anyone knows which chat its message will go to.
    pub fn kv_key(message: MessageId) -> String {
        format!("m.{message}")
    }

    /// The KV key of the block `message`'s id names (whether or not it exists).
    pub fn block_kv_key(message: MessageId) -> String {
        block_name(block_of(message).0)
    }

    /// Where keys made before [`KeyPool`] live; still read and destroyed.
    fn legacy_kv_key(chat: ChatId, message: MessageId) -> String {
        format!("{chat}.{message}")
    }

    /// Makes the message's key, create-only, in an entry of its own; a key this process already
    /// holds for it (a pooled one, or a retried command's) is used as it is. The message id is
    /// minted per command, so a retried command finds its own key and seals with it again.
    pub async fn create(
        &self,
        chat: ChatId,
        message: MessageId,
    ) -> Result<Arc<MessageKey>, KeyError> {
        for place in [Some(KeyPlace::Block), None] {
            if let Some(k) = self.cache.get(&(chat, message, place)).await {
                return Ok(k);
            }
        }
        match self.store_new(message).await? {
            Some(key) => {
                self.cache.insert((chat, message, None), key.clone()).await;
                Ok(key)
            }
            None => self
                .get_own(chat, message)
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

    /// Stores a new random key for `message` in an entry of its own, create-only: `None` if it
    /// already has one.
    async fn store_new(&self, message: MessageId) -> Result<Option<Arc<MessageKey>>, KeyError> {
        let key = MessageKey::random();
        match self
            .kv
            .create(
                Self::kv_key(message).as_str(),
                Bytes::copy_from_slice(&key.bytes),
            )
            .await
        {
            Ok(_) => Ok(Some(Arc::new(key))),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(nats_err(e)),
        }
    }

    /// Stores a block of 64 new random keys, create-only, for the ids of a fresh block: `None`
    /// if that block id is taken (a fresh UUIDv7 never is).
    async fn store_block(&self) -> Result<Option<Vec<Pooled>>, KeyError> {
        let (block, _) = block_of(MessageId::new());
        let mut value = vec![0u8; BLOCK_BYTES];
        rand::rng().fill_bytes(&mut value);
        let name = block_name(block);
        // Read as any reader reads it, so a slot that would read as destroyed is not handed out.
        let keys = Block::parse(&name, Some(&value));
        let pooled: Vec<Pooled> = (keys.0.iter().enumerate())
            .filter_map(|(slot, key)| Some((message_in(block, slot), key.clone()?)))
            .collect();
        let stored = self.kv.create(name.as_str(), Bytes::from(value)).await;
        match stored {
            Ok(_) => {
                // Readers in this process (the projectors and the gateway of `parley up`) find
                // the block's keys without reading it back.
                self.blocks.insert(block, Arc::new(keys)).await;
                Ok(Some(pooled))
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(nats_err(e)),
        }
    }

    /// The message's key, or `None` once destroyed (or if it never had one), wherever it is
    /// kept: the block its id names first, then an entry of its own. For edits, which know
    /// only the message id; a reader of a sealed body knows the place ([`Self::open_event`]).
    pub async fn get(
        &self,
        chat: ChatId,
        message: MessageId,
    ) -> Result<Option<Arc<MessageKey>>, KeyError> {
        match self.get_in_block(message).await? {
            Some(key) => Ok(Some(key)),
            None => self.get_own(chat, message).await,
        }
    }

    /// The key in the slot of the block `message`'s id names, reading the whole block once.
    async fn get_in_block(&self, message: MessageId) -> Result<Option<Arc<MessageKey>>, KeyError> {
        let (block, slot) = block_of(message);
        let read = self.block(block).await?;
        Ok(read.0.get(slot).cloned().flatten())
    }

    /// A block, from the cache or read once (concurrent callers share the read).
    async fn block(&self, block: Uuid) -> Result<Arc<Block>, KeyError> {
        self.blocks
            .try_get_with(block, self.read_block(block))
            .await
            .map_err(|e| (*e).clone())
    }

    /// A block as stored; an empty one if there is none (the id was not minted from a block).
    async fn read_block(&self, block: Uuid) -> Result<Arc<Block>, KeyError> {
        let name = block_name(block);
        let value = self.kv.get(name.as_str()).await.map_err(nats_err)?;
        Ok(Arc::new(Block::parse(&name, value.as_deref())))
    }

    /// The message's key in an entry of its own (or under the legacy name).
    async fn get_own(
        &self,
        chat: ChatId,
        message: MessageId,
    ) -> Result<Option<Arc<MessageKey>>, KeyError> {
        if let Some(k) = self.cache.get(&(chat, message, None)).await {
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
        let Some(key) = stored.and_then(|b| MessageKey::from_slice(&b, None)) else {
            return Ok(None);
        };
        let key = Arc::new(key);
        self.cache.insert((chat, message, None), key.clone()).await;
        Ok(Some(key))
    }
    /// Reads the keys of many messages (`wanted`: chat, message, and where its sealed body
    /// says the key is kept) into this process's caches, ahead of opening their bodies one by
    /// one: for a projector batch, where key reads one by one were the slowest stage
    /// (`docs/benchmarks.md`, "Session 11"). Returns how many keys it loaded. Keys in blocks
    /// are read a block at a time, every block the batch needs at once. Keys of their own are
    /// read with one scan of the bucket's stream, for a backlog of at least
    /// [`BULK_READ_MIN`]; a key the scan does not find (destroyed, stored under the legacy
    /// name, or written out of the scanned order) is left for the reads one by one, and any
    /// failure only means the keys are read one by one as before.
    ///
    /// Keys of their own are written in about the order of their message ids (UUIDv7, minted
    /// just before the key is stored) and the messages reach the stream in about that order
    /// too, so a backlog's keys lie close together: the scan starts at the stored revision of
    /// the batch's oldest id and stops once every key is found, after twice as many messages
    /// as it wants (plus a margin), or at the end of the bucket.
    pub async fn prefetch(&self, wanted: &[(ChatId, MessageId, Option<KeyPlace>)]) -> usize {
        let mut blocks: std::collections::HashMap<Uuid, Vec<usize>> =
            std::collections::HashMap::new();
        let mut missing = std::collections::HashMap::with_capacity(wanted.len());
        for &(chat, message, place) in wanted {
            match place {
                Some(KeyPlace::Block) => {
                    let (block, slot) = block_of(message);
                    if !self.blocks.contains_key(&block) {
                        blocks.entry(block).or_default().push(slot);
                    }
                }
                None => {
                    if !self.cache.contains_key(&(chat, message, None)) {
                        missing.insert(message, chat);
                    }
                }
            }
        }
        // Every block at once; a failure is left for the reads one by one.
        let reads = blocks.into_iter().map(|(block, slots)| async move {
            match self.block(block).await {
                Ok(read) => slots.iter().filter(|&&s| read.0[s].is_some()).count(),
                Err(_) => 0,
            }
        });
        let found: usize = futures::future::join_all(reads).await.into_iter().sum();
        if missing.len() < BULK_READ_MIN {
            return found;
        }
        let want = missing.len();
        let started = std::time::Instant::now();
        match tokio::time::timeout(BULK_READ_DEADLINE, self.scan(&mut missing)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "bulk read of message keys failed"),
            Err(_) => tracing::warn!(want, "bulk read of message keys timed out"),
        }
        let scanned = want - missing.len();
        tracing::debug!(want, found = scanned, elapsed = ?started.elapsed(), "message keys read in bulk");
        found + scanned
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
                    && let Some(key) = MessageKey::from_slice(&message.payload, None)
                {
                    missing.remove(&id);
                    self.cache.insert((chat, id, None), Arc::new(key)).await;
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

    /// Drops a message's keys from this process's caches (its message was deleted), with the
    /// block it names, which is read again when next needed.
    pub async fn forget(&self, chat: ChatId, message: MessageId) {
        for place in [Some(KeyPlace::Block), None] {
            self.cache.invalidate(&(chat, message, place)).await;
        }
        self.blocks.invalidate(&block_of(message).0).await;
    }

    /// Destroys the message's key for good, wherever it is kept: a block is rewritten without
    /// it and every earlier revision of the block erased; an entry of its own is erased.
    /// Erasing overwrites the stored record (JetStream's secure delete; a plain delete or purge
    /// would only unlink it). Idempotent: a key already gone is success, so the command-api and
    /// the projector can both do it, in any order, any number of times, and a crash between
    /// the rewrite and the erasure is mended by the next call.
    pub async fn destroy(&self, chat: ChatId, message: MessageId) -> Result<(), KeyError> {
        self.forget(chat, message).await;
        self.destroy_in_block(message).await?;
        self.erase(&Self::kv_key(message)).await?;
        self.erase(&Self::legacy_kv_key(chat, message)).await
    }

    /// Zeroes the message's slot in the block its id names (compare-and-set on the block's
    /// revision, so concurrent deletions in one block each keep the other's), then erases the
    /// block's earlier revisions, which still hold the key. No block: nothing to do.
    async fn destroy_in_block(&self, message: MessageId) -> Result<(), KeyError> {
        let (block, slot) = block_of(message);
        let (name, slot) = (block_name(block), slot_bytes(slot));
        // The revision that holds the block without the key, once there is one.
        let mut zeroed = None;
        for _ in 0..16 {
            let Some(entry) = self.kv.entry(name.as_str()).await.map_err(nats_err)? else {
                return Ok(());
            };
            let mut value = entry.value.to_vec();
            if value.len() != BLOCK_BYTES {
                return Err(KeyError::NotDestroyed(format!(
                    "{name} is {} bytes, not a key block",
                    value.len()
                )));
            }
            if is_destroyed(&value[slot.clone()]) {
                value.zeroize();
                zeroed = Some(entry.revision);
                break;
            }
            value[slot.clone()].zeroize();
            match self
                .kv
                .update(name.as_str(), Bytes::from(value), entry.revision)
                .await
            {
                Ok(revision) => {
                    zeroed = Some(revision);
                    break;
                }
                // Another deletion in this block got there first: read it again.
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(nats_err(e)),
            }
        }
        let Some(zeroed) = zeroed else {
            return Err(KeyError::NotDestroyed(format!(
                "{name} kept changing while a key in it was destroyed"
            )));
        };
        self.erase_revisions_before(&name, zeroed).await
    }

    /// Erases every stored revision of the KV key `name` older than `revision`, one without
    /// the destroyed key: those still hold it. (A later revision, a concurrent deletion's, erases
    /// `revision` itself.) The bucket keeps [`KEY_HISTORY`] revisions a key, so that the server
    /// never drops an old block revision by itself, which would unlink it without overwriting
    /// it.
    async fn erase_revisions_before(&self, name: &str, revision: u64) -> Result<(), KeyError> {
        let subject = format!("{}{name}", self.kv.prefix);
        for _ in 0..=KEY_HISTORY {
            let oldest = self
                .kv
                .stream
                .get_first_raw_message_by_subject(&subject, 0)
                .await
                .map_err(nats_err)?
                .sequence;
            if oldest >= revision {
                return Ok(());
            }
            self.erase_sequence(oldest, name).await?;
        }
        Err(KeyError::NotDestroyed(format!(
            "{name} still has earlier revisions"
        )))
    }

    /// Erases the KV key `name` in place; a name that holds nothing is success.
    async fn erase(&self, name: &str) -> Result<(), KeyError> {
        for _ in 0..3 {
            let Some(entry) = self.kv.entry(name).await.map_err(nats_err)? else {
                return Ok(());
            };
            self.erase_sequence(entry.revision, name).await?;
        }
        match self.kv.entry(name).await.map_err(nats_err)? {
            None => Ok(()),
            Some(e) => Err(KeyError::NotDestroyed(format!(
                "{name} still at revision {}",
                e.revision
            ))),
        }
    }

    /// Erases one stored message of the bucket (`name` is for the log). A failure from the
    /// server (someone else erased it first) is left for the caller's next look.
    async fn erase_sequence(&self, sequence: u64, name: &str) -> Result<(), KeyError> {
        let stream = format!("KV_{BUCKET}");
        let res: Response<serde_json::Value> = self
            .js
            .request(
                format!("STREAM.MSG.DELETE.{stream}"),
                &serde_json::json!({"seq": sequence, "no_erase": false}),
            )
            .await
            .map_err(nats_err)?;
        if let Response::Err { error } = res {
            tracing::debug!(%name, sequence, %error, "erase of a message key failed");
        }
        Ok(())
    }

    /// The plaintext of the sealed body `event` carries (a v2 message or an edit): `None` when
    /// it carries none, or when it can no longer be read (the message was deleted). The body
    /// says where its key is kept, so a key of its own costs no block read and the other way.
    pub async fn open_event(
        &self,
        chat: ChatId,
        event: &ChatEvent,
    ) -> Result<Option<String>, KeyError> {
        let (Some(sealed), Some(message)) = (event.sealed_body(), event.message_id()) else {
            return Ok(None);
        };
        let key = match sealed.key {
            Some(KeyPlace::Block) => self.get_in_block(message).await?,
            None => self.get_own(chat, message).await?,
        };
        let Some(key) = key else {
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
/// A background task keeps up to `size` keys ready, storing them a block of [`BLOCK_SLOTS`] at
/// a time ([`BLOCKS_IN_FLIGHT`] writes in flight): one stored message per 64 sends instead of
/// one per send. A key enters the pool only once the bucket has acknowledged its block, so a
/// message sealed with a pooled key can always be opened. A key taken and never used (the
/// command was then refused, or the process stopped with keys still pooled) stays in its block
/// unread: 32 bytes, at most `size` plus two blocks per process start, plus one per refused
/// command of a member (strangers are refused before a key is taken).
#[derive(Clone)]
pub struct KeyPool {
    keys: MessageKeys,
    ready: Arc<StdMutex<mpsc::Receiver<Pooled>>>,
}

/// A fresh message id and its key, already in the bucket.
type Pooled = (MessageId, Arc<MessageKey>);

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
        let place = key.place;
        self.keys.cache.insert((chat, message, place), key).await;
        Some(message)
    }
}

/// Stores blocks of keys for fresh message ids and hands each key over once its block is
/// stored, until nobody takes them.
async fn fill(keys: MessageKeys, tx: mpsc::Sender<Pooled>) {
    let made = futures::stream::repeat(()).map(|()| {
        let keys = keys.clone();
        async move { keys.store_block().await }
    });
    let mut made = std::pin::pin!(made.buffer_unordered(BLOCKS_IN_FLIGHT));
    while let Some(stored) = made.next().await {
        match stored {
            Ok(Some(block)) => {
                for pooled in block {
                    if tx.send(pooled).await.is_err() {
                        return;
                    }
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
