//! The connections every service runs on, made once per process and shared by all services in
//! it (`parley up`) — NATS, JetStream with its buckets, PostgreSQL, the token checker.

use std::time::Duration;

use async_nats::jetstream;
use parley_nats::{Buckets, JetStreamSettings, MessageKeys};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;

/// The migrations of every read model, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Where the dependencies are, and how to set them up (`NATS_URL`, `DATABASE_URL`, …).
#[derive(Debug, Clone)]
pub struct InfraConfig {
    pub nats_url: String,
    pub database_url: String,
    pub pg_max_connections: u32,
    pub jetstream: JetStreamSettings,
}

impl Default for InfraConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            database_url: "postgres://parley:parley@127.0.0.1:5432/parley".into(),
            pg_max_connections: 16,
            jetstream: JetStreamSettings::default(),
        }
    }
}

/// Cheap handles to the shared dependencies; clone freely.
#[derive(Clone)]
pub struct Infra {
    /// Core NATS, for live subjects and notifications.
    pub nats: async_nats::Client,
    /// JetStream, for the streams and consumers.
    pub js: jetstream::Context,
    /// The KV buckets (handles, sessions, snapshots, …).
    pub buckets: Buckets,
    /// The read models.
    pub pg: PgPool,
    /// Token checks with a revocation-aware cache.
    pub auth: Authenticator,
    /// Message keys with one cache for the whole process: inside `parley up`, the key
    /// command-api seals a message with is the key the projector and the gateway open it
    /// with, without a KV read each.
    pub keys: MessageKeys,
    /// Fired when the process should stop.
    pub shutdown: CancellationToken,
    /// Where `nats` connected, for connections of their own ([`Infra::jetstream_of_its_own`]).
    nats_url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Nats {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot set up JetStream streams and buckets: {0}")]
    Setup(#[from] parley_nats::setup::SetupError),
    #[error("cannot connect to PostgreSQL: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("cannot migrate PostgreSQL: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl Infra {
    /// Connects, creates or updates streams and buckets, and migrates the database: every
    /// service does this at start, idempotently, so any start order works.
    pub async fn connect(
        cfg: &InfraConfig,
        shutdown: CancellationToken,
    ) -> Result<Infra, InfraError> {
        let nats = connect_nats(&cfg.nats_url, parley_nats::CONNECTION_NAME).await?;
        let js = parley_nats::context(nats.clone());
        let buckets = parley_nats::ensure(&js, &cfg.jetstream).await?;
        let pg = crate::pg_pool(&cfg.database_url, cfg.pg_max_connections).await?;
        MIGRATOR.run(&pg).await?;
        let auth = Authenticator::new(buckets.sessions.clone(), shutdown.clone());
        let keys = MessageKeys::new(buckets.message_keys.clone(), js.clone());
        Ok(Infra {
            nats,
            js,
            buckets,
            pg,
            auth,
            keys,
            shutdown,
            nats_url: cfg.nats_url.clone(),
        })
    }

    /// JetStream on a NATS connection of its own (to the same servers, named `name`), for a
    /// latency-bound request/reply path. Each connection is read by one task: on the shared
    /// one, a publish's ack waits behind whatever that task is handing out at the time
    /// (projector batches, live events, notices, key writes); on its own, it does not.
    pub async fn jetstream_of_its_own(&self, name: &str) -> Result<jetstream::Context, InfraError> {
        Ok(parley_nats::context(
            connect_nats(&self.nats_url, name).await?,
        ))
    }
}

/// Connects with the same deadline wherever a process opens a connection.
async fn connect_nats(url: &str, name: &str) -> Result<async_nats::Client, InfraError> {
    tokio::time::timeout(
        Duration::from_secs(10),
        parley_nats::connect_named(url, name),
    )
    .await
    .map_err(|_| InfraError::Nats {
        url: url.to_owned(),
        source: async_nats::ConnectError::from(async_nats::ConnectErrorKind::TimedOut),
    })?
    .map_err(|source| InfraError::Nats {
        url: url.to_owned(),
        source,
    })
}

impl axum::extract::FromRef<Infra> for Authenticator {
    fn from_ref(infra: &Infra) -> Authenticator {
        infra.auth.clone()
    }
}
