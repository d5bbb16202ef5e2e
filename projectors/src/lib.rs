//! projectors: durable JetStream pull consumers that apply events to the PostgreSQL read models
//! (one transaction per batch, idempotent per aggregate); the chats projector also records the
//! activity rollup in its transaction and announces membership changes to the gateways once
//! they are committed.

pub mod activity;
pub mod chats;
mod fanout;
mod message_changes;
pub mod rebuild;
pub mod receipts;
pub mod runner;
pub mod status;
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
    /// How long a batch that is not full waits for more events after its first
    /// (`PARLEY_PROJECTOR_LINGER`): the read models lag by up to this much, and a steady stream
    /// of events costs one transaction per linger instead of one per event or two.
    pub linger: Duration,
    /// How long an out-of-order event waits before it is redelivered (another instance is
    /// applying the events before it).
    pub out_of_order_delay: Duration,
    /// How long a chat's receipt notices (and so its `receipt` frames) are merged after it
    /// announced some (`PARLEY_RECEIPT_NOTICE_INTERVAL`; 0: every move at once). A quiet
    /// chat's first moves go at once.
    pub receipt_notice_interval: Duration,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            // Measured (docs/benchmarks.md, session 22, 4): a 200k-event backlog drained
            // 47-52k events/s in batches of 1,000 against 35-47k in batches of 500, three
            // alternated pairs. Each transaction's fixed costs (lock reads, the chats update,
            // the rollup's upsert, the checkpoint, the commit) are paid half as often.
            batch: 1000,
            // Measured (docs/benchmarks.md, session 9): under steady traffic, 20 ms turns
            // ~5 events per transaction into ~30-100 and frees the CPU the commands need.
            linger: Duration::from_millis(20),
            out_of_order_delay: Duration::from_millis(100),
            // Measured (docs/benchmarks.md, session 23, 2): a quarter of a busy group's
            // `receipt` frames, with the first of a quiet chat's as quick as before.
            receipt_notice_interval: Duration::from_secs(1),
        }
    }
}

/// One projector: its name (the `projector_checkpoints` key and its durable consumer
/// `proj-<name>`) and the stream it reads (`parley projections status`).
#[derive(Debug, Clone, Copy)]
pub struct Projector {
    pub name: &'static str,
    pub stream: &'static str,
}

/// Every projector `spawn` starts.
pub const PROJECTORS: &[Projector] = &[
    Projector {
        name: "chats",
        stream: parley_nats::streams::CHATS,
    },
    Projector {
        name: "users",
        stream: parley_nats::streams::USERS,
    },
    Projector {
        name: "receipts",
        stream: parley_nats::streams::RECEIPTS,
    },
    Projector {
        name: activity::RECEIPTS_READER,
        stream: parley_nats::streams::RECEIPTS,
    },
];

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
    let activity_receipts = runner::Runner::new(
        infra,
        activity::RECEIPTS_READER,
        parley_nats::streams::RECEIPTS,
        &config,
        true,
    )
    .await?;
    retire_consumers(infra).await;
    let pg = infra.pg.clone();
    let nats = infra.nats.clone();
    let delay = config.out_of_order_delay;
    let keys = infra.keys.clone();
    tracker.spawn(chats.run_staged(
        move |batch| {
            let keys = keys.clone();
            async move {
                chats::prepare(&keys, batch)
                    .await
                    .map_err(chats::ApplyError::from)
            }
        },
        move |prepared| {
            let (pg, nats) = (pg.clone(), nats.clone());
            async move { chats::apply_and_announce(&pg, &nats, prepared, delay).await }
        },
    ));
    let pg = infra.pg.clone();
    tracker.spawn(users.run(move |batch| {
        let pg = pg.clone();
        async move { users::apply(&pg, batch, delay).await }
    }));
    let pg = infra.pg.clone();
    let announcer = receipts::Announcer::merging(
        infra.nats.clone(),
        config.receipt_notice_interval,
        tracker,
        infra.shutdown.clone(),
    );
    tracker.spawn(receipts.run(move |batch| {
        let pg = pg.clone();
        let announcer = announcer.clone();
        async move { receipts::apply(&pg, &announcer, batch).await }
    }));
    let pg = infra.pg.clone();
    tracker.spawn(activity_receipts.run(move |batch| {
        let pg = pg.clone();
        async move { activity::apply_receipts(&pg, batch).await }
    }));
    Ok(())
}

/// Durable consumers on `CHATS` of readers folded into the chats projector: the fan-out
/// projector (its membership notices, ADR 3 addendum) and the activity rollup's reader
/// (ADR 9 addendum). Nothing reads them any more, and each would keep the state of every chat
/// event it never acks.
const RETIRED_CONSUMERS: &[&str] = &["proj-fanout", "proj-activity-chats"];

/// Deletes the retired consumers a deployment still has. One request each: the deletion
/// itself (its error, no such consumer, is the usual answer).
async fn retire_consumers(infra: &Infra) {
    for name in RETIRED_CONSUMERS {
        if infra
            .js
            .delete_consumer_from_stream(*name, parley_nats::streams::CHATS)
            .await
            .is_ok()
        {
            tracing::info!(
                consumer = name,
                "deleted a retired consumer (its reader is now part of the chats projector)"
            );
        }
    }
}
