//! `parley projections status` and `parley projections rebuild NAME`.

use std::io::Write;

use anyhow::Context;
use parley_projectors::ProjectorConfig;
use parley_projectors::rebuild::{self, RebuildReport};
use parley_projectors::status::{self, ProjectorStatus};

use super::CliError;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ProjectionsCmd {
    /// Each projector's checkpoint and its lag behind its stream, in events and seconds.
    Status {
        /// One JSON object per projector, as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a projection from the streams into fresh tables and swap them in while queries
    /// keep being answered. Projections: read-models (users, devices, chats, members, messages,
    /// chat_updates, device_cursors), activity (the activity_* rollup tables).
    Rebuild {
        /// The projection to rebuild.
        name: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `parley projections` command.
pub async fn run(cmd: ProjectionsCmd, nats_url: &str, database_url: &str) -> Result<(), CliError> {
    match cmd {
        ProjectionsCmd::Status { json } => {
            let js = super::connect_nats(nats_url).await?;
            let pg = super::connect_pg(database_url).await?;
            let rows = status::status(&js, &pg)
                .await
                .context("cannot read the projectors' status")?;
            let text = if json {
                serde_json::to_string_pretty(&rows).context("encode status")? + "\n"
            } else {
                status_table(&rows)
            };
            write_stdout(&text)
        }
        ProjectionsCmd::Rebuild { name, json } => {
            // An unknown name is refused before connecting to anything.
            rebuild::find(&name).map_err(|e| CliError::usage(e.to_string()))?;
            let js = super::connect_nats(nats_url).await?;
            let report = rebuild::rebuild(&js, database_url, &name, &ProjectorConfig::default())
                .await
                .map_err(|e| {
                    if e.is_refusal() {
                        CliError::usage(e.to_string())
                    } else {
                        CliError::Failed(
                            anyhow::Error::new(e).context(format!("rebuild of {name}")),
                        )
                    }
                })?;
            let text = if json {
                serde_json::to_string_pretty(&report).context("encode report")? + "\n"
            } else {
                report_table(&report)
            };
            write_stdout(&text)
        }
    }
}

fn write_stdout(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write the output")?;
    Ok(())
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A fixed-width table, one projector per line.
pub fn status_table(rows: &[ProjectorStatus]) -> String {
    let mut s = format!(
        "{:<18} {:<9} {:>10} {:>10} {:>11} {:>10} {:>11}\n",
        "PROJECTOR", "STREAM", "CHECKPOINT", "ACKED", "STREAM_LAST", "LAG_EVENTS", "LAG_SECONDS"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<18} {:<9} {:>10} {:>10} {:>11} {:>10} {:>11.1}\n",
            r.projector,
            r.stream,
            r.checkpoint,
            opt(r.acked),
            r.stream_last,
            r.lag_events,
            r.lag_seconds
        ));
    }
    s
}

fn report_table(r: &RebuildReport) -> String {
    let events = r
        .events
        .iter()
        .map(|(stream, n)| format!("{stream} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = format!(
        "rebuilt {} from {events} events in {:.1}s\n{:<20} {:>10} {:>8} {:>8}\n",
        r.projection,
        r.elapsed.as_secs_f64(),
        "TABLE",
        "ROWS",
        "REMOVED",
        "ADDED"
    );
    for t in &r.tables {
        s.push_str(&format!(
            "{:<20} {:>10} {:>8} {:>8}\n",
            t.table, t.rows, t.removed, t.added
        ));
    }
    s
}
