//! Query API tests against a real PostgreSQL and a private nats-server: read models are seeded
//! with SQL, tokens with the sessions KV bucket, and the router is called over HTTP.

mod access;
mod chats;
mod freshness;
mod helpers;
mod history;
mod me;
