//! Why a connection ends, and the one-shot signal other tasks (the live hub, revocation,
//! shutdown) use to end it from outside, with the close code the client sees.

use std::sync::OnceLock;

use axum::extract::ws::{CloseFrame, Utf8Bytes};
use tokio_util::sync::CancellationToken;

/// Close codes in the 4000–4999 private range mirror the HTTP status they stand for.
pub(crate) mod code {
    pub(crate) const GOING_AWAY: u16 = 1001;
    pub(crate) const POLICY: u16 = 1008;
    pub(crate) const TOO_BIG: u16 = 1009;
    pub(crate) const INTERNAL: u16 = 1011;
    pub(crate) const UNAUTHORIZED: u16 = 4401;
    pub(crate) const IDLE: u16 = 4408;
    pub(crate) const TOO_MANY: u16 = 4429;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// The process is stopping.
    Shutdown,
    /// The device was removed: its token no longer works.
    Revoked,
    /// The connection's queue overflowed: the client does not read fast enough.
    SlowConsumer,
    /// No frame from the client for `idle_timeout`.
    Idle,
    /// The client sent a frame over `max_frame_bytes`.
    Oversized,
    /// The client closed, or the socket failed: nothing more can be sent.
    ClientGone,
    /// NATS or PostgreSQL failed in a way this connection cannot recover from.
    Unavailable,
}

impl StopReason {
    /// The close frame to send, if the socket can still take one.
    pub(crate) fn close_frame(self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            StopReason::Shutdown => (code::GOING_AWAY, "server shutting down"),
            StopReason::Revoked => (code::UNAUTHORIZED, "device revoked"),
            StopReason::SlowConsumer => (code::POLICY, "slow consumer"),
            StopReason::Idle => (code::IDLE, "idle timeout"),
            StopReason::Oversized => (code::TOO_BIG, "frame too large"),
            StopReason::Unavailable => (code::INTERNAL, "dependency unavailable"),
            StopReason::ClientGone => return None,
        };
        Some(close(code, reason))
    }
}

pub(crate) fn close(code: u16, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }
}

/// Ends one connection from any task. The first reason given wins.
#[derive(Debug)]
pub(crate) struct Stopper {
    token: CancellationToken,
    reason: OnceLock<StopReason>,
}

impl Stopper {
    /// `token` is a child of the process shutdown token, so shutdown stops every connection.
    pub(crate) fn new(token: CancellationToken) -> Self {
        Self {
            token,
            reason: OnceLock::new(),
        }
    }

    pub(crate) fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Why it stopped; a cancelled token without a reason is the parent: shutdown.
    pub(crate) fn reason(&self) -> StopReason {
        self.reason.get().copied().unwrap_or(StopReason::Shutdown)
    }
}
