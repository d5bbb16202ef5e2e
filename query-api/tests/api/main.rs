//! Query API tests against a real PostgreSQL and a private nats-server: read models are seeded
//! with SQL, tokens with the sessions KV bucket, and the router is called over HTTP.

// A failed set-up step or a surprising answer should stop the test right there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod access;
mod chats;
mod freshness;
mod helpers;
mod history;
mod me;
