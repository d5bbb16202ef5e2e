//! Bearer tokens: opaque random strings; the `sessions` KV bucket maps sha256(token) to the
//! device it belongs to. Every service checks tokens the same way, through a moka cache that a
//! KV watch invalidates, so a removed device's token stops working everywhere at once.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use futures::StreamExt;
use parley_schemas::{DeviceId, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::problem::Problem;

/// Who is calling: one device of one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub user_id: UserId,
    pub device_id: DeviceId,
}

/// The value stored under a token's key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub user_id: UserId,
    pub device_id: DeviceId,
}

/// The KV key for a token: its sha256 in hex. The token itself is never stored.
pub fn token_key(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing or malformed bearer token")]
    Missing,
    #[error("unknown or revoked token")]
    Invalid,
    #[error("session store unavailable: {0}")]
    Unavailable(String),
}

impl From<AuthError> for Problem {
    fn from(e: AuthError) -> Problem {
        match e {
            AuthError::Missing => Problem::unauthorized("send Authorization: Bearer <token>"),
            AuthError::Invalid => Problem::unauthorized("unknown or revoked token"),
            AuthError::Unavailable(cause) => {
                tracing::warn!(%cause, "token check failed");
                Problem::unavailable("session store unavailable", 1)
            }
        }
    }
}

/// Checks tokens; cheap to clone (two reference counts: every request's `Principal` extraction
/// clones it).
#[derive(Clone)]
pub struct Authenticator {
    sessions: Arc<kv::Store>,
    cache: moka::future::Cache<String, Principal>,
}

impl Authenticator {
    /// Starts the watch that evicts revoked tokens; it ends when `shutdown` fires.
    pub fn new(sessions: kv::Store, shutdown: tokio_util::sync::CancellationToken) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(200_000)
            // Belt and braces: even if the watch were to miss a delete, a revoked token dies here.
            .time_to_live(Duration::from_secs(60))
            .build();
        let auth = Self {
            sessions: Arc::new(sessions),
            cache,
        };
        tokio::spawn(Arc::new(auth.clone()).watch_revocations(shutdown));
        auth
    }

    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        if token.is_empty() || token.len() > 512 {
            return Err(AuthError::Missing);
        }
        let key = token_key(token);
        if let Some(p) = self.cache.get(&key).await {
            return Ok(p);
        }
        let value = self
            .sessions
            .get(key.as_str())
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?
            .ok_or(AuthError::Invalid)?;
        let rec: SessionRecord = serde_json::from_slice(&value).map_err(|_| AuthError::Invalid)?;
        let principal = Principal {
            user_id: rec.user_id,
            device_id: rec.device_id,
        };
        self.cache.insert(key, principal).await;
        Ok(principal)
    }

    /// Authenticates the `Authorization: Bearer` header of a request.
    pub async fn from_headers(
        &self,
        headers: &axum::http::HeaderMap,
    ) -> Result<Principal, AuthError> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme name is case-insensitive (RFC 9110 §11.1).
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(AuthError::Missing)?;
        self.authenticate(token).await
    }

    /// Forgets a token at once in this process (the command that revoked it calls this too).
    pub async fn forget(&self, key: &str) {
        self.cache.invalidate(key).await;
    }

    async fn watch_revocations(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            let mut watch = match self.sessions.watch_all().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "session watch failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    entry = watch.next() => match entry {
                        Some(Ok(e)) if e.operation != kv::Operation::Put => {
                            self.cache.invalidate(&e.key).await;
                        }
                        Some(Ok(_)) => {}
                        // The watch broke (NATS restart): re-watch, and drop what we cached,
                        // since a delete may have passed while we were not looking.
                        Some(Err(_)) | None => {
                            self.cache.invalidate_all();
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// Extracting a `Principal` authenticates the request (401 problem+json otherwise).
impl<S> FromRequestParts<S> for Principal
where
    S: Send + Sync,
    Authenticator: FromRef<S>,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let auth = Authenticator::from_ref(state);
        Ok(auth.from_headers(&parts.headers).await?)
    }
}
