//! `parley replay`: writes the stored CloudEvents of one stream as JSON lines, byte for byte,
//! selected by chat or user, type, time and stream-sequence range; `--follow` keeps going.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parley_nats::replay::{Replay, ReplaySpec, Start};
use parley_schemas::events::DeliveredBatch;
use parley_schemas::{ChatEvent, DomainEvent, ReceiptEvent, UserEvent};
use uuid::Uuid;

use super::{CliError, check_range, parse_instant};

/// Replays shorter than this get no progress bar: it would only flicker.
const PROGRESS_FROM: u64 = 1_000;

/// The streams of API.md, "Event streams".
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum StreamName {
    Chats,
    Users,
    Receipts,
}

impl StreamName {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamName::Chats => parley_nats::streams::CHATS,
            StreamName::Users => parley_nats::streams::USERS,
            StreamName::Receipts => parley_nats::streams::RECEIPTS,
        }
    }

    /// Every event type the stream holds, old versions included.
    pub fn types(self) -> &'static [&'static str] {
        match self {
            StreamName::Chats => ChatEvent::TYPES,
            StreamName::Users => UserEvent::TYPES,
            StreamName::Receipts => ReceiptEvent::TYPES,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The stream to read; inferred from --user (USERS) or --chat (CHATS) when absent.
    #[arg(long, value_enum, ignore_case = true)]
    pub stream: Option<StreamName>,
    /// Only this chat's events (CHATS: `chats.<id>`, RECEIPTS: `receipts.<id>`).
    #[arg(long)]
    pub chat: Option<Uuid>,
    /// Only this user's events: USERS `users.<id>`; in CHATS and RECEIPTS, the events the user
    /// caused (the CloudEvent `actor`).
    #[arg(long)]
    pub user: Option<Uuid>,
    /// Only events of these CloudEvent types (repeat, or separate with commas).
    #[arg(long = "type", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Events stored at or after this time: RFC 3339, or a duration ago (`2h`, `7d`).
    #[arg(long, value_parser = parse_instant)]
    pub since: Option<DateTime<Utc>>,
    /// Events stored at or before this time: RFC 3339, or a duration ago.
    #[arg(long, value_parser = parse_instant)]
    pub until: Option<DateTime<Utc>>,
    /// First stream sequence to read (the event's position in its stream).
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Last stream sequence to read.
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Write to this file instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Keep streaming new events once the stored ones are written (until --until or --to-seq,
    /// or Ctrl-C).
    #[arg(long, short)]
    pub follow: bool,
    /// Never draw the progress bar (it is drawn only when stderr is a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
}

/// A validated replay: what to open and which events to keep.
#[derive(Debug, Clone)]
pub struct Plan {
    pub spec: ReplaySpec,
    pub types: Vec<String>,
    pub actor: Option<Uuid>,
    pub until: Option<DateTime<Utc>>,
    pub to_seq: Option<u64>,
}

impl ReplayArgs {
    /// Checks the arguments against each other and the stream's types; every refusal is a usage
    /// error (exit 2) that names what is wrong.
    pub fn plan(&self) -> Result<Plan, CliError> {
        let stream = match (self.stream, self.user, self.chat) {
            (Some(s), _, _) => s,
            (None, Some(_), None) => StreamName::Users,
            (None, _, Some(_)) => StreamName::Chats,
            (None, None, None) => {
                return Err(CliError::usage(
                    "say which stream to replay: --stream CHATS|USERS|RECEIPTS (or --chat / --user)",
                ));
            }
        };
        check_range(self.since, self.until)?;
        if let (Some(from), Some(to)) = (self.from_seq, self.to_seq)
            && from > to
        {
            return Err(CliError::usage(format!(
                "--from-seq {from} is after --to-seq {to}: the range is reversed"
            )));
        }
        if self.since.is_some() && self.from_seq.is_some() {
            return Err(CliError::usage(
                "--since and --from-seq both say where to start: give one",
            ));
        }
        let known = stream.types();
        for ty in &self.types {
            if !known.contains(&ty.as_str()) {
                return Err(CliError::usage(format!(
                    "unknown event type {ty:?} for stream {}; its types are: {}",
                    stream.as_str(),
                    known.join(", ")
                )));
            }
        }
        // Subjects are built from parsed UUIDs only: user text never becomes a subject token.
        let (filter_subject, actor) = match stream {
            StreamName::Users => {
                if self.chat.is_some() {
                    return Err(CliError::usage(
                        "--chat does not apply to the USERS stream (its subjects are users)",
                    ));
                }
                (self.user.map(|u| format!("users.{u}")), None)
            }
            StreamName::Chats => (self.chat.map(|c| format!("chats.{c}")), self.user),
            StreamName::Receipts => (self.chat.map(|c| format!("receipts.{c}")), self.user),
        };
        let start = match (self.from_seq, self.since) {
            (Some(seq), _) => Start::Sequence(seq),
            (None, Some(at)) => Start::Time(at),
            (None, None) => Start::First,
        };
        Ok(Plan {
            spec: ReplaySpec {
                stream: stream.as_str().to_owned(),
                filter_subject,
                start,
            },
            types: self.types.clone(),
            actor,
            until: self.until,
            to_seq: self.to_seq,
        })
    }
}

/// The envelope fields the client-side filters look at.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    ty: &'a str,
    #[serde(default)]
    actor: Option<Uuid>,
    #[serde(default, borrow)]
    data: Option<&'a serde_json::value::RawValue>,
}

impl Head<'_> {
    /// Whether `user` caused the event: its actor, or a device of theirs in a delivered batch
    /// (whose actor is the nil UUID when it holds several users').
    fn caused_by(&self, user: Uuid) -> bool {
        if self.actor == Some(user) {
            return true;
        }
        self.ty == ReceiptEvent::DELIVERED_BATCH_V1
            && self
                .data
                .and_then(|d| serde_json::from_str::<DeliveredBatch>(d.get()).ok())
                .is_some_and(|b| b.receipts.iter().any(|r| *r.user_id.as_uuid() == user))
    }
}

impl Plan {
    fn wants(&self, payload: &[u8]) -> bool {
        if self.types.is_empty() && self.actor.is_none() {
            return true;
        }
        let Ok(head) = serde_json::from_slice::<Head<'_>>(payload) else {
            // Not a CloudEvent: it matches no type or actor filter.
            return false;
        };
        (self.types.is_empty() || self.types.iter().any(|t| t == head.ty))
            && self.actor.is_none_or(|user| head.caused_by(user))
    }
}

/// Runs `parley replay`.
pub async fn run(args: ReplayArgs, nats_url: &str) -> Result<(), CliError> {
    let plan = args.plan()?;
    let js = super::connect_nats(nats_url).await?;
    let out: Box<dyn Write + Send> = match &args.output {
        Some(path) => Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let progress = !args.no_progress && std::io::stderr().is_terminal();
    replay(&js, &plan, args.follow, progress, out).await
}

/// Writes the plan's events to `out`, one JSON line each, exactly as stored.
pub async fn replay(
    js: &async_nats::jetstream::Context,
    plan: &Plan,
    follow: bool,
    progress: bool,
    out: Box<dyn Write + Send>,
) -> Result<(), CliError> {
    let mut replay = Replay::open(js, &plan.spec)
        .await
        .context("cannot open the replay")?;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, out);
    let total = replay.pending_at_open();
    let bar = (progress && total >= PROGRESS_FROM).then(|| bar(total));
    let mut caught_up = total == 0;
    if caught_up && !follow {
        return Ok(());
    }
    while let Some(next) = replay.next().await {
        let event = next.context("replay interrupted")?;
        if plan.to_seq.is_some_and(|to| event.stream_seq > to)
            || plan.until.is_some_and(|until| event.stored_at > until)
        {
            break;
        }
        if plan.wants(&event.payload) {
            let written = out
                .write_all(&event.payload)
                .and_then(|()| out.write_all(b"\n"));
            if stopped_reading(written)? {
                return Ok(());
            }
        }
        if let Some(bar) = &bar {
            bar.set_length(bar.position() + 1 + event.pending);
            bar.inc(1);
        }
        if event.pending == 0 {
            if !caught_up {
                caught_up = true;
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
            }
            if !follow {
                break;
            }
            // Following: whoever reads the output sees each new event as it comes.
            if stopped_reading(out.flush())? {
                return Ok(());
            }
        }
    }
    if stopped_reading(out.flush())? {
        return Ok(());
    }
    Ok(())
}

/// True when the reader went away (`parley replay | head`): not an error, just the end.
fn stopped_reading(r: std::io::Result<()>) -> Result<bool, CliError> {
    match r {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(true),
        Err(e) => Err(anyhow::Error::new(e)
            .context("cannot write the output")
            .into()),
    }
}

fn bar(total: u64) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{wide_bar} {human_pos}/{human_len} events, {per_sec}, ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()).with_style(style)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        args: ReplayArgs,
    }

    fn plan(argv: &[&str]) -> Result<Plan, CliError> {
        let mut all = vec!["t"];
        all.extend_from_slice(argv);
        T::try_parse_from(all).unwrap().args.plan()
    }

    #[test]
    fn a_chat_selects_its_subject_on_chats_and_receipts() {
        let id = Uuid::now_v7();
        let p = plan(&["--chat", &id.to_string()]).unwrap();
        assert_eq!(p.spec.stream, "CHATS");
        assert_eq!(p.spec.filter_subject, Some(format!("chats.{id}")));
        let p = plan(&["--stream", "receipts", "--chat", &id.to_string()]).unwrap();
        assert_eq!(p.spec.filter_subject, Some(format!("receipts.{id}")));
    }

    #[test]
    fn a_user_is_a_subject_on_users_and_an_actor_elsewhere() {
        let id = Uuid::now_v7();
        let p = plan(&["--user", &id.to_string()]).unwrap();
        assert_eq!(p.spec.stream, "USERS");
        assert_eq!(p.spec.filter_subject, Some(format!("users.{id}")));
        let p = plan(&["--stream", "CHATS", "--user", &id.to_string()]).unwrap();
        assert_eq!(p.spec.filter_subject, None);
        assert_eq!(p.actor, Some(id));
    }

    #[test]
    fn bad_selections_are_usage_errors() {
        let id = Uuid::now_v7().to_string();
        for argv in [
            vec![],
            vec!["--stream", "CHATS", "--type", "parley.user.registered.v1"],
            vec!["--stream", "USERS", "--chat", id.as_str()],
            vec!["--stream", "CHATS", "--from-seq", "9", "--to-seq", "3"],
            vec![
                "--stream",
                "CHATS",
                "--since",
                "2026-01-02T00:00:00Z",
                "--until",
                "2026-01-01T00:00:00Z",
            ],
        ] {
            let err = plan(&argv).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{argv:?}: {err}");
        }
    }

    #[test]
    fn filters_match_type_and_actor() {
        let actor = Uuid::now_v7();
        let p = plan(&[
            "--stream",
            "CHATS",
            "--type",
            ChatEvent::MESSAGE_SENT_V1,
            "--user",
            &actor.to_string(),
        ])
        .unwrap();
        let line = |ty: &str, a: Uuid| format!(r#"{{"type":"{ty}","actor":"{a}","data":{{}}}}"#);
        assert!(p.wants(line(ChatEvent::MESSAGE_SENT_V1, actor).as_bytes()));
        assert!(!p.wants(line(ChatEvent::CREATED_V1, actor).as_bytes()));
        assert!(!p.wants(line(ChatEvent::MESSAGE_SENT_V1, Uuid::now_v7()).as_bytes()));
        assert!(!p.wants(b"not json"));
    }

    #[test]
    fn a_user_selects_the_delivered_batches_that_hold_a_device_of_theirs() {
        let (bob, cy) = (Uuid::now_v7(), Uuid::now_v7());
        let p = plan(&["--stream", "RECEIPTS", "--user", &bob.to_string()]).unwrap();
        let batch = |users: &[Uuid]| {
            let receipts: Vec<String> = users
                .iter()
                .map(|u| {
                    format!(
                        r#"{{"user_id":"{u}","device_id":"{}","up_to":3}}"#,
                        Uuid::now_v7()
                    )
                })
                .collect();
            format!(
                r#"{{"type":"{}","actor":"{}","data":{{"receipts":[{}]}}}}"#,
                ReceiptEvent::DELIVERED_BATCH_V1,
                Uuid::nil(),
                receipts.join(",")
            )
        };
        assert!(p.wants(batch(&[cy, bob]).as_bytes()));
        assert!(!p.wants(batch(&[cy]).as_bytes()));
        // Only a delivered batch is looked into.
        let read = format!(
            r#"{{"type":"{}","actor":"{cy}","data":{{"receipts":[{{"user_id":"{bob}"}}]}}}}"#,
            ReceiptEvent::READ_V1
        );
        assert!(!p.wants(read.as_bytes()));
    }
}
