//! projectors: durable JetStream pull consumers that apply events to the PostgreSQL read models
//! (one transaction per batch, idempotent per aggregate) and fan membership changes out to the
//! gateways.

pub mod chats;
mod fanout;
mod message_changes;
pub mod receipts;
pub mod runner;
pub mod users;

use std::time::Duration;

use parley_platform::Infra;
use tokio_util::task::TaskTracker;

pub use runner::ProjectorError;

/// Tuning of the projectors (`PARLEY_PROJECTOR_*`).
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Most events applied in one transaction.
    pub batch: usize,
    /// How long an out-of-order event waits before it is redelivered (another instance is
    /// applying the events before it).
    pub out_of_order_delay: Duration,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch: 500,
            out_of_order_delay: Duration::from_millis(100),
        }
    }
}

/// The projections by name (`parley projections …`).
pub const PROJECTIONS: &[&str] = &["chats", "users", "receipts", "fanout"];

/// Starts every projector on `tracker`; they stop between batches when `infra.shutdown` fires.
pub async fn spawn(
    infra: &Infra,
    config: ProjectorConfig,
    tracker: &TaskTracker,
) -> Result<(), ProjectorError> {
    let chats =
        runner::Runner::new(infra, "chats", parley_nats::streams::CHATS, &config, true).await?;
    let users =
        runner::Runner::new(infra, "users", parley_nats::streams::USERS, &config, true).await?;
    let receipts = runner::Runner::new(
        infra,
        "receipts",
        parley_nats::streams::RECEIPTS,
        &config,
        true,
    )
    .await?;
    // Live notifications only matter from now on: gateways replay from PostgreSQL on connect.
    let fanout =
        runner::Runner::new(infra, "fanout", parley_nats::streams::CHATS, &config, false).await?;
    let pg = infra.pg.clone();
    let delay = config.out_of_order_delay;
    let keys = parley_nats::MessageKeys::new(infra.buckets.message_keys.clone(), infra.js.clone());
    tracker.spawn(chats.run(move |batch| {
        let pg = pg.clone();
        let keys = keys.clone();
        async move { chats::apply(&pg, &keys, batch, delay).await }
    }));
    let pg = infra.pg.clone();
    tracker.spawn(users.run(move |batch| {
        let pg = pg.clone();
        async move { users::apply(&pg, batch, delay).await }
    }));
    let pg = infra.pg.clone();
    let nats = infra.nats.clone();
    tracker.spawn(receipts.run(move |batch| {
        let pg = pg.clone();
        let nats = nats.clone();
        async move { receipts::apply(&pg, &nats, batch).await }
    }));
    let pg = infra.pg.clone();
    let nats = infra.nats.clone();
    tracker.spawn(fanout.run(move |batch| {
        let (pg, nats) = (pg.clone(), nats.clone());
        async move { fanout::apply(&pg, &nats, batch, delay).await }
    }));
    Ok(())
}
