//! Abuse limits of command-api: send rates per user and per IP, sign-up per IP, log-in per IP
//! and per handle (brute force), and the flood rule (one body sent to many chats). Each answers
//! 429 with `Retry-After` before any work or idempotency record is done.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use parley_platform::{KeyedLimit, Problem, Rate};
use parley_schemas::{ChatId, UserId};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// Rates (see `Rate` for the `N/s` notation) and the flood rule; `PARLEY_RATE_*` settings.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub send_per_user: Rate,
    pub send_per_ip: Rate,
    pub signup_per_ip: Rate,
    pub login_per_ip: Rate,
    pub login_per_handle: Rate,
    /// One body (of at least `FLOOD_MIN_CHARS`) may go to at most this many chats per window.
    pub flood_max_chats: usize,
    pub flood_window: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            send_per_user: Rate::per_second(20),
            send_per_ip: Rate::per_second(200),
            signup_per_ip: Rate::per_minute(20),
            login_per_ip: Rate::per_minute(60),
            login_per_handle: Rate::per_minute(10),
            flood_max_chats: 5,
            flood_window: Duration::from_secs(60),
        }
    }
}

impl LimitsConfig {
    /// No rate limits and no flood rule, for load tests and benchmarks.
    pub fn off() -> Self {
        Self {
            send_per_user: Rate::Off,
            send_per_ip: Rate::Off,
            signup_per_ip: Rate::Off,
            login_per_ip: Rate::Off,
            login_per_handle: Rate::Off,
            flood_max_chats: usize::MAX,
            flood_window: Duration::from_secs(1),
        }
    }
}

/// Short bodies ("ok", "thanks!") are legitimately sent to many chats; the flood rule ignores
/// them.
const FLOOD_MIN_CHARS: usize = 20;

/// The chats one body went to; shared so concurrent sends of it see each other.
type FloodChats = Arc<Mutex<HashSet<ChatId>>>;

/// The live limiters; cheap to clone.
#[derive(Clone)]
pub struct Limits {
    send_user: KeyedLimit<UserId>,
    send_ip: KeyedLimit<IpAddr>,
    signup_ip: KeyedLimit<IpAddr>,
    login_ip: KeyedLimit<IpAddr>,
    login_handle: KeyedLimit<String>,
    /// (sender, body hash) → the chats that body went to within the window.
    flood: moka::sync::Cache<(UserId, [u8; 32]), FloodChats>,
    flood_max_chats: usize,
    flood_window: Duration,
}

impl Limits {
    pub fn new(config: &LimitsConfig, shutdown: &CancellationToken) -> Self {
        Self {
            send_user: KeyedLimit::new("messages per user", config.send_per_user, shutdown),
            send_ip: KeyedLimit::new("messages per address", config.send_per_ip, shutdown),
            signup_ip: KeyedLimit::new("sign-ups per address", config.signup_per_ip, shutdown),
            login_ip: KeyedLimit::new("log-ins per address", config.login_per_ip, shutdown),
            login_handle: KeyedLimit::new("log-ins per handle", config.login_per_handle, shutdown),
            flood: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(config.flood_window)
                .build(),
            flood_max_chats: config.flood_max_chats,
            flood_window: config.flood_window,
        }
    }

    pub fn signup(&self, ip: Option<IpAddr>) -> Result<(), Problem> {
        ip.map_or(Ok(()), |ip| self.signup_ip.check(&ip))
    }

    /// Counted per attempt, before the password is checked, so guessing costs the attacker
    /// time whether or not it succeeds; a handle is case-sensitive already.
    pub fn login(&self, ip: Option<IpAddr>, handle: &str) -> Result<(), Problem> {
        if let Some(ip) = ip {
            self.login_ip.check(&ip)?;
        }
        self.login_handle.check(&handle.to_owned())
    }

    pub fn send(
        &self,
        ip: Option<IpAddr>,
        sender: UserId,
        chat: ChatId,
        body: &str,
    ) -> Result<(), Problem> {
        if let Some(ip) = ip {
            self.send_ip.check(&ip)?;
        }
        self.send_user.check(&sender)?;
        self.flood_check(sender, chat, body)
    }

    /// The same body to more than `flood_max_chats` distinct chats within the window is spam.
    /// Sending it again to a chat it already went to (a client retry) is not.
    fn flood_check(&self, sender: UserId, chat: ChatId, body: &str) -> Result<(), Problem> {
        if body.chars().count() < FLOOD_MIN_CHARS {
            return Ok(());
        }
        let digest: [u8; 32] = Sha256::digest(body.trim().as_bytes()).into();
        let chats = self.flood.get_with((sender, digest), Default::default);
        let mut chats = chats.lock().unwrap_or_else(|e| e.into_inner());
        if chats.contains(&chat) || chats.len() < self.flood_max_chats {
            chats.insert(chat);
            return Ok(());
        }
        Err(Problem::too_many(
            format!(
                "the same message went to {} chats already; this looks like spam",
                chats.len()
            ),
            self.flood_window.as_secs().max(1),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits(config: LimitsConfig) -> Limits {
        Limits::new(&config, &CancellationToken::new())
    }

    #[tokio::test]
    async fn one_long_body_to_too_many_chats_is_rejected_but_retries_and_short_bodies_pass() {
        let l = limits(LimitsConfig {
            send_per_user: Rate::Off,
            ..LimitsConfig::default()
        });
        let me = UserId::new();
        let spam = "buy cheap watches at example dot com";
        let chats: Vec<ChatId> = (0..6).map(|_| ChatId::new()).collect();
        for c in &chats[..5] {
            l.send(None, me, *c, spam).unwrap();
        }
        // A retry into a chat it already reached is fine.
        l.send(None, me, chats[0], spam).unwrap();
        let p = l.send(None, me, chats[5], spam).unwrap_err();
        assert_eq!(p.status, 429);
        assert_eq!(p.retry_after, Some(60));
        // Another sender, a different body and a short body are unaffected.
        l.send(None, UserId::new(), chats[5], spam).unwrap();
        l.send(None, me, chats[5], "a different long message body here")
            .unwrap();
        for _ in 0..20 {
            l.send(None, me, ChatId::new(), "ok!").unwrap();
        }
    }

    #[tokio::test]
    async fn login_is_limited_per_handle_across_addresses() {
        let l = limits(LimitsConfig {
            login_per_handle: Rate::per_minute(3),
            ..LimitsConfig::default()
        });
        for i in 0..3u8 {
            l.login(Some(IpAddr::from([10, 0, 0, i])), "alice").unwrap();
        }
        let p = l
            .login(Some(IpAddr::from([10, 0, 0, 9])), "alice")
            .unwrap_err();
        assert_eq!(p.status, 429);
        l.login(Some(IpAddr::from([10, 0, 0, 9])), "bob").unwrap();
    }
}
