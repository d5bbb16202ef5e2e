//! The `parley` binary's library: builds any service, or all of them on one address, from one
//! set of settings. Tests and `parley up` call the same `App::build`.

pub mod cli;

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use axum::serve::ListenerExt;
use parley_command_api::CommandConfig;
use parley_platform::{Infra, InfraConfig};
use parley_projectors::ProjectorConfig;
use parley_push_gateway::GatewayConfig;
use parley_query_api::QueryConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Every setting of every service.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub infra: InfraConfig,
    pub command: CommandConfig,
    pub query: QueryConfig,
    pub gateway: GatewayConfig,
    pub projectors: ProjectorConfig,
}

/// Which services one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything, HTTP and WebSocket on one address (`parley up`).
    All,
    CommandApi,
    QueryApi,
    PushGateway,
    /// Background consumers only; no listener.
    Projectors,
}

impl Role {
    fn serves_http(self) -> bool {
        self != Role::Projectors
    }
    fn runs_projectors(self) -> bool {
        matches!(self, Role::All | Role::Projectors)
    }
}

/// A built, not yet running, Parley process.
pub struct App {
    listener: Option<tokio::net::TcpListener>,
    router: Router,
    tracker: TaskTracker,
    infra: Infra,
}

impl App {
    /// Connects, sets up streams and migrations, starts background work, binds `addr` (port 0
    /// works).
    pub async fn build(
        settings: Settings,
        role: Role,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> anyhow::Result<App> {
        let infra = Infra::connect(&settings.infra, shutdown).await?;
        let tracker = TaskTracker::new();
        let mut router = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/v1/openapi.json", get(|| async { axum::Json(openapi()) }));
        if matches!(role, Role::All | Role::CommandApi) {
            router =
                router.merge(parley_command_api::router(&infra, settings.command.clone()).await?);
        }
        if matches!(role, Role::All | Role::QueryApi) {
            router = router.merge(parley_query_api::router(&infra, settings.query.clone()));
        }
        if matches!(role, Role::All | Role::PushGateway) {
            router = router.merge(parley_push_gateway::router(
                &infra,
                settings.gateway.clone(),
            ));
        }
        let router = router.fallback(parley_platform::problem::not_found_fallback);
        if role.runs_projectors() {
            parley_projectors::spawn(&infra, settings.projectors.clone(), &tracker).await?;
        }
        let listener = if role.serves_http() {
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?,
            )
        } else {
            None
        };
        Ok(App {
            listener,
            router,
            tracker,
            infra,
        })
    }

    /// Builds `role` on a free loopback port and serves it in the background until `shutdown`
    /// fires; returns the port. How tests run an in-process Parley.
    pub async fn spawn_on_loopback(
        settings: Settings,
        role: Role,
        shutdown: CancellationToken,
    ) -> anyhow::Result<u16> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let app = App::build(settings, role, addr, shutdown).await?;
        let port = app.port();
        tokio::spawn(app.run_until_stopped());
        Ok(port)
    }

    /// The bound port (0 when the role serves no HTTP).
    pub fn port(&self) -> u16 {
        self.listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
            .unwrap_or(0)
    }

    /// Serves until the shutdown token fires, then lets background work finish its batch.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let shutdown = self.infra.shutdown.clone();
        if let Some(listener) = self.listener {
            tracing::info!(addr = %listener.local_addr()?, "listening");
            let stop = shutdown.clone();
            // Connect info gives handlers the peer address for per-IP limits.
            let service = self
                .router
                .into_make_service_with_connect_info::<std::net::SocketAddr>();
            axum::serve(listener.tap_io(parley_platform::tcp::no_delay), service)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await?;
        } else {
            shutdown.cancelled().await;
        }
        self.tracker.close();
        self.tracker.wait().await;
        Ok(())
    }
}

/// The OpenAPI 3.1 document of every HTTP route, as served at `/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
    let mut doc = parley_command_api::openapi();
    doc.merge(parley_query_api::openapi());
    doc.merge(parley_push_gateway::openapi());
    doc.merge(ws_doc());
    doc.info.title = "Parley API".into();
    doc.info.version = "1".into();
    doc.info.description = Some(
        "Commands, queries and the WebSocket of Parley. Errors are RFC 9457 problem+json. \
         See API.md for the full contract."
            .into(),
    );
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    doc
}

fn ws_doc() -> utoipa::openapi::OpenApi {
    #[derive(utoipa::OpenApi)]
    #[openapi(paths(ws))]
    struct WsDoc;
    use utoipa::OpenApi;
    WsDoc::openapi()
}

/// WebSocket upgrade: frames are described in docs/delivery.md.
#[utoipa::path(get, path = "/v1/ws",
    description = "Upgrade to a WebSocket. Authenticate with `Authorization: Bearer`, or with a first text frame `{\"type\":\"auth\",\"token\":\"…\"}` within 5 s. Server frames: ready, newMessage, chatUpdate, receipt, presence, typing, pong, error. Client frames: ack, typing, ping.",
    responses(
        (status = 101, description = "switching protocols"),
        (status = 401, body = parley_platform::Problem, description = "bad token in the header"),
        (status = 403, body = parley_platform::Problem, description = "the `Origin` header names an origin outside `PARLEY_WS_ALLOWED_ORIGINS`"),
        (status = 429, body = parley_platform::Problem, description = "too many connections for this user or this client address (IPv4 address or IPv6 /64); `Retry-After` says when to try again"),
    ))]
#[allow(dead_code)]
async fn ws() {}

/// Parses durations like `30d`, `2m`, `500ms`; `0` means "forever" for retention.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Parses byte sizes like `16MiB`, `512KiB`, `1GiB` or plain bytes (`1048576`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 16MiB"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (B, KiB, MiB, GiB)")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod size_tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_units_or_plain_bytes() {
        assert_eq!(parse_size("16MiB"), Ok(16 * 1024 * 1024));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("16MB").is_err());
        assert!(parse_size("MiB").is_err());
    }
}
