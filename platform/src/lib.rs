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

/// The options of every Parley connection to PostgreSQL: `url`'s, with the JIT compiler off.
///
/// JIT pays off for long analytical queries, and Parley runs short statements thousands of
/// times a second. PostgreSQL compiles any statement whose *estimated* cost passes
/// `jit_above_cost` (100,000 by default), on every execution. The receipts' activity rollup
/// over a 5,000-member channel's batch passes it once the read model has grown (the estimate
/// multiplies a per-row look-up by thousands of rows): session 22 found each of its executions
/// compiled during a channel benchmark phase, and the whole machine's CPU per channel message
/// fell by up to a third with JIT off (docs/benchmarks.md, "Session 22").
pub fn pg_options(url: &str) -> Result<sqlx::postgres::PgConnectOptions, sqlx::Error> {
    Ok(url
        .parse::<sqlx::postgres::PgConnectOptions>()?
        .options([("jit", "off")]))
}
