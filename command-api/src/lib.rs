//! command-api: HTTP → decide → append. Handlers validate input, call a pure decider through
//! the event store, and answer from what was appended; they never touch the read models except
//! to check a reply target.

pub mod domain;
mod error;
mod http;
mod idempotency;
mod limits;
mod passwords;
mod state;

use std::time::Duration;

pub use error::ApiError;
pub use http::attachments::AttachmentLimits;
pub use http::openapi;
pub use limits::LimitsConfig;
pub use passwords::HashCost;
pub use state::{APPENDS_CONNECTION, CommandState};

/// Limits and tuning of command-api (`PARLEY_*` settings; see README).
#[derive(Debug, Clone)]
pub struct CommandConfig {
    pub max_group_members: usize,
    pub max_channel_members: usize,
    pub max_devices: usize,
    /// Aggregates kept in memory per kind.
    pub cache_capacity: u64,
    /// How soon a changed aggregate gets a snapshot.
    pub snapshot_interval: Duration,
    /// Message keys stored ahead of need ([`parley_nats::KeyPool`]); 0 makes each send write
    /// its own key first.
    pub message_key_pool: usize,
    /// Largest JSON request body.
    pub max_body_bytes: usize,
    /// Rate limits and the flood rule.
    pub limits: LimitsConfig,
    /// Largest upload per kind of attachment.
    pub attachment_limits: AttachmentLimits,
    /// argon2id cost of new password hashes.
    pub password_cost: HashCost,
}

impl Default for CommandConfig {
    fn default() -> Self {
        Self {
            max_group_members: 100,
            max_channel_members: 100_000,
            max_devices: 5,
            cache_capacity: 100_000,
            snapshot_interval: Duration::from_secs(5),
            message_key_pool: 256,
            max_body_bytes: 64 * 1024,
            limits: LimitsConfig::default(),
            attachment_limits: AttachmentLimits::default(),
            password_cost: HashCost::default(),
        }
    }
}

/// The command routes, state applied.
pub async fn router(
    infra: &parley_platform::Infra,
    config: CommandConfig,
) -> Result<axum::Router, ApiError> {
    let state = CommandState::new(infra, config).await?;
    Ok(http::router(state))
}
