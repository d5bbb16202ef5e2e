//! Password hashing and verification (argon2id, the crate's recommended parameters), off the
//! async threads and at most one per core at a time.
//!
//! Each argon2id run holds 19 MiB and a core for tens of milliseconds. Unbounded, a burst of
//! sign-ups or logins would start one blocking thread each (tokio allows 512) and hold
//! 19 MiB per request: 50 at once took a process to 1.5 GiB of resident memory that the
//! allocator then kept. Bounded, the burst queues for a core instead, and a request that
//! waits longer than [`QUEUE_WAIT`] is told to come back (503) rather than held forever.

use std::sync::Arc;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};
use parley_schemas::Password;
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// How long a request may wait for a free core before it gets 503.
const QUEUE_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
}

impl Default for Passwords {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_concurrency(cores)
    }
}

impl Passwords {
    pub fn with_concurrency(n: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(n.max(1))),
        }
    }

    /// A PHC string for `password`, with a fresh salt.
    pub async fn hash(&self, password: Password) -> Result<String, ApiError> {
        self.run(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(password.expose().as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| ApiError::Internal(e.to_string()))
        })
        .await?
    }

    /// Whether `password` matches the stored PHC string (a malformed one matches nothing).
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
        let p = Passwords::with_concurrency(2);
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
        let p = Passwords::with_concurrency(1);
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
}
