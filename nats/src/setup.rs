//! Stream and bucket definitions, created or updated idempotently at start-up (`parley streams`).

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use crate::streams;

/// Subject builders. Every token comes from a typed, validated id, never from user text.
pub mod subjects {
    use parley_schemas::{ChatId, UserId};

    pub fn chat(id: ChatId) -> String {
        format!("chats.{id}")
    }
    pub fn user(id: UserId) -> String {
        format!("users.{id}")
    }
    pub fn receipts(id: ChatId) -> String {
        format!("receipts.{id}")
    }
    /// Where JetStream republishes each stored chat event for live delivery.
    pub fn live_chat(id: ChatId) -> String {
        format!("live.chats.{id}")
    }
    /// Core NATS: membership changes for one user.
    pub fn notify_user(id: UserId) -> String {
        format!("{NOTIFY_USER_PREFIX}{id}")
    }
    /// Every user's membership changes: each gateway holds this one subscription and routes
    /// notices to the user's connections there, rather than one subscription per socket.
    pub const NOTIFY_USERS: &str = "notify.user.*";
    /// The prefix of [`notify_user`] before the user id.
    pub const NOTIFY_USER_PREFIX: &str = "notify.user.";
    /// Core NATS: a device was removed; gateways close its sockets.
    pub const DEVICE_REVOKED: &str = "notify.devices.revoked";
    /// Core NATS: a chat's typing indicators (never stored).
    pub fn typing(id: ChatId) -> String {
        format!("typing.{id}")
    }
    /// Core NATS: a member's delivered/read watermark moved (the receipts projector announces
    /// it after its commit; gateways fan it out to the chat's other members on this gateway).
    pub fn live_receipts(id: ChatId) -> String {
        format!("live.receipts.{id}")
    }
    /// Every heartbeat written to the `presence` bucket: a KV put is an ordinary publish on
    /// `$KV.presence.<user_id>`, so a plain subscription sees it (no KV watch needed).
    pub const PRESENCE_HEARTBEATS: &str = "$KV.presence.>";
    /// The prefix of [`PRESENCE_HEARTBEATS`] before the user id.
    pub const PRESENCE_PREFIX: &str = "$KV.presence.";
}

/// Retention and safety settings of the streams (`PARLEY_*_MAX_AGE`, …).
#[derive(Debug, Clone)]
pub struct JetStreamSettings {
    pub chats_max_age: Duration,
    pub users_max_age: Duration,
    pub receipts_max_age: Duration,
    /// Window inside which JetStream drops a repeated `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// 1 on a single server, 3 on a cluster.
    pub replicas: usize,
    /// Age of the `presence` bucket's entries: a user with no heartbeat for this long is
    /// offline. Gateways heartbeat every third of it.
    pub presence_ttl: Duration,
}

impl Default for JetStreamSettings {
    fn default() -> Self {
        let days = |d: u64| Duration::from_secs(d * 24 * 3600);
        Self {
            chats_max_age: days(30),
            users_max_age: Duration::ZERO,
            receipts_max_age: days(30),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            presence_ttl: Duration::from_secs(60),
        }
    }
}

/// The KV buckets the services share.
#[derive(Clone)]
pub struct Buckets {
    /// handle → user_id; create-only writes reserve a handle before registration is appended.
    pub handles: kv::Store,
    /// user_id → argon2id PHC string. Kept out of the event streams on purpose.
    pub credentials: kv::Store,
    /// sha256(token) → {user_id, device_id}; deleting a key revokes the token everywhere.
    pub sessions: kv::Store,
    /// "<low user>_<high user>" → chat_id: one DM per pair.
    pub dms: kv::Store,
    /// "<aggregate>.<id>" → snapshot of the aggregate's state.
    pub snapshots: kv::Store,
    /// Idempotency records of `POST`s, kept 25 h.
    pub idempotency: kv::Store,
    /// user_id → latest heartbeat of an online user; entries expire after `presence_ttl`.
    pub presence: kv::Store,
    /// user_id → latest heartbeat, kept forever: `last_seen_at` once the user is offline.
    pub last_seen: kv::Store,
    /// The `presence` bucket's TTL (see [`JetStreamSettings::presence_ttl`]).
    pub presence_ttl: Duration,
    /// "<chat_id>.<message_id>" → the message's 256-bit body key; erased when the message is
    /// deleted (crypto-shredding, ADR 7).
    pub message_keys: kv::Store,
    /// attachment_id → uploaded bytes and their metadata (object store, chunked).
    pub attachments: crate::attachments::Attachments,
}

/// The JetStream context a Parley process publishes and reads through.
///
/// async-nats bounds the publishes whose ack is still pending at 5,000 per context, shared by
/// every publisher of the process (commands, sign-ups, key writes, receipt flushes). Its
/// default is to wait for a free permit, with no deadline; here a publish past the bound fails
/// at once (`MaxAckPending`: commands answer 503, background publishers retry), so overload
/// sheds load and a leak of permits is loud. The wait had turned one such leak (a receipt flush
/// that held more pending acks than the bound) into a silent stall of every command.
pub fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::context::ContextBuilder::new()
        .backpressure_on_inflight(false)
        .build(client)
}

/// The name a process's shared connection shows the server (`/connz`).
pub const CONNECTION_NAME: &str = "parley";

/// Connects to `url`, which may list several servers of a cluster separated by commas
/// (`nats://a:4222,nats://b:4222`); the client fails over between them.
pub async fn connect(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    connect_named(url, CONNECTION_NAME).await
}

/// As [`connect`], with the name the server shows for the connection.
pub async fn connect_named(
    url: &str,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let servers = url
        .split(',')
        .map(|s| s.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::ServerParse, e)
        })?;
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move { log_event(&event) })
        .connect(servers)
        .await
}

/// The connection's life in the log: without it a disconnect, a reconnect or a subscription
/// the server or client dropped messages of (a slow consumer) left no trace, and a stall of
/// every NATS-bound request could not be told from anything else.
fn log_event(event: &async_nats::Event) {
    match event {
        async_nats::Event::Connected => tracing::info!(%event, "nats"),
        _ => tracing::warn!(%event, "nats"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot create or update stream {name}: {source}")]
    Stream {
        name: &'static str,
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
    #[error("cannot create bucket {name}: {source}")]
    Bucket {
        name: &'static str,
        #[source]
        source: async_nats::jetstream::context::KeyValueError,
    },
    #[error("cannot open object store {name}: {cause}")]
    ObjectStore { name: &'static str, cause: String },
}

fn stream_config(
    name: &'static str,
    subject: &str,
    max_age: Duration,
    s: &JetStreamSettings,
) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{subject}.*")],
        storage: stream::StorageType::File,
        max_age,
        duplicate_window: s.duplicate_window,
        num_replicas: s.replicas,
        allow_direct: true,
        // Events are facts: nobody deletes single messages (deletion is crypto-shredding).
        deny_delete: true,
        max_message_size: 256 * 1024,
        ..Default::default()
    }
}

/// Creates or updates every stream and bucket. Safe to run any number of times, concurrently.
pub async fn ensure(js: &jetstream::Context, s: &JetStreamSettings) -> Result<Buckets, SetupError> {
    let mut chats = stream_config(streams::CHATS, "chats", s.chats_max_age, s);
    // Only stored events are republished, in stream order: the live feed of the gateways.
    chats.republish = Some(stream::Republish {
        source: "chats.*".into(),
        destination: "live.chats.{{wildcard(1)}}".into(),
        headers_only: false,
    });
    let defs = [
        chats,
        stream_config(streams::USERS, "users", s.users_max_age, s),
        stream_config(streams::RECEIPTS, "receipts", s.receipts_max_age, s),
    ];
    for (cfg, name) in defs
        .into_iter()
        .zip([streams::CHATS, streams::USERS, streams::RECEIPTS])
    {
        js.create_or_update_stream(cfg)
            .await
            .map_err(|source| SetupError::Stream { name, source })?;
    }
    // `erasable`: the bucket's messages may be erased one by one (message keys); every other
    // bucket denies deletes.
    let bucket = |name: &'static str, max_age: Duration, erasable: bool| async move {
        // async-nats's create_key_value first reads account info, which it cannot parse from a
        // 2.9 server; so the bucket's stream is declared here exactly as a KV bucket's stream.
        let cfg = stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            // Message keys keep their earlier revisions until they are erased
            // (`message_keys::KEY_HISTORY`); every other bucket keeps one.
            max_messages_per_subject: if erasable {
                crate::message_keys::KEY_HISTORY
            } else {
                1
            },
            max_age,
            storage: stream::StorageType::File,
            num_replicas: s.replicas,
            allow_rollup: true,
            deny_delete: !erasable,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        js.create_or_update_stream(cfg)
            .await
            .map_err(|source| SetupError::Stream { name, source })?;
        js.get_key_value(name)
            .await
            .map_err(|source| SetupError::Bucket { name, source })
    };
    // Same reason as for KV buckets: the object store's stream is declared by hand, exactly as
    // an object store bucket's stream. Chunks are whole messages of up to 128 KiB.
    let name = crate::attachments::BUCKET;
    js.create_or_update_stream(stream::Config {
        name: format!("OBJ_{name}"),
        subjects: vec![format!("$O.{name}.C.>"), format!("$O.{name}.M.>")],
        storage: stream::StorageType::File,
        num_replicas: s.replicas,
        allow_rollup: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|source| SetupError::Stream { name, source })?;
    let attachments = crate::attachments::Attachments::open(js)
        .await
        .map_err(|cause| SetupError::ObjectStore { name, cause })?;
    Ok(Buckets {
        attachments,
        handles: bucket("handles", Duration::ZERO, false).await?,
        credentials: bucket("credentials", Duration::ZERO, false).await?,
        sessions: bucket("sessions", Duration::ZERO, false).await?,
        dms: bucket("dms", Duration::ZERO, false).await?,
        snapshots: bucket("snapshots", Duration::ZERO, false).await?,
        idempotency: bucket("idempotency", Duration::from_secs(25 * 3600), false).await?,
        message_keys: bucket(crate::message_keys::BUCKET, Duration::ZERO, true).await?,
        // A zero TTL would mean "forever" to JetStream: nobody would ever go offline.
        presence: bucket(
            "presence",
            s.presence_ttl.max(Duration::from_secs(1)),
            false,
        )
        .await?,
        last_seen: bucket("last_seen", Duration::ZERO, false).await?,
        presence_ttl: s.presence_ttl.max(Duration::from_secs(1)),
    })
}
