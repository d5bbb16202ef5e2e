//! The analyst and operator commands of the `parley` binary (`replay`, `projections`, `stats`)
//! and the stats route, run for real against a private nats-server and a fresh database.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod projections;
mod replay;
mod schemas;
mod stats;
mod support;
