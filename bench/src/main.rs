//! `parley-bench`: Parley's benchmark suite. Starts a private nats-server, a fresh PostgreSQL
//! database and `parley up` (the release binary, as users run it), drives it over HTTP and
//! WebSocket, and prints each figure beside a floor measured on the same servers in the same
//! run. See docs/benchmarks.md.

mod client;
mod floors;
mod scenarios;
mod stack;
mod stats;

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use crate::scenarios::{ALL, Ctx, Sizes};
use crate::stats::{Metric, markdown, summarise};

#[derive(Parser)]
#[command(
    name = "parley-bench",
    about = "Parley benchmarks with same-run floors"
)]
struct Cli {
    /// Small sizes, short phases: about 2 minutes (the default).
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Issue 7's sizes (1M-row history, 15,000 sockets, 5,000-member channel): about 15
    /// minutes with the default 3 runs (726–893 s measured on 2-vCPU machines).
    #[arg(long)]
    full: bool,
    /// Run only this scenario (repeatable); default: all.
    #[arg(long = "scenario", value_parser = clap::builder::PossibleValuesParser::new(ALL))]
    scenarios: Vec<String>,
    /// Runs per scenario (medians over them); default 3.
    #[arg(long)]
    runs: Option<usize>,
    /// Also write the markdown table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The `parley` binary to benchmark; default: `parley` next to this executable.
    #[arg(long, env = "PARLEY_BIN")]
    parley_bin: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let sizes = if cli.full {
        Sizes::full()
    } else {
        Sizes::quick()
    };
    // Three runs in full mode too: five would take it well past 15 minutes.
    let runs = cli.runs.unwrap_or(3).max(1);
    let bin = match cli.parley_bin {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .join("parley"),
    };
    let names: Vec<String> = if cli.scenarios.is_empty() {
        ALL.iter().map(|s| (*s).to_owned()).collect()
    } else {
        cli.scenarios
    };
    let mode = if cli.full { "full" } else { "quick" };
    eprintln!(
        "parley-bench: {mode} mode, {runs} runs, phases of {:?}; parley = {}",
        sizes.phase,
        bin.display()
    );
    let started = std::time::Instant::now();
    let stack = stack::Stack::start(bin).await?;
    let mut ctx = Ctx::new(stack, sizes, runs)?;
    let mut summaries = Vec::new();
    let mut failures = Vec::new();
    for name in &names {
        eprintln!("== {name}");
        let t = std::time::Instant::now();
        let runs = match ctx.run(name).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("  FAILED: {e:#}");
                failures.push(format!("- **{name} FAILED**: {e:#}\n"));
                // A stalled or broken process would fail every later scenario too: they
                // measure on a fresh `parley up` instead (same NATS, same database).
                if let Err(e) = ctx.restart("up").await {
                    anyhow::bail!("cannot restart parley up after {name} failed: {e:#}");
                }
                continue;
            }
        };
        eprintln!("  ({:.0} s)", t.elapsed().as_secs_f64());
        // Group each metric across runs by its position in the run.
        let width = runs.iter().map(Vec::len).max().unwrap_or(0);
        for i in 0..width {
            let series: Vec<Metric> = runs.iter().filter_map(|r| r.get(i).cloned()).collect();
            summaries.extend(summarise(name, &series));
        }
        if !ctx.stack.parley.is_running() {
            anyhow::bail!("parley up died during {name}");
        }
    }
    let sizes_note = if sizes.quick {
        format!(
            "quick mode: sized down — history {} rows (not 1M), {} idle sockets (not 15,000), \
             channel of {} (not 5,000), cold-load chat of {} events (not 1M), phases of {:?}",
            sizes.history_rows,
            sizes.idle_connections,
            sizes.channel_members,
            sizes.cold_events,
            sizes.phase
        )
    } else {
        format!("full mode: phases of {:?}", sizes.phase)
    };
    let table = format!(
        "{}\n{}{sizes_note}; {runs} runs; a run is noisy when its floor is > 20 % off the median floor; \
         total {:.0} s\n",
        markdown(&summaries),
        failures.concat(),
        started.elapsed().as_secs_f64()
    );
    std::io::stdout().write_all(table.as_bytes())?;
    if let Some(out) = cli.out {
        std::fs::write(&out, &table).with_context(|| format!("write {}", out.display()))?;
    }
    Ok(())
}
