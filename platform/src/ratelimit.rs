//! Keyed rate limits (GCRA, from governor) that answer 429 problem+json with `Retry-After`.
//!
//! Limits are per process: with N instances behind a balancer a client gets up to N times the
//! rate. That is the usual trade (no shared counter on the hot path); docs/reliability.md says so.

use std::fmt;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use crate::problem::Problem;

/// A rate: `count` events per `period`, with bursts of up to `count`. Written `20/s`, `5/m`,
/// `100/h`, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Off,
    Every { count: NonZeroU32, period: Duration },
}

impl Rate {
    pub fn per_second(count: u32) -> Rate {
        Self::every(count, Duration::from_secs(1))
    }
    pub fn per_minute(count: u32) -> Rate {
        Self::every(count, Duration::from_secs(60))
    }
    fn every(count: u32, period: Duration) -> Rate {
        match NonZeroU32::new(count) {
            Some(count) => Rate::Every { count, period },
            None => Rate::Off,
        }
    }
    fn quota(self) -> Option<Quota> {
        match self {
            Rate::Off => None,
            Rate::Every { count, period } => {
                let interval = period / count.get();
                Quota::with_period(interval.max(Duration::from_nanos(1)))
                    .map(|q| q.allow_burst(count))
            }
        }
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Rate, String> {
        if s == "off" {
            return Ok(Rate::Off);
        }
        let bad = || format!("`{s}`: expected N/s, N/m, N/h or off");
        let (count, unit) = s.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Rate::every(count, period))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Off => f.write_str("off"),
            Rate::Every { count, period } => {
                let unit = match period.as_secs() {
                    1 => "s",
                    60 => "m",
                    _ => "h",
                };
                write!(f, "{count}/{unit}")
            }
        }
    }
}

/// One named limit over keys of type `K` (a user id, an IP address, a handle).
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    what: &'static str,
    limiter: Option<Arc<DefaultKeyedRateLimiter<K>>>,
}

impl<K: Hash + Eq + Clone> Clone for KeyedLimit<K> {
    fn clone(&self) -> Self {
        Self {
            what: self.what,
            limiter: self.limiter.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> KeyedLimit<K> {
    /// `what` names the limit in the 429's detail ("messages per user", …). The key table is
    /// pruned every minute until `shutdown`, so idle keys do not accumulate.
    pub fn new(what: &'static str, rate: Rate, shutdown: &CancellationToken) -> Self {
        let limiter = rate.quota().map(|q| Arc::new(RateLimiter::keyed(q)));
        if let Some(l) = &limiter {
            let l = Arc::downgrade(l);
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let Some(l) = l.upgrade() else { return };
                    l.retain_recent();
                    l.shrink_to_fit();
                }
            });
        }
        Self { what, limiter }
    }

    /// Takes one unit for `key`, or answers 429 with the whole seconds until one is free.
    pub fn check(&self, key: &K) -> Result<(), Problem> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Problem::too_many(format!("rate limit: {}", self.what), retry_secs(wait))
        })
    }
}

/// `Retry-After` is whole seconds; never 0, so a client that obeys it does not spin.
fn retry_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rates_parse_and_print() {
        for s in ["20/s", "5/m", "100/h", "off"] {
            assert_eq!(s.parse::<Rate>().unwrap().to_string(), s);
        }
        assert_eq!("0/s".parse::<Rate>().unwrap(), Rate::Off);
        for bad in ["", "5", "5/d", "x/s", "-1/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn retry_after_is_at_least_one_second_and_rounds_up() {
        assert_eq!(retry_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_secs(Duration::from_secs(3)), 3);
    }

    #[tokio::test]
    async fn a_burst_is_allowed_then_429_with_retry_after_per_key() {
        let stop = CancellationToken::new();
        let limit = KeyedLimit::new("things per user", Rate::per_minute(3), &stop);
        for _ in 0..3 {
            limit.check(&"a").unwrap();
        }
        let p = limit.check(&"a").unwrap_err();
        assert_eq!(p.status, 429);
        assert!(p.detail.contains("things per user"));
        // One unit comes back every 20 s.
        assert!((1..=20).contains(&p.retry_after.unwrap()));
        // Another key has its own budget.
        limit.check(&"b").unwrap();
        stop.cancel();
    }

    #[tokio::test]
    async fn off_never_limits() {
        let stop = CancellationToken::new();
        let limit = KeyedLimit::new("x", Rate::Off, &stop);
        for _ in 0..10_000 {
            limit.check(&1u8).unwrap();
        }
    }
}
