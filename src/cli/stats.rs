//! `parley stats`: a chat's hourly activity (the activity projection) as CSV on stdout, with
//! the same query as `GET /v1/chats/{id}/stats`.

use std::io::Write;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use parley_query_api::HourStats;
use uuid::Uuid;

use super::{CliError, check_range, parse_instant};

#[derive(Debug, Clone, clap::Args)]
pub struct StatsArgs {
    /// The chat.
    #[arg(long)]
    pub chat: Uuid,
    /// Messages sent at or after this time: RFC 3339, or a duration ago (`7d`). Default: all.
    #[arg(long, value_parser = parse_instant)]
    pub since: Option<DateTime<Utc>>,
    /// Messages sent before this time: RFC 3339, or a duration ago. Default: now.
    #[arg(long, value_parser = parse_instant)]
    pub until: Option<DateTime<Utc>>,
}

/// The CSV header; one row per hour with messages follows.
pub const HEADER: &str = "hour,messages,senders,delivered,median_delivery_ms";

/// Runs `parley stats`.
pub async fn run(args: StatsArgs, database_url: &str) -> Result<(), CliError> {
    check_range(args.since, args.until)?;
    let pg = super::connect_pg(database_url).await?;
    let hours = parley_query_api::hourly(&pg, args.chat, args.since, args.until)
        .await
        .context("cannot read the activity rollup")?;
    let mut out = std::io::stdout().lock();
    out.write_all(csv(&hours).as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write the output")?;
    Ok(())
}

/// CSV with `\n` line ends; no field can hold a comma or quote, so none is quoted. An hour
/// with no delivered message has an empty median.
pub fn csv(hours: &[HourStats]) -> String {
    let mut s = String::from(HEADER);
    s.push('\n');
    for h in hours {
        s.push_str(&format!(
            "{},{},{},{},{}\n",
            h.hour.to_rfc3339_opts(SecondsFormat::Secs, true),
            h.messages,
            h.senders,
            h.delivered,
            h.median_delivery_ms
                .map(|m| format!("{m:.1}"))
                .unwrap_or_default()
        ));
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn csv_has_a_header_and_one_row_per_hour() {
        let hour = DateTime::parse_from_rfc3339("2026-11-21T16:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let rows = [
            HourStats {
                hour,
                messages: 3,
                senders: 2,
                delivered: 2,
                median_delivery_ms: Some(12.26),
            },
            HourStats {
                hour: hour + chrono::Duration::hours(1),
                messages: 1,
                senders: 1,
                delivered: 0,
                median_delivery_ms: None,
            },
        ];
        assert_eq!(
            csv(&rows),
            "hour,messages,senders,delivered,median_delivery_ms\n\
             2026-11-21T16:00:00Z,3,2,2,12.3\n\
             2026-11-21T17:00:00Z,1,1,0,\n"
        );
    }
}
