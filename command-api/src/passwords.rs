//! Password hashing and verification (argon2id; the crate's recommended parameters unless
//! configured), off the async threads and at most one per core at a time.
//!
//! Each argon2id run holds 19 MiB and a core for tens of milliseconds. Unbounded, a burst of
//! sign-ups or logins would start one blocking thread each (tokio allows 512) and hold
//! 19 MiB per request: 50 at once took a process to 1.5 GiB of resident memory that the
//! allocator then kept. Bounded, the burst queues for a core instead, and a request that
//! waits longer than [`QUEUE_WAIT`] is told to come back (503) rather than held forever.

use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};
use argon2::{Algorithm, Argon2, Params, Version};
use parley_schemas::Password;
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// How long a request may wait for a free core before it gets 503.
const QUEUE_WAIT: Duration = Duration::from_secs(10);

/// The argon2id cost of new hashes (`PARLEY_ARGON2_PARAMS`, `m=<KiB>,t=<passes>,p=<lanes>`).
///
/// It applies to hashes made from now on. A stored hash carries its own parameters in its PHC
/// string and verifies with those, so changing the setting never locks anyone out. Only tests
/// and benchmarks, whose sign-ups are setup rather than what they measure, should go below the
/// default (19 MiB, 2 passes, 1 lane: the crate's and OWASP's recommendation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashCost(Params);

impl HashCost {
    /// Weaker than the recommended default: memory × passes below 19 MiB × 2.
    pub fn below_recommended(&self) -> bool {
        let d = Params::default();
        u64::from(self.0.m_cost()) * u64::from(self.0.t_cost())
            < u64::from(d.m_cost()) * u64::from(d.t_cost())
    }
}

impl std::str::FromStr for HashCost {
    type Err = String;

    /// `m=19456,t=2,p=1`: the notation of the PHC strings the hashes are stored as. Every key
    /// is required once; argon2's own bounds apply (m ≥ 8 × p KiB, t ≥ 1, 1 ≤ p < 2^24).
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut m, mut t, mut p) = (None, None, None);
        for part in s.split(',') {
            let (key, value) = part
                .trim()
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value"))?;
            let value: u32 = value
                .parse()
                .map_err(|_| format!("{key}={value:?} is not a whole number"))?;
            let slot = match key {
                "m" => &mut m,
                "t" => &mut t,
                "p" => &mut p,
                other => return Err(format!("unknown key {other:?}; expected m, t and p")),
            };
            if slot.replace(value).is_some() {
                return Err(format!("{key} given twice"));
            }
        }
        let (Some(m), Some(t), Some(p)) = (m, t, p) else {
            return Err("expected m=<KiB>,t=<passes>,p=<lanes>".into());
        };
        Params::new(m, t, p, None)
            .map(Self)
            .map_err(|e| format!("argon2 rejects m={m},t={t},p={p}: {e}"))
    }
}

impl std::fmt::Display for HashCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "m={},t={},p={}",
            self.0.m_cost(),
            self.0.t_cost(),
            self.0.p_cost()
        )
    }
}

#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    cost: HashCost,
}

impl Passwords {
    /// Hashes of `cost`, as many at once as there are cores.
    pub fn new(cost: HashCost) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_concurrency(cost, cores)
    }

    pub fn with_concurrency(cost: HashCost, n: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(n.max(1))),
            cost,
        }
    }

    /// A PHC string for `password`, with a fresh salt.
    pub async fn hash(&self, password: Password) -> Result<String, ApiError> {
        let params = self.cost.0.clone();
        self.run(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password(password.expose().as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| ApiError::Internal(e.to_string()))
        })
        .await?
    }

    /// Whether `password` matches the stored PHC string (a malformed one matches nothing), with
    /// the parameters that string names, whatever the configured cost.
    pub async fn verify(&self, password: String, phc: String) -> Result<bool, ApiError> {
        self.run(move || {
            PasswordHash::new(&phc).is_ok_and(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
        })
        .await
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = tokio::time::timeout(QUEUE_WAIT, Arc::clone(&self.permits).acquire_owned())
            .await
            .map_err(|_| ApiError::Busy("too many sign-ups and logins at once; retry"))?
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
    }

    /// Hashes that could start now without waiting.
    #[cfg(test)]
    fn free(&self) -> usize {
        self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_its_password_and_no_other() {
        let p = Passwords::with_concurrency(HashCost::default(), 2);
        let phc = p
            .hash(Password::parse("correct horse").unwrap())
            .await
            .unwrap();
        assert!(p.verify("correct horse".into(), phc.clone()).await.unwrap());
        assert!(!p.verify("wrong horse".into(), phc).await.unwrap());
        assert!(
            !p.verify("x".into(), "not a phc string".into())
                .await
                .unwrap()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_hashes_run_at_once_than_permitted() {
        let p = Passwords::with_concurrency(HashCost::default(), 1);
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (p, running, most) = (p.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    p.run(move || {
                        let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                        // Real work, long enough for the others to try to start meanwhile.
                        let _ = Argon2::default()
                            .hash_password(b"pw", &SaltString::generate(&mut OsRng));
                        running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    })
                    .await
                    .unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(p.free(), 1);
    }

    #[tokio::test]
    async fn new_hashes_take_the_configured_cost_and_old_ones_verify_with_their_own() {
        let cheap: HashCost = "m=64,t=1,p=1".parse().unwrap();
        let old = Passwords::with_concurrency(HashCost::default(), 1)
            .hash(Password::parse("correct horse").unwrap())
            .await
            .unwrap();
        assert!(old.contains("$m=19456,t=2,p=1$"), "{old}");
        let p = Passwords::with_concurrency(cheap, 1);
        let new = p
            .hash(Password::parse("correct horse").unwrap())
            .await
            .unwrap();
        assert!(new.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{new}");
        // Changing the setting locks nobody out: each hash verifies with its own parameters.
        assert!(p.verify("correct horse".into(), old.clone()).await.unwrap());
        assert!(!p.verify("wrong horse".into(), old).await.unwrap());
        let strong = Passwords::with_concurrency(HashCost::default(), 1);
        assert!(strong.verify("correct horse".into(), new).await.unwrap());
    }

    #[test]
    fn the_cost_setting_reads_phc_notation_and_refuses_what_argon2_would() {
        let c: HashCost = " m=19456, t=2 ,p=1".parse().unwrap();
        assert_eq!(c, HashCost::default());
        assert_eq!(c.to_string(), "m=19456,t=2,p=1");
        assert!(!c.below_recommended());
        assert!(
            !"m=47104,t=1,p=1"
                .parse::<HashCost>()
                .unwrap()
                .below_recommended()
        );
        assert!(
            "m=64,t=1,p=1"
                .parse::<HashCost>()
                .unwrap()
                .below_recommended()
        );
        assert!(
            "m=8,t=1,p=1"
                .parse::<HashCost>()
                .unwrap()
                .below_recommended()
        );
        for bad in [
            "",
            "m=64,t=1",
            "m=64,t=1,p=1,x=2",
            "m=64,t=1,p=1,m=64",
            "m=64;t=1;p=1",
            "m=lots,t=1,p=1",
            "m=4,t=1,p=1",
            "m=64,t=0,p=1",
            "m=64,t=1,p=0",
        ] {
            assert!(bad.parse::<HashCost>().is_err(), "{bad:?} was accepted");
        }
    }
}
