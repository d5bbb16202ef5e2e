//! `QueryState`: the handles every query handler shares, behind one `Arc` so that axum's
//! clone per request is one reference count.

use std::ops::Deref;
use std::sync::Arc;

use axum::extract::FromRef;
use parley_platform::{Authenticator, Infra};
use sqlx::PgPool;

use crate::QueryConfig;

#[derive(Clone)]
pub(crate) struct QueryState(Arc<Shared>);

pub(crate) struct Shared {
    /// The read models; every query is answered from here.
    pub pg: PgPool,
    /// Bearer-token checks; the `Principal` extractor finds it through `FromRef`.
    pub auth: Authenticator,
    /// JetStream, consulted only when a `min_sequence` wait runs out: is the sequence real?
    pub js: async_nats::jetstream::Context,
    /// The `presence` and `last_seen` buckets (and the presence TTL).
    pub buckets: parley_nats::Buckets,
    /// Page sizes and the read-your-writes wait.
    pub config: Arc<QueryConfig>,
}

impl QueryState {
    pub fn new(infra: &Infra, config: QueryConfig) -> Self {
        Self(Arc::new(Shared {
            pg: infra.pg.clone(),
            auth: infra.auth.clone(),
            js: infra.js.clone(),
            buckets: infra.buckets.clone(),
            config: Arc::new(config),
        }))
    }
}

impl Deref for QueryState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl FromRef<QueryState> for Authenticator {
    fn from_ref(state: &QueryState) -> Authenticator {
        state.auth.clone()
    }
}
