//! Presence and last seen in KV: the gateways write heartbeats, query-api reads them.
//!
//! Two buckets, one key per user (`<user_id>`), the same value (`{"at": …}`, the heartbeat's
//! time): `presence` expires entries after the TTL, so a key that is there (and fresh) means
//! online, whatever happened to the gateway that wrote it; `last_seen` has no TTL, so the last
//! heartbeat survives going offline. A heartbeat is one put to each, per user and period,
//! however many connections the user has on that gateway.

use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use parley_schemas::UserId;
use serde::{Deserialize, Serialize};

use crate::setup::{Buckets, subjects};

/// The value of both buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// When the gateway last saw the user connected.
    pub at: DateTime<Utc>,
}

/// A user's presence as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub online: bool,
    /// The latest heartbeat; `None` for a user never seen connected.
    pub last_seen_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("cannot write a heartbeat: {0}")]
    Put(#[from] kv::PutError),
    #[error("cannot read presence: {0}")]
    Read(#[from] kv::EntryError),
}

/// How often a gateway heartbeats its connected users: a third of the TTL, so one lost
/// heartbeat does not make anybody look offline.
pub fn heartbeat_period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// Writes `user`'s heartbeat to both buckets.
pub async fn heartbeat(
    buckets: &Buckets,
    user: UserId,
    at: DateTime<Utc>,
) -> Result<(), PresenceError> {
    let value: bytes::Bytes = serde_json::to_vec(&Heartbeat { at })
        .unwrap_or_default()
        .into();
    let key = user.to_string();
    let (p, l) = tokio::join!(
        buckets.presence.put(&key, value.clone()),
        buckets.last_seen.put(&key, value)
    );
    p?;
    l?;
    Ok(())
}

/// Records that `user` was seen at `at` without claiming it is online (its last connection on
/// a gateway closed): `last_seen_at` is then the moment it left, not its last heartbeat.
pub async fn left(buckets: &Buckets, user: UserId, at: DateTime<Utc>) -> Result<(), PresenceError> {
    let value = serde_json::to_vec(&Heartbeat { at }).unwrap_or_default();
    buckets
        .last_seen
        .put(user.to_string(), value.into())
        .await?;
    Ok(())
}

/// Reads `user`'s presence at `now`. Online needs a heartbeat younger than the TTL: the bucket
/// expires old entries, but not to the millisecond.
pub async fn read(
    buckets: &Buckets,
    user: UserId,
    now: DateTime<Utc>,
) -> Result<Seen, PresenceError> {
    let key = user.to_string();
    let (p, l) = tokio::join!(buckets.presence.get(&key), buckets.last_seen.get(&key));
    let live = p?.as_deref().and_then(decode);
    let kept = l?.as_deref().and_then(decode);
    Ok(seen(live, kept, buckets.presence_ttl, now))
}

/// The pure part of [`read`].
pub fn seen(
    live: Option<Heartbeat>,
    kept: Option<Heartbeat>,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Seen {
    let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    let online = live.is_some_and(|h| now.signed_duration_since(h.at) < ttl);
    let last_seen_at = match (live, kept) {
        (Some(a), Some(b)) => Some(a.at.max(b.at)),
        (a, b) => a.or(b).map(|h| h.at),
    };
    Seen {
        online,
        last_seen_at,
    }
}

/// A heartbeat's value; `None` for anything else (a delete marker has an empty payload).
pub fn decode(payload: &[u8]) -> Option<Heartbeat> {
    serde_json::from_slice(payload).ok()
}

/// The user a heartbeat subject (`$KV.presence.<user_id>`) is about.
pub fn user_of_subject(subject: &str) -> Option<UserId> {
    UserId::parse(subject.strip_prefix(subjects::PRESENCE_PREFIX)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Heartbeat {
        Heartbeat {
            at: DateTime::from_timestamp(secs, 0).unwrap_or_default(),
        }
    }

    #[test]
    fn a_fresh_heartbeat_is_online_and_a_stale_one_is_not() {
        let ttl = Duration::from_secs(60);
        let now = at(1000).at;
        assert!(seen(Some(at(990)), Some(at(990)), ttl, now).online);
        let stale = seen(Some(at(900)), Some(at(900)), ttl, now);
        assert!(!stale.online);
        assert_eq!(stale.last_seen_at, Some(at(900).at));
    }

    #[test]
    fn last_seen_survives_the_expiry_of_the_presence_entry_and_takes_the_latest_time() {
        let ttl = Duration::from_secs(60);
        let now = at(5000).at;
        let gone = seen(None, Some(at(100)), ttl, now);
        assert_eq!((gone.online, gone.last_seen_at), (false, Some(at(100).at)));
        let both = seen(Some(at(4990)), Some(at(4995)), ttl, now);
        assert_eq!((both.online, both.last_seen_at), (true, Some(at(4995).at)));
        assert_eq!(seen(None, None, ttl, now).last_seen_at, None);
    }

    #[test]
    fn only_heartbeat_subjects_with_a_user_id_name_a_user() {
        let user = UserId::new();
        assert_eq!(user_of_subject(&format!("$KV.presence.{user}")), Some(user));
        assert_eq!(user_of_subject("$KV.presence.nope"), None);
        assert_eq!(user_of_subject(&format!("$KV.last_seen.{user}")), None);
    }
}
