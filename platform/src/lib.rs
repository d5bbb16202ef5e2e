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
        .connect_with(pg_options(url)?)
        .await
}

/// How every Parley connection to PostgreSQL is made: the URL, with JIT compilation off.
/// Parley's statements are short and run many times; PostgreSQL compiles a statement whose
/// estimated cost passes `jit_above_cost` each time it runs, and the batch statements' costs
/// pass it once their tables are large: on a 200,000-row `activity_messages`, a channel's
/// receipts batch took 400-600 ms with JIT and 46-62 ms without (docs/benchmarks.md,
/// "Session 19").
pub fn pg_options(url: &str) -> Result<sqlx::postgres::PgConnectOptions, sqlx::Error> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    Ok(options.options([("jit", "off")]))
}
