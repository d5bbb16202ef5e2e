//! Parley push-gateway: `GET /v1/ws` delivers every chat event a device has not acked — first
//! its inbox replayed from PostgreSQL, then live from NATS — in order per chat, with no gap at
//! the seam (API.md, "Push gateway" and "Delivery guarantee").
//!
//! How a connection goes:
//! 0. Admit: an `Origin` outside `allowed_origins` is a 403, and an address over
//!    `max_connections_per_ip` a 429, both before the upgrade.
//! 1. Authenticate: `Authorization: Bearer` on the upgrade (a bad token is a 401 before the
//!    upgrade; over `max_connections_per_user` a 429), or a first text frame
//!    `{"type":"auth","token"}` within `auth_timeout` (else an `unauthorized` error frame and
//!    close code 4401).
//! 2. Subscribe to `notify.user.<user_id>`, read the device's chats and cursors, join each chat's
//!    shared live feed, flush (the subscriptions are now in effect), read each chat's latest
//!    stored sequence, then send `{"type":"ready"}`. From `ready` on, every event stored later
//!    arrives, and everything stored earlier above the cursor is replayed.
//! 3. Each chat's cursor sends exactly the next sequence, whether it comes live or from the
//!    read model; a later one is a gap, filled from PostgreSQL (retried while the projector
//!    lags). A removal is delivered, then the chat stops.
//!
//! Close codes: 1001 shutdown, 1008 slow consumer, 1009 frame too large, 1011 dependency down,
//! 4401 unauthorized or device revoked, 4408 idle, 4429 too many connections.
//!
//! Besides the socket: `receipt` frames (watermarks announced by the receipts projector, per
//! chat), `presence` (heartbeats in KV, see `presence`), and the HTTP inbox (`GET /v1/inbox`,
//! `POST /v1/inbox/ack`) for clients that cannot hold a socket.

mod acks;
mod connection;
mod gateway;
mod handler;
mod http;
mod hub;
mod inbox;
mod presence;
mod registry;
mod seam;
mod stop;
mod wire;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;

/// Limits and timings of the gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// How long a client without an `Authorization` header has to send its `auth` frame.
    pub auth_timeout: Duration,
    /// A connection with no frame from its client for this long is closed.
    pub idle_timeout: Duration,
    /// The largest frame (and message) a client may send; larger closes with 1009.
    pub max_frame_bytes: usize,
    /// Frames queued per connection. A client that falls this far behind the live feed is
    /// closed (1008, "slow consumer") and catches up from its inbox when it reconnects.
    pub queue_frames: usize,
    /// Open connections per user on one gateway process; more get 429.
    pub max_connections_per_user: usize,
    /// Open connections per client address (IPv4 address or IPv6 /64) on one gateway process,
    /// authenticated or not; more get 429. `None`: no limit.
    pub max_connections_per_ip: Option<usize>,
    /// Browser origins allowed to open a socket (`https://chat.example.com`, exact, case
    /// insensitive; `*` allows any). A request whose `Origin` header is not listed gets 403.
    /// Requests without `Origin` (native clients) are always allowed. `None`: any origin, which
    /// is safe only because sockets authenticate with a bearer token, never a cookie.
    pub allowed_origins: Option<Vec<String>>,
    /// Acks are batched (highest per device and chat) and published this often.
    pub ack_flush: Duration,
    /// Wait before asking PostgreSQL again for events it does not hold yet (projection lag);
    /// doubles on each fruitless try, up to 32 times this.
    pub catch_up_retry: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            auth_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_frame_bytes: 64 * 1024,
            queue_frames: 1024,
            max_connections_per_user: 20,
            max_connections_per_ip: Some(1000),
            allowed_origins: None,
            ack_flush: Duration::from_millis(100),
            catch_up_retry: Duration::from_millis(100),
        }
    }
}

/// The gateway's routes (`GET /v1/ws`, the HTTP inbox), with their state applied. Background
/// tasks start with the first connection and stop when `infra.shutdown` fires, which also
/// closes every socket.
pub fn router(infra: &parley_platform::Infra, config: GatewayConfig) -> Router {
    let state = Arc::new(gateway::Gateway::new(infra.clone(), config));
    Router::new()
        .route("/v1/ws", get(handler::upgrade))
        .merge(http::router())
        .with_state(state)
}

/// The OpenAPI description of the gateway's HTTP routes (the inbox; `/v1/ws` is described by
/// the binary next to them).
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    #[derive(OpenApi)]
    #[openapi(
        paths(http::read, http::ack),
        components(schemas(parley_platform::Problem)),
        tags((name = "inbox", description = "The calling device's unacked events, over HTTP"))
    )]
    struct InboxDoc;
    InboxDoc::openapi()
}
