//! `parley`: run any Parley service, or all of them in one process (`parley up`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use parley::cli::{CliError, projections::ProjectionsCmd, replay::ReplayArgs, stats::StatsArgs};
use parley::{App, Role, Settings, parse_duration, parse_size};
use parley_command_api::{AttachmentLimits, HashCost, LimitsConfig};
use parley_nats::JetStreamSettings;
use parley_platform::{InfraConfig, Rate};

/// mimalloc instead of glibc's malloc: a gateway's many small per-socket allocations pack
/// tighter (resident memory per idle socket), and allocation-heavy request paths spend less
/// time in the allocator. Measured in docs/benchmarks.md ("Session 5").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "parley", version, about = "Parley chat platform")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    opts: Opts,
}

/// Settings shared by every command; each has an environment variable.
#[derive(clap::Args)]
struct Opts {
    /// NATS server with JetStream.
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// PostgreSQL database of the read models.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "postgres://parley:parley@127.0.0.1:5432/parley"
    )]
    database_url: String,
    /// PostgreSQL pool size per process.
    #[arg(
        long,
        global = true,
        env = "PARLEY_PG_MAX_CONNECTIONS",
        default_value_t = 16
    )]
    pg_max_connections: u32,
    /// Retention of the CHATS stream (`0`: forever).
    #[arg(long, global = true, env = "PARLEY_CHATS_MAX_AGE", default_value = "30d", value_parser = parse_duration)]
    chats_max_age: Duration,
    /// Retention of the USERS stream (`0`: forever).
    #[arg(long, global = true, env = "PARLEY_USERS_MAX_AGE", default_value = "0", value_parser = parse_duration)]
    users_max_age: Duration,
    /// Retention of the RECEIPTS stream (`0`: forever).
    #[arg(long, global = true, env = "PARLEY_RECEIPTS_MAX_AGE", default_value = "30d", value_parser = parse_duration)]
    receipts_max_age: Duration,
    /// JetStream duplicate window for `Nats-Msg-Id`.
    #[arg(long, global = true, env = "PARLEY_DUPLICATE_WINDOW", default_value = "2m", value_parser = parse_duration)]
    duplicate_window: Duration,
    /// A user with no gateway heartbeat for this long is offline; gateways heartbeat every
    /// third of it.
    #[arg(long, global = true, env = "PARLEY_PRESENCE_TTL", default_value = "60s", value_parser = parse_duration)]
    presence_ttl: Duration,
    /// Stream replicas: 1 on one server, 3 on a cluster.
    #[arg(long, global = true, env = "PARLEY_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// Most members of a group.
    #[arg(
        long,
        global = true,
        env = "PARLEY_MAX_GROUP_MEMBERS",
        default_value_t = 100
    )]
    max_group_members: usize,
    /// Most members of a channel.
    #[arg(
        long,
        global = true,
        env = "PARLEY_MAX_CHANNEL_MEMBERS",
        default_value_t = 100_000
    )]
    max_channel_members: usize,
    /// Message keys command-api stores ahead of need, so a send does not wait for one (0: none).
    #[arg(
        long,
        global = true,
        env = "PARLEY_MESSAGE_KEY_POOL",
        default_value_t = 256
    )]
    message_key_pool: usize,
    /// argon2id cost of new password hashes, `m=<KiB>,t=<passes>,p=<lanes>`. Stored hashes keep
    /// their own. Lower only for tests and benchmarks.
    #[arg(
        long,
        global = true,
        env = "PARLEY_ARGON2_PARAMS",
        default_value = "m=19456,t=2,p=1"
    )]
    argon2_params: HashCost,
    /// How long a projector batch that is not full waits for more events after its first:
    /// the read models lag by up to this much; under steady traffic, one transaction per
    /// linger instead of one per event or two (0: no wait).
    #[arg(long, global = true, env = "PARLEY_PROJECTOR_LINGER", default_value = "20ms", value_parser = parse_duration)]
    projector_linger: Duration,
    /// How long a chat's receipt notices, and so its `receipt` frames, are merged after it
    /// announced some: each member's highest watermark once per interval, whatever the acks'
    /// rate (0: every move at once). A quiet chat's first moves go at once.
    #[arg(long, global = true, env = "PARLEY_RECEIPT_NOTICE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    receipt_notice_interval: Duration,
    #[command(flatten)]
    limits: LimitOpts,
    #[command(flatten)]
    attachments: AttachmentOpts,
    #[command(flatten)]
    gateway: GatewayOpts,
}

/// push-gateway's socket admission, per process.
#[derive(clap::Args)]
struct GatewayOpts {
    /// Open sockets per user.
    #[arg(
        long,
        global = true,
        env = "PARLEY_WS_MAX_CONNECTIONS_PER_USER",
        default_value_t = 20
    )]
    ws_max_connections_per_user: usize,
    /// Open sockets per client address (IPv4 address or IPv6 /64), or `off`.
    #[arg(long, global = true, env = "PARLEY_WS_MAX_CONNECTIONS_PER_IP", default_value = "1000", value_parser = parse_limit)]
    ws_max_connections_per_ip: Limit,
    /// Comma-separated browser origins allowed to open a socket (`*`: any). Unset: any.
    #[arg(
        long,
        global = true,
        env = "PARLEY_WS_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    ws_allowed_origins: Option<Vec<String>>,
    /// How often a gateway publishes its sockets' acks as delivered receipts (the highest per
    /// device and chat): longer means fewer `RECEIPTS` writes, later ticks.
    #[arg(long, global = true, env = "PARLEY_WS_ACK_FLUSH", default_value = "100ms", value_parser = parse_duration)]
    ws_ack_flush: Duration,
}

/// A count limit, or none (`off`).
#[derive(Clone, Copy)]
struct Limit(Option<usize>);

fn parse_limit(s: &str) -> Result<Limit, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Limit(None));
    }
    s.parse()
        .map(|n| Limit(Some(n)))
        .map_err(|_| format!("`{s}` is neither a count nor `off`"))
}

/// Largest attachment per kind (`16MiB`, `512KiB`, plain bytes, …).
#[derive(clap::Args)]
struct AttachmentOpts {
    /// image/* uploads.
    #[arg(long, global = true, env = "PARLEY_ATTACHMENT_MAX_IMAGE", default_value = "16MiB", value_parser = parse_size)]
    attachment_max_image: u64,
    /// audio/* uploads.
    #[arg(long, global = true, env = "PARLEY_ATTACHMENT_MAX_AUDIO", default_value = "16MiB", value_parser = parse_size)]
    attachment_max_audio: u64,
    /// video/* uploads.
    #[arg(long, global = true, env = "PARLEY_ATTACHMENT_MAX_VIDEO", default_value = "100MiB", value_parser = parse_size)]
    attachment_max_video: u64,
    /// Documents (PDF, zip, text).
    #[arg(long, global = true, env = "PARLEY_ATTACHMENT_MAX_DOCUMENT", default_value = "100MiB", value_parser = parse_size)]
    attachment_max_document: u64,
}

/// Abuse limits of command-api, per process (`N/s`, `N/m`, `N/h` or `off`).
#[derive(clap::Args)]
struct LimitOpts {
    /// Messages per user.
    #[arg(
        long,
        global = true,
        env = "PARLEY_RATE_SEND_PER_USER",
        default_value = "20/s"
    )]
    rate_send_per_user: Rate,
    /// Messages per client address.
    #[arg(
        long,
        global = true,
        env = "PARLEY_RATE_SEND_PER_IP",
        default_value = "200/s"
    )]
    rate_send_per_ip: Rate,
    /// Sign-ups per client address.
    #[arg(
        long,
        global = true,
        env = "PARLEY_RATE_SIGNUP_PER_IP",
        default_value = "20/m"
    )]
    rate_signup_per_ip: Rate,
    /// Log-in attempts per client address.
    #[arg(
        long,
        global = true,
        env = "PARLEY_RATE_LOGIN_PER_IP",
        default_value = "60/m"
    )]
    rate_login_per_ip: Rate,
    /// Log-in attempts per handle, whatever the address (brute force).
    #[arg(
        long,
        global = true,
        env = "PARLEY_RATE_LOGIN_PER_HANDLE",
        default_value = "10/m"
    )]
    rate_login_per_handle: Rate,
    /// One message body (20+ characters) may go to at most this many chats per minute.
    #[arg(
        long,
        global = true,
        env = "PARLEY_FLOOD_MAX_CHATS",
        default_value_t = 5
    )]
    flood_max_chats: usize,
}

impl LimitOpts {
    fn config(&self) -> LimitsConfig {
        LimitsConfig {
            send_per_user: self.rate_send_per_user,
            send_per_ip: self.rate_send_per_ip,
            signup_per_ip: self.rate_signup_per_ip,
            login_per_ip: self.rate_login_per_ip,
            login_per_handle: self.rate_login_per_handle,
            flood_max_chats: self.flood_max_chats,
            ..LimitsConfig::default()
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Every service in one process, on one address.
    Up {
        #[arg(long, env = "PARLEY_ADDR", default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
    },
    /// command-api alone.
    CommandApi {
        #[arg(long, env = "PARLEY_COMMAND_ADDR", default_value = "127.0.0.1:8081")]
        addr: SocketAddr,
    },
    /// query-api alone.
    QueryApi {
        #[arg(long, env = "PARLEY_QUERY_ADDR", default_value = "127.0.0.1:8082")]
        addr: SocketAddr,
    },
    /// push-gateway alone.
    PushGateway {
        #[arg(long, env = "PARLEY_GATEWAY_ADDR", default_value = "127.0.0.1:8083")]
        addr: SocketAddr,
    },
    /// The projectors alone (no listener).
    Projectors,
    /// Run the PostgreSQL migrations, then exit.
    Migrate,
    /// Create or update the JetStream streams and buckets, then exit.
    Streams,
    /// Print the OpenAPI document.
    Openapi,
    /// Write stored events as CloudEvents JSON lines, exactly as stored (docs/analysts.md).
    Replay(ReplayArgs),
    /// Projectors' status, and rebuilding a projection from the streams.
    #[command(subcommand)]
    Projections(ProjectionsCmd),
    /// A chat's hourly activity (messages, senders, median delivery latency) as CSV.
    Stats(StatsArgs),
}

impl Opts {
    fn settings(&self) -> Settings {
        let mut s = Settings {
            infra: InfraConfig {
                nats_url: self.nats_url.clone(),
                database_url: self.database_url.clone(),
                pg_max_connections: self.pg_max_connections,
                jetstream: JetStreamSettings {
                    chats_max_age: self.chats_max_age,
                    users_max_age: self.users_max_age,
                    receipts_max_age: self.receipts_max_age,
                    duplicate_window: self.duplicate_window,
                    replicas: self.replicas,
                    presence_ttl: self.presence_ttl,
                },
            },
            ..Default::default()
        };
        s.command.max_group_members = self.max_group_members;
        s.command.max_channel_members = self.max_channel_members;
        s.command.message_key_pool = self.message_key_pool;
        s.command.password_cost = self.argon2_params.clone();
        s.projectors.linger = self.projector_linger;
        s.projectors.receipt_notice_interval = self.receipt_notice_interval;
        s.command.limits = self.limits.config();
        s.gateway.max_connections_per_user = self.gateway.ws_max_connections_per_user;
        s.gateway.max_connections_per_ip = self.gateway.ws_max_connections_per_ip.0;
        s.gateway.ack_flush = self.gateway.ws_ack_flush;
        s.gateway.allowed_origins = self.gateway.ws_allowed_origins.as_ref().map(|list| {
            list.iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect()
        });
        s.command.attachment_limits = AttachmentLimits {
            image: self.attachments.attachment_max_image,
            audio: self.attachments.attachment_max_audio,
            video: self.attachments.attachment_max_video,
            document: self.attachments.attachment_max_document,
        };
        s
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    // The analyst and operator commands talk on stdout and stderr: only warnings are logged,
    // unless RUST_LOG asks for more.
    let quiet = matches!(
        cli.command,
        Cmd::Replay(_) | Cmd::Projections(_) | Cmd::Stats(_) | Cmd::Openapi
    );
    parley_platform::telemetry::init_with_default(if quiet { "warn" } else { "info" });
    let settings = cli.opts.settings();
    let (role, addr) = match cli.command {
        Cmd::Up { addr } => (Role::All, addr),
        Cmd::CommandApi { addr } => (Role::CommandApi, addr),
        Cmd::QueryApi { addr } => (Role::QueryApi, addr),
        Cmd::PushGateway { addr } => (Role::PushGateway, addr),
        Cmd::Projectors => (Role::Projectors, SocketAddr::from(([127, 0, 0, 1], 0))),
        Cmd::Migrate => {
            let pool = parley_platform::pg_pool(&settings.infra.database_url, 2)
                .await
                .context("connect to PostgreSQL")?;
            parley_platform::MIGRATOR
                .run(&pool)
                .await
                .context("migrate")?;
            tracing::info!("migrations applied");
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Cmd::Streams => {
            let client = parley_nats::connect(&settings.infra.nats_url)
                .await
                .context("connect to NATS")?;
            let js = parley_nats::context(client);
            parley_nats::ensure(&js, &settings.infra.jetstream).await?;
            tracing::info!("streams and buckets are in place");
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Cmd::Openapi => {
            let doc = parley::openapi().to_pretty_json()?;
            std::io::Write::write_all(&mut std::io::stdout(), doc.as_bytes())?;
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Cmd::Replay(args) => {
            let done = parley::cli::replay::run(args, &settings.infra.nats_url).await;
            return Ok(exit_code(done));
        }
        Cmd::Projections(cmd) => {
            let infra = &settings.infra;
            let done =
                parley::cli::projections::run(cmd, &infra.nats_url, &infra.database_url).await;
            return Ok(exit_code(done));
        }
        Cmd::Stats(args) => {
            let done = parley::cli::stats::run(args, &settings.infra.database_url).await;
            return Ok(exit_code(done));
        }
    };
    let shutdown = parley_platform::shutdown::on_signal();
    let app = App::build(settings, role, addr, shutdown).await?;
    app.run_until_stopped().await?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Exit codes of the analyst and operator commands: 2 for bad input, 1 for a failure.
fn exit_code(result: Result<(), CliError>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parley: {}", parley::cli::describe(&e));
            std::process::ExitCode::from(e.exit_code())
        }
    }
}
