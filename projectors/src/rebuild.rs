//! Rebuilding a projection from the streams (`parley projections rebuild NAME`, ADR 9): replay
//! its streams from the first event through the same projection code into fresh tables in a
//! schema of their own, then, in one transaction that holds off the live projectors but not the
//! readers, apply the last events and make the live tables equal to the rebuilt ones.
//!
//! A rebuildable projection is defined by the tables it owns. The users, chats and receipts
//! projectors write each other's tables (receipts move `members` watermarks and
//! `device_cursors`; a device added starts `device_cursors` from `members`), so they rebuild
//! together as `read-models`, replaying their three streams merged in the order JetStream
//! stored them, which is the order their effects were caused in.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parley_nats::replay::{self, Replay, ReplayError, ReplaySpec, Replayed, Start};
use parley_nats::{MessageKeys, streams};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, PgPool};

use crate::runner::{Delivered, Disposition};
use crate::{ProjectorConfig, activity, chats, receipts, users};

/// One rebuild at a time, across every process that can run one.
const LOCK_KEY: &str = "parley.projections.rebuild";
/// How long the swap waits for the live tables before letting go and trying again, so that a
/// live projector mid-batch (or a deadlock with one) never waits on the rebuild for long.
const SWAP_LOCK_TIMEOUT: &str = "200ms";
const SWAP_ATTEMPTS: u32 = 50;
/// Catch-up rounds before the swap; each shortens the tail applied under the lock.
const CATCH_UP_ROUNDS: usize = 3;

/// A projection reading one stream, as the rebuild drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    Users,
    Chats,
    Receipts,
    ActivityChats,
    ActivityReceipts,
}

impl Feed {
    pub fn stream(self) -> &'static str {
        match self {
            Feed::Users => streams::USERS,
            Feed::Chats | Feed::ActivityChats => streams::CHATS,
            Feed::Receipts | Feed::ActivityReceipts => streams::RECEIPTS,
        }
    }

    async fn apply(
        self,
        pg: &PgPool,
        keys: &MessageKeys,
        batch: Vec<Delivered>,
        delay: Duration,
    ) -> Result<Vec<Disposition>, chats::ApplyError> {
        Ok(match self {
            Feed::Users => users::apply(pg, batch, delay).await?,
            Feed::Chats => chats::apply(pg, keys, batch, delay).await?,
            Feed::Receipts => receipts::apply_quietly(pg, batch).await?,
            Feed::ActivityChats => activity::apply_chats(pg, batch, delay).await?,
            Feed::ActivityReceipts => activity::apply_receipts(pg, batch).await?,
        })
    }
}

/// A projection that can be rebuilt: the tables it owns and the feeds that write them.
#[derive(Debug)]
pub struct Rebuildable {
    pub name: &'static str,
    pub tables: &'static [&'static str],
    pub feeds: &'static [Feed],
}

/// Every rebuildable projection. A projection's code writing a table missing here makes its
/// rebuild fail (the rebuild schema is the connection's whole search path), never write live.
pub const REBUILDABLE: &[Rebuildable] = &[
    Rebuildable {
        name: "read-models",
        tables: &[
            "users",
            "devices",
            "chats",
            "members",
            "messages",
            "chat_updates",
            "device_cursors",
            "message_edits",
            "reactions",
            "member_settings",
            "user_blocks",
        ],
        feeds: &[Feed::Users, Feed::Chats, Feed::Receipts],
    },
    Rebuildable {
        name: "activity",
        tables: &["activity_chats", "activity_messages", "activity_watermarks"],
        feeds: &[Feed::ActivityChats, Feed::ActivityReceipts],
    },
];

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("unknown projection {0:?}; rebuildable projections: {names}", names = names())]
    Unknown(String),
    #[error("a rebuild is already running; nothing was changed (try again once it has finished)")]
    AlreadyRunning,
    #[error(
        "stream {stream} no longer holds its first events (it starts at sequence {first}): a \
         rebuild would drop what the read model still remembers; nothing was changed"
    )]
    Incomplete { stream: &'static str, first: u64 },
    #[error(
        "{count} events of {stream} cannot be applied (an earlier event of their aggregate is \
         missing, first at stream sequence {first}); nothing was changed"
    )]
    Stuck {
        stream: &'static str,
        count: usize,
        first: u64,
    },
    #[error("table {0} has no primary key, so it cannot be reconciled; nothing was changed")]
    NoPrimaryKey(String),
    #[error("the live tables stayed busy through {0} attempts to swap; nothing was changed")]
    Busy(u32),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Apply(#[from] chats::ApplyError),
    #[error("the message_keys bucket cannot be opened: {0}")]
    Keys(String),
}

impl RebuildError {
    /// Refusals caused by what was asked (exit code 2), as opposed to failures while running.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            RebuildError::Unknown(_) | RebuildError::AlreadyRunning
        )
    }
}

fn names() -> String {
    REBUILDABLE
        .iter()
        .map(|r| r.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The projection named `name`.
pub fn find(name: &str) -> Result<&'static Rebuildable, RebuildError> {
    REBUILDABLE
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| RebuildError::Unknown(name.to_owned()))
}

/// How one live table changed when the rebuilt one was swapped in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableDiff {
    pub table: String,
    /// Rows in the rebuilt table.
    pub rows: i64,
    /// Live rows that the rebuilt table does not hold (removed or changed).
    pub removed: u64,
    /// Rebuilt rows that the live table did not hold (added or changed).
    pub added: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RebuildReport {
    pub projection: &'static str,
    /// Events applied, per feed's stream, in feed order.
    pub events: Vec<(&'static str, u64)>,
    pub tables: Vec<TableDiff>,
    #[serde(with = "secs")]
    pub elapsed: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Rebuilds `name` and swaps it in. On any error the live tables are as they were.
pub async fn rebuild(
    js: &async_nats::jetstream::Context,
    database_url: &str,
    name: &str,
    config: &ProjectorConfig,
) -> Result<RebuildReport, RebuildError> {
    let target = find(name)?;
    let opts: PgConnectOptions = parley_platform::pg_options(database_url)?;
    let mut control = opts.connect().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
        .bind(LOCK_KEY)
        .fetch_one(&mut control)
        .await?;
    if !locked {
        return Err(RebuildError::AlreadyRunning);
    }
    let schema = format!("parley_rebuild_{}", target.name.replace('-', "_"));
    let result = run(js, &opts, &mut control, target, &schema, config).await;
    // Whatever happened, the scratch tables go; the session's end releases the lock.
    if let Err(e) = control
        .execute(format!("DROP SCHEMA IF EXISTS {} CASCADE", quote(&schema)).as_str())
        .await
    {
        tracing::warn!(error = %e, %schema, "cannot drop the rebuild schema");
    }
    let _ = control.close().await;
    result
}

async fn run(
    js: &async_nats::jetstream::Context,
    opts: &PgConnectOptions,
    control: &mut PgConnection,
    target: &'static Rebuildable,
    schema: &str,
    config: &ProjectorConfig,
) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    let wanted: BTreeSet<&'static str> = target.feeds.iter().map(|f| f.stream()).collect();
    for stream in wanted {
        let (first, last) = replay::bounds(js, stream).await?;
        if last > 0 && first > 1 {
            return Err(RebuildError::Incomplete { stream, first });
        }
    }
    create_tables(control, schema, target.tables).await?;
    let quoted = quote(schema);
    let scratch = PgPoolOptions::new()
        .max_connections(2)
        .after_connect(move |conn, _| {
            let set = format!("SET search_path TO {quoted}");
            Box::pin(async move {
                conn.execute(set.as_str()).await?;
                Ok(())
            })
        })
        .connect_with(opts.clone())
        .await?;
    let mut sources = Vec::with_capacity(target.feeds.len());
    for &feed in target.feeds {
        let spec = ReplaySpec {
            stream: feed.stream().to_owned(),
            filter_subject: None,
            start: Start::First,
        };
        sources.push(Source {
            feed,
            replay: Replay::open(js, &spec).await?,
            read_to: 0,
            target: 0,
            head: None,
            applied: 0,
            deferred: Vec::new(),
        });
    }
    let keys = MessageKeys::new(
        js.get_key_value(parley_nats::message_keys::BUCKET)
            .await
            .map_err(|e| RebuildError::Keys(e.to_string()))?,
        js.clone(),
    );
    let mut merger = Merger {
        pg: &scratch,
        keys,
        batch: config.batch.max(1),
        delay: config.out_of_order_delay,
    };
    for _ in 0..CATCH_UP_ROUNDS {
        let mut behind = 0;
        for s in &mut sources {
            s.target = replay::bounds(js, s.feed.stream()).await?.1;
            behind += s.target.saturating_sub(s.read_to);
        }
        merger.apply_all(&mut sources).await?;
        if behind < merger.batch as u64 {
            break;
        }
    }
    let live = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.clone())
        .await?;
    let tables = swap(js, &live, &mut merger, &mut sources, schema, target.tables).await?;
    live.close().await;
    scratch.close().await;
    Ok(RebuildReport {
        projection: target.name,
        events: sources
            .iter()
            .map(|s| (s.feed.stream(), s.applied))
            .collect(),
        tables,
        elapsed: started.elapsed(),
    })
}

/// Fresh, empty copies of the live tables (columns, defaults, indexes, constraints), plus
/// `projector_checkpoints` so the projections' checkpoint writes stay in the scratch schema.
async fn create_tables(
    control: &mut PgConnection,
    schema: &str,
    tables: &[&str],
) -> Result<(), sqlx::Error> {
    let s = quote(schema);
    control
        .execute(format!("DROP SCHEMA IF EXISTS {s} CASCADE").as_str())
        .await?;
    control
        .execute(format!("CREATE SCHEMA {s}").as_str())
        .await?;
    for t in tables.iter().chain(&["projector_checkpoints"]) {
        let t = quote(t);
        control
            .execute(format!("CREATE TABLE {s}.{t} (LIKE public.{t} INCLUDING ALL)").as_str())
            .await?;
    }
    Ok(())
}

/// Holds off the live writers (readers are never blocked: EXCLUSIVE mode admits plain reads),
/// applies the events stored until then, and makes each live table equal to its rebuilt copy.
/// Only rows that differ are written, so readers with an older snapshot keep a consistent view.
async fn swap(
    js: &async_nats::jetstream::Context,
    live: &PgPool,
    merger: &mut Merger<'_>,
    sources: &mut [Source],
    schema: &str,
    tables: &[&str],
) -> Result<Vec<TableDiff>, RebuildError> {
    let lock = format!(
        "LOCK TABLE {} IN EXCLUSIVE MODE",
        tables
            .iter()
            .map(|t| format!("public.{}", quote(t)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for attempt in 1..=SWAP_ATTEMPTS {
        let mut tx = live.begin().await?;
        tx.execute(format!("SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'").as_str())
            .await?;
        match tx.execute(lock.as_str()).await {
            Ok(_) => {}
            Err(e) if is_lock_timeout(&e) => {
                drop(tx);
                tracing::debug!(attempt, "live tables busy; retrying the swap");
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt.min(10)))).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        tx.execute("SET LOCAL lock_timeout = 0").await?;
        // No live projector can commit now, so the streams' current ends bound what the live
        // tables hold: after this tail, the rebuilt tables hold at least as much.
        for s in sources.iter_mut() {
            s.target = replay::bounds(js, s.feed.stream()).await?.1;
        }
        merger.apply_all(sources).await?;
        if let Some(s) = sources.iter().find(|s| !s.deferred.is_empty()) {
            return Err(RebuildError::Stuck {
                stream: s.feed.stream(),
                count: s.deferred.len(),
                first: s.deferred.iter().map(|d| d.0).min().unwrap_or(0),
            });
        }
        let mut diffs = Vec::with_capacity(tables.len());
        for t in tables {
            diffs.push(reconcile(&mut tx, schema, t).await?);
        }
        tx.commit().await?;
        return Ok(diffs);
    }
    Err(RebuildError::Busy(SWAP_ATTEMPTS))
}

fn is_lock_timeout(e: &sqlx::Error) -> bool {
    // 55P03 lock_not_available: lock_timeout ran out; 40P01: chosen as a deadlock victim.
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "55P03" || c == "40P01")
}

/// Deletes the live rows the rebuilt table lacks and inserts the rebuilt rows the live table
/// lacks (a changed row is both), comparing every stored column.
async fn reconcile(
    tx: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<TableDiff, RebuildError> {
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name = $1 AND is_generated = 'NEVER' \
         ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(&mut *tx)
    .await?;
    let key: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
         WHERE i.indrelid = to_regclass($1) AND i.indisprimary \
         ORDER BY array_position(i.indkey::int2[], a.attnum)",
    )
    .bind(format!("public.{}", quote(table)))
    .fetch_all(&mut *tx)
    .await?;
    if key.is_empty() {
        return Err(RebuildError::NoPrimaryKey(table.to_owned()));
    }
    let list = columns
        .iter()
        .map(|c| quote(c))
        .collect::<Vec<_>>()
        .join(", ");
    let on = key
        .iter()
        .map(|c| format!("p.{c} = g.{c}", c = quote(c)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let live = format!("public.{}", quote(table));
    let rebuilt = format!("{}.{}", quote(schema), quote(table));
    let removed = tx
        .execute(
            format!(
                "DELETE FROM {live} p USING \
                 (SELECT {list} FROM {live} EXCEPT SELECT {list} FROM {rebuilt}) g WHERE {on}"
            )
            .as_str(),
        )
        .await?
        .rows_affected();
    let added = tx
        .execute(
            format!(
                "INSERT INTO {live} ({list}) \
                 SELECT {list} FROM {rebuilt} EXCEPT SELECT {list} FROM {live}"
            )
            .as_str(),
        )
        .await?
        .rows_affected();
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {rebuilt}"))
        .fetch_one(&mut *tx)
        .await?;
    Ok(TableDiff {
        table: table.to_owned(),
        rows,
        removed,
        added,
    })
}

/// A PostgreSQL identifier, quoted.
fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// One feed's replay and what of it has been applied.
struct Source {
    feed: Feed,
    replay: Replay,
    /// The stream sequence of the last event read.
    read_to: u64,
    /// Read up to here in the current round.
    target: u64,
    /// The next event, read but not yet applied.
    head: Option<Replayed>,
    applied: u64,
    /// Events the projection asked to retry (their predecessor not applied yet).
    deferred: Vec<(u64, Bytes)>,
}

impl Source {
    /// Reads the next event into `head` if there is one below the target.
    async fn fill(&mut self) -> Result<(), ReplayError> {
        if self.head.is_none() && self.read_to < self.target {
            match self.replay.next().await {
                Some(Ok(event)) => {
                    self.read_to = event.stream_seq;
                    self.head = Some(event);
                }
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(ReplayError::Read {
                        stream: self.feed.stream().to_owned(),
                        cause: "the connection closed".into(),
                    });
                }
            }
        }
        Ok(())
    }

    fn ready(&self) -> Option<&Replayed> {
        self.head.as_ref().filter(|h| h.stream_seq <= self.target)
    }
}

/// Applies several feeds' events in the order JetStream stored them, in batches.
struct Merger<'a> {
    pg: &'a PgPool,
    /// Message keys, to open sealed bodies as the live projector does.
    keys: MessageKeys,
    batch: usize,
    delay: Duration,
}

impl Merger<'_> {
    /// Applies every event up to each source's target.
    async fn apply_all(&mut self, sources: &mut [Source]) -> Result<(), RebuildError> {
        loop {
            for s in sources.iter_mut() {
                s.fill().await?;
            }
            let Some(i) = earliest(sources, None) else {
                break;
            };
            // Take from this feed while it stays the earliest: one batch per run of a feed.
            let bound =
                earliest(sources, Some(i)).and_then(|j| sources[j].ready().map(|h| h.stored_at));
            let mut run = Vec::new();
            loop {
                let s = &mut sources[i];
                let fits = s
                    .ready()
                    .is_some_and(|h| bound.is_none_or(|b| h.stored_at <= b));
                if !fits || run.len() >= self.batch {
                    break;
                }
                if let Some(h) = s.head.take() {
                    run.push((h.stream_seq, h.payload));
                }
                s.fill().await?;
            }
            self.apply(&mut sources[i], run).await?;
        }
        for s in sources.iter_mut() {
            if !s.deferred.is_empty() {
                self.apply(s, Vec::new()).await?;
            }
        }
        Ok(())
    }

    async fn apply(&self, source: &mut Source, run: Vec<(u64, Bytes)>) -> Result<(), RebuildError> {
        let mut items = std::mem::take(&mut source.deferred);
        items.extend(run);
        if items.is_empty() {
            return Ok(());
        }
        let batch = items
            .iter()
            .map(|(seq, payload)| Delivered {
                stream_seq: *seq,
                payload: payload.clone(),
            })
            .collect();
        let dispositions = source
            .feed
            .apply(self.pg, &self.keys, batch, self.delay)
            .await?;
        for (item, d) in items.into_iter().zip(dispositions) {
            match d {
                // Undecodable events were logged by the projection; the live one terms them too.
                Disposition::Ack | Disposition::Term => source.applied += 1,
                Disposition::Retry(_) => source.deferred.push(item),
            }
        }
        Ok(())
    }
}

/// The source whose ready event JetStream stored first (ties: feed order), `except` one.
fn earliest(sources: &[Source], except: Option<usize>) -> Option<usize> {
    sources
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != except)
        .filter_map(|(i, s)| s.ready().map(|h| (h.stored_at, i)))
        .min()
        .map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projections_are_found_by_name_and_unknown_names_are_refused() {
        assert!(find("read-models").is_ok());
        assert!(find("activity").is_ok());
        let err = find("chats").unwrap_err();
        assert!(err.is_refusal());
        assert!(err.to_string().contains("read-models, activity"), "{err}");
    }

    #[test]
    fn no_table_belongs_to_two_projections() {
        let mut seen = BTreeSet::new();
        for r in REBUILDABLE {
            for t in r.tables {
                assert!(seen.insert(*t), "{t} is in two projections");
            }
        }
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }
}
