//! query-api: the read side of Parley — authenticated HTTP GETs answered from the PostgreSQL
//! read models that the projectors keep (API.md, "Queries").
//!
//! `router` gives a ready `Router` (state applied, problem+json fallback for unknown routes);
//! `openapi` describes it. Every chat route waits for `min_sequence` (read your writes) and
//! answers 404 to anyone who is not a current member of the chat.

mod access;
mod attachments;
mod chats;
mod db;
mod error;
mod me;
mod messages;
mod openapi;
mod presence;
mod receipts;
mod search;
mod state;
pub mod stats;

use std::time::Duration;

use axum::Router;
use parley_platform::Infra;

pub use openapi::openapi;
pub use stats::{HourStats, hourly};

/// Tunables of the query API.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// How long a query with `min_sequence` waits for the read model before answering 503.
    pub min_sequence_wait: Duration,
    /// The largest history page a caller may ask for (`limit`).
    pub max_page: u32,
    /// The history page size when `limit` is absent.
    pub default_page: u32,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            min_sequence_wait: Duration::from_secs(2),
            max_page: 200,
            default_page: 50,
        }
    }
}

/// Every query route, with its state applied and problem+json answers for unknown routes and
/// methods.
///
/// The router carries a fallback, so it cannot be `merge`d into another router that has one
/// too (axum panics); nest it, or merge it into a router without a fallback.
pub fn router(infra: &Infra, config: QueryConfig) -> Router {
    Router::new()
        .merge(me::router())
        .merge(chats::router())
        .merge(messages::router())
        .merge(receipts::router())
        .merge(presence::router())
        .merge(search::router())
        .merge(stats::router())
        .merge(attachments::router())
        .method_not_allowed_fallback(error::method_not_allowed)
        .fallback(parley_platform::problem::not_found_fallback)
        .with_state(state::QueryState::new(infra, config))
}
