//! Plumbing every Parley service shares: connections, problem+json, bearer auth, typed
//! extractors, shutdown and telemetry. No business rules live here.

pub mod attachments;
pub mod auth;
pub mod extract;
pub mod infra;
pub mod problem;
pub mod ratelimit;
pub mod seq;
pub mod shutdown;
pub mod tcp;
pub mod telemetry;

pub use auth::{Authenticator, Principal, SessionRecord, token_key};
pub use extract::{ApiJson, ClientIp, PathIds};
pub use infra::{Infra, InfraConfig, MIGRATOR};
pub use problem::Problem;
pub use ratelimit::{KeyedLimit, Rate};

/// Connects a PostgreSQL pool; the services share this so pool settings live in one place.
pub async fn pg_pool(url: &str, max_connections: u32) -> Result<sqlx::PgPool, sqlx::Error> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(url)
        .await
}
