//! The command-api's shared state: one `Arc`, so that axum's clone per request (every
//! `State` and `FromRef` extraction) is one reference count, not a clone of every NATS handle.

use std::ops::Deref;
use std::sync::Arc;

use parley_nats::{Buckets, EventStore, KeyPool, MessageKeys};
use parley_platform::{Authenticator, Infra};

use crate::CommandConfig;
use crate::domain::{chat::Chat, user::User};
use crate::error::ApiError;
use crate::limits::Limits;
use crate::passwords::Passwords;

/// The name of the aggregates' NATS connection, as the server shows it (`/connz`).
pub const APPENDS_CONNECTION: &str = "parley-appends";

/// Cheap to clone: one reference count (measured: cloning and dropping the handles themselves
/// per request took a fifth of `parley up`'s CPU under `send-throughput`).
#[derive(Clone)]
pub struct CommandState(Arc<Shared>);

/// What every handler shares.
pub struct Shared {
    /// Chat aggregates (cached, snapshotted).
    pub chats: EventStore<Chat>,
    /// User aggregates (cached, snapshotted).
    pub users: EventStore<User>,
    /// Reservations, credentials, sessions, idempotency records.
    pub buckets: Buckets,
    /// Core NATS, for device-revocation notices.
    pub nats: async_nats::Client,
    /// JetStream, for receipts (not aggregates: watermarks only move up).
    pub js: async_nats::jetstream::Context,
    /// Read models, consulted only to validate reply targets.
    pub pg: sqlx::PgPool,
    pub auth: Authenticator,
    /// Abuse limits (per process).
    pub limits: Limits,
    /// Per-message body keys: sealing on send and edit, destruction on delete.
    pub keys: MessageKeys,
    /// Keys already stored for fresh message ids: sendMessage's key without a round trip.
    pub key_pool: KeyPool,
    /// argon2id, at most one per core at a time.
    pub passwords: Passwords,
    pub config: Arc<CommandConfig>,
}

impl CommandState {
    pub async fn new(infra: &Infra, config: CommandConfig) -> Result<Self, ApiError> {
        // The aggregates append on a connection of their own: a command's ack then waits for
        // no projector batch or live event the shared connection is handing out. Measured in
        // `parley up` (docs/benchmarks.md, "Session 15"): the send handler's wait between its
        // ack's wake-up and its next poll halved.
        let appends = infra
            .jetstream_of_its_own(APPENDS_CONNECTION)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let chats = EventStore::new(
            appends.clone(),
            infra.buckets.snapshots.clone(),
            config.cache_capacity,
            config.snapshot_interval,
        )
        .await?;
        let users = EventStore::new(
            appends,
            infra.buckets.snapshots.clone(),
            config.cache_capacity,
            config.snapshot_interval,
        )
        .await?;
        if config.password_cost.below_recommended() {
            tracing::warn!(
                cost = %config.password_cost,
                "password hashes are cheaper than the recommended m=19456,t=2,p=1: fine for tests \
                 and benchmarks, weak against offline guessing in production"
            );
        }
        let keys = infra.keys.clone();
        let key_pool = KeyPool::start(keys.clone(), config.message_key_pool, &infra.shutdown);
        Ok(Self(Arc::new(Shared {
            chats,
            users,
            buckets: infra.buckets.clone(),
            nats: infra.nats.clone(),
            js: infra.js.clone(),
            pg: infra.pg.clone(),
            auth: infra.auth.clone(),
            limits: Limits::new(&config.limits, &infra.shutdown),
            keys,
            key_pool,
            passwords: Passwords::new(config.password_cost.clone()),
            config: Arc::new(config),
        })))
    }
}

impl Deref for CommandState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl axum::extract::FromRef<CommandState> for Authenticator {
    fn from_ref(s: &CommandState) -> Authenticator {
        s.auth.clone()
    }
}
