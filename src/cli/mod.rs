//! The operator and analyst commands of the `parley` binary (`replay`, `projections`, `stats`):
//! argument types, their validation, and the exit-code contract (2: bad input, nothing done;
//! 1: the command failed while running).

pub mod projections;
pub mod replay;
pub mod stats;

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};

/// How a command failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input (unknown names, reversed ranges, malformed ids, a rebuild already running):
    /// nothing was changed. Exit code 2.
    #[error("{0}")]
    Usage(String),
    /// The command could not complete (a dependency down, a database error). Exit code 1.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl CliError {
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError::Usage(msg.into())
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

/// The error and its causes on one line, each cause once: libraries often repeat their
/// source's message in their own.
pub fn describe(e: &CliError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// Connects to NATS, failing after a few seconds rather than retrying forever as services do:
/// an interactive command must say when the server is not there.
pub async fn connect_nats(url: &str) -> Result<async_nats::jetstream::Context, CliError> {
    let client = tokio::time::timeout(Duration::from_secs(10), async {
        async_nats::ConnectOptions::new()
            .name("parley-cli")
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out connecting to NATS at {url}"))?
    .with_context(|| format!("cannot connect to NATS at {url}"))?;
    Ok(parley_nats::context(client))
}

/// Connects to PostgreSQL with a small pool (a command needs few connections).
pub async fn connect_pg(url: &str) -> Result<sqlx::PgPool, CliError> {
    Ok(parley_platform::pg_pool(url, 4)
        .await
        .context("cannot connect to PostgreSQL")?)
}

/// Parses an instant given as RFC 3339 (`2026-11-21T16:00:00Z`) or as a duration before now
/// (`90m`, `2h`, `7d`).
pub fn parse_instant(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(s) {
        return Ok(at.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(s).map_err(|_| {
        format!("{s:?} is neither an RFC 3339 time (2026-11-21T16:00:00Z) nor a duration ago (2h)")
    })?;
    let ago = chrono::Duration::from_std(ago).map_err(|e| e.to_string())?;
    Utc::now()
        .checked_sub_signed(ago)
        .ok_or_else(|| format!("{s:?} reaches too far back"))
}

/// Refuses a reversed time range.
pub fn check_range(
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Result<(), CliError> {
    if let (Some(s), Some(u)) = (since, until)
        && s > u
    {
        return Err(CliError::usage(format!(
            "--since ({}) is after --until ({}): the range is reversed",
            s.to_rfc3339(),
            u.to_rfc3339()
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn instants_parse_as_rfc3339_or_as_a_duration_ago() {
        let at = parse_instant("2026-11-21T16:00:00+01:00").unwrap();
        assert_eq!(at.to_rfc3339(), "2026-11-21T15:00:00+00:00");
        let ago = parse_instant("2h").unwrap();
        let diff = Utc::now() - ago;
        assert!(diff >= chrono::Duration::hours(2) && diff < chrono::Duration::hours(3));
        assert!(parse_instant("yesterday-ish").is_err());
    }

    #[test]
    fn a_reversed_range_is_a_usage_error() {
        let a = parse_instant("2026-01-02T00:00:00Z").unwrap();
        let b = parse_instant("2026-01-01T00:00:00Z").unwrap();
        assert_eq!(check_range(Some(a), Some(b)).unwrap_err().exit_code(), 2);
        assert!(check_range(Some(b), Some(a)).is_ok());
        assert!(check_range(None, Some(a)).is_ok());
    }
}
