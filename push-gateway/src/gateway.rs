//! The gateway's shared state (`AppState`): cheap handles every connection uses, and the
//! process-wide tasks (revocation listener, membership notice router, ack flusher, presence)
//! started with the first connection (or the first inbox call).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::stream::Stream;
use futures::StreamExt;
use parley_nats::{streams, subjects};
use parley_platform::Infra;
use tokio::sync::{OnceCell, Semaphore};

use crate::GatewayConfig;
use crate::acks::AckBatcher;
use crate::hub::{ConnId, Hub};
use crate::presence::Presence;
use crate::registry::Registry;
use crate::stop::StopReason;
use crate::wire::{DeviceRevoked, MembershipNotice};

pub(crate) type AppState = Arc<Gateway>;

pub(crate) struct Gateway {
    /// NATS, JetStream, PostgreSQL, tokens, shutdown.
    pub infra: Infra,
    pub config: GatewayConfig,
    /// Shared live subscriptions, one per chat.
    pub hub: Arc<Hub>,
    /// Connections per user and per device.
    pub registry: Arc<Registry>,
    /// Acks waiting for the next flush to `RECEIPTS`.
    pub acks: Arc<AckBatcher>,
    /// Heartbeats of the users connected here; presence frames about their contacts.
    pub presence: Arc<Presence>,
    /// Bounds the catch-up queries of all connections together, so a burst of reconnects
    /// queues here instead of timing out on the pool that other services share.
    pub pg_permits: Arc<Semaphore>,
    background: OnceCell<Background>,
    next_conn: AtomicU64,
}

/// Started once, on first use: `router()` is synchronous and may run outside a runtime.
pub(crate) struct Background {
    /// The `CHATS` stream, to read a chat's latest stored sequence.
    pub chats: Stream<()>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("cannot subscribe to device revocations: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("cannot flush the NATS connection: {0}")]
    Flush(#[from] async_nats::client::FlushError),
    #[error("cannot open the CHATS stream: {0}")]
    Stream(#[from] async_nats::jetstream::context::GetStreamError),
}

impl Gateway {
    pub(crate) fn new(infra: Infra, config: GatewayConfig) -> Self {
        let pool_size = infra.pg.options().get_max_connections() as usize;
        Self {
            hub: Hub::new(
                infra.nats.clone(),
                infra.keys.clone(),
                infra.shutdown.clone(),
            ),
            registry: Registry::new(
                config.max_connections_per_user,
                config.max_connections_per_ip,
            ),
            acks: Arc::new(AckBatcher::default()),
            presence: Presence::new(infra.buckets.clone()),
            pg_permits: Arc::new(Semaphore::new((pool_size / 2).max(1))),
            background: OnceCell::new(),
            next_conn: AtomicU64::new(1),
            infra,
            config,
        }
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The process-wide tasks, started by the first caller. Revocations are subscribed before
    /// any connection is admitted, so none can miss its own revocation.
    pub(crate) async fn background(&self) -> Result<&Background, StartError> {
        self.background
            .get_or_try_init(|| async {
                let nats = &self.infra.nats;
                let revoked = nats.subscribe(subjects::DEVICE_REVOKED).await?;
                let notices = nats.subscribe(subjects::NOTIFY_USERS).await?;
                nats.flush().await?;
                let shutdown = self.infra.shutdown.clone();
                let registry = Arc::clone(&self.registry);
                tokio::spawn(listen(
                    revoked,
                    shutdown.clone(),
                    || {},
                    move |msg| match serde_json::from_slice::<DeviceRevoked>(&msg.payload) {
                        Ok(r) => {
                            let closed = registry.revoke(r.device_id);
                            tracing::debug!(device = %r.device_id, closed, "device revoked");
                        }
                        Err(error) => tracing::warn!(%error, "malformed revocation notice"),
                    },
                ));
                // The subscription is in effect before any connection is admitted, and a
                // connection is listed before it reads its memberships, so a chat joined
                // meanwhile reaches it one way or the other.
                let registry = Arc::clone(&self.registry);
                let on_end = {
                    let registry = Arc::clone(&registry);
                    // Only a closed client ends a subscription: no connection would hear of a
                    // new chat.
                    move || registry.stop_all(StopReason::Unavailable)
                };
                tokio::spawn(listen(notices, shutdown, on_end, move |msg| {
                    route_notice(&registry, &msg);
                }));
                tokio::spawn(Arc::clone(&self.acks).run(
                    self.infra.js.clone(),
                    self.config.ack_flush,
                    self.infra.shutdown.clone(),
                ));
                tokio::spawn(
                    Arc::clone(&self.presence)
                        .run(self.infra.nats.clone(), self.infra.shutdown.clone()),
                );
                let chats = self.infra.js.get_stream_no_info(streams::CHATS).await?;
                Ok(Background { chats })
            })
            .await
    }
}

/// Handles each message of a process-wide subscription until shutdown; `on_end` runs if the
/// subscription itself ends.
async fn listen(
    mut sub: async_nats::Subscriber,
    shutdown: tokio_util::sync::CancellationToken,
    on_end: impl FnOnce(),
    mut on_msg: impl FnMut(async_nats::Message),
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            msg = sub.next() => match msg {
                Some(msg) => on_msg(msg),
                None => return on_end(),
            },
        }
    }
}

/// Routes a `notify.user.<user_id>` notice to that user's connections here.
fn route_notice(registry: &Registry, msg: &async_nats::Message) {
    let user = msg
        .subject
        .strip_prefix(subjects::NOTIFY_USER_PREFIX)
        .and_then(|id| parley_schemas::UserId::parse(id).ok());
    match (
        user,
        serde_json::from_slice::<MembershipNotice>(&msg.payload),
    ) {
        (Some(user), Ok(notice)) => {
            registry.notify(user, notice);
        }
        (user, notice) => tracing::warn!(
            subject = %msg.subject,
            user_ok = user.is_some(),
            notice_ok = notice.is_ok(),
            "malformed membership notice; ignored"
        ),
    }
}
