//! `Idempotency-Key` for every creating `POST`: the same key with the same request answers the
//! same status and body for 25 h without creating anything new; the same key with another
//! request is a 422.
//!
//! The record is written create-only *before* the command runs, holding the ids minted for it.
//! A retry — even one racing the first attempt, or after a crash — reuses those ids, and the
//! events carry `Nats-Msg-Id`s derived from the key, so JetStream drops a second append. Once
//! the command has answered, the answer is stored in the record and replayed from then on.

use std::future::Future;

use async_nats::jetstream::kv::CreateErrorKind;
use axum::http::{HeaderMap, StatusCode};
use parley_platform::Problem;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::CommandState;

pub const HEADER: &str = "idempotency-key";

/// A validated key: 1..64 printable ASCII characters.
#[derive(Debug, Clone)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, Problem> {
        let Some(v) = headers.get(HEADER) else {
            return Ok(None);
        };
        let s = v
            .to_str()
            .ok()
            .filter(|s| (1..=64).contains(&s.len()) && s.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .ok_or_else(|| {
                Problem::bad_request("Idempotency-Key must be 1..64 printable ASCII characters")
            })?;
        Ok(Some(Self(s.to_owned())))
    }
}

#[derive(Serialize, Deserialize)]
struct Record<I> {
    request: String,
    ids: I,
    response: Option<StoredResponse>,
}

#[derive(Serialize, Deserialize)]
struct StoredResponse {
    status: u16,
    body: Value,
}

/// An answer to replay: status and JSON body.
pub type Answer = (StatusCode, Value);

/// Runs `command` at most once per (scope, key): `mint` makes the ids of a first attempt;
/// `command` gets the ids and the base of the `Nats-Msg-Id`s to use.
pub async fn once<I, Fut>(
    state: &CommandState,
    scope: &str,
    key: Option<IdempotencyKey>,
    request: &impl Serialize,
    mint: impl FnOnce() -> I,
    command: impl FnOnce(I, Option<String>) -> Fut,
) -> Result<Answer, ApiError>
where
    I: Serialize + DeserializeOwned + Clone,
    Fut: Future<Output = Result<Answer, ApiError>>,
{
    let Some(key) = key else {
        return command(mint(), None).await;
    };
    let kv = &state.buckets.idempotency;
    let record_key = hex::encode(Sha256::digest(format!("{scope}\n{}", key.0)));
    let fingerprint = hex::encode(Sha256::digest(
        serde_json::to_vec(request).map_err(|e| ApiError::Internal(e.to_string()))?,
    ));
    let fresh = Record {
        request: fingerprint.clone(),
        ids: mint(),
        response: None,
    };
    let encoded = serde_json::to_vec(&fresh).map_err(|e| ApiError::Internal(e.to_string()))?;
    let ids = match kv.create(record_key.as_str(), encoded.into()).await {
        Ok(_) => fresh.ids,
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
            let existing = kv
                .get(record_key.as_str())
                .await
                .map_err(|e| ApiError::Unavailable(e.to_string()))?
                .ok_or_else(|| ApiError::Unavailable("idempotency record vanished".into()))?;
            let existing: Record<I> = serde_json::from_slice(&existing)
                .map_err(|e| ApiError::Internal(format!("idempotency record: {e}")))?;
            if existing.request != fingerprint {
                return Err(ApiError::IdempotencyMismatch);
            }
            if let Some(r) = existing.response {
                let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK);
                return Ok((status, r.body));
            }
            // A first attempt is running or crashed: go again with its ids.
            existing.ids
        }
        Err(e) => return Err(ApiError::Unavailable(e.to_string())),
    };
    let msg_id = format!("idem-{}", &record_key[..40]);
    let result = command(ids.clone(), Some(msg_id)).await;
    // Client errors are answers too (same key, same 409); server errors are not stored, so a
    // retry gets another chance.
    let stored = match &result {
        Ok((status, body)) => Some((*status, body.clone())),
        Err(e) => {
            let p = e.problem();
            (400..500).contains(&p.status).then(|| {
                (
                    StatusCode::from_u16(p.status).unwrap_or(StatusCode::BAD_REQUEST),
                    serde_json::to_value(&p).unwrap_or(Value::Null),
                )
            })
        }
    };
    if let Some((status, body)) = stored {
        let done = Record {
            request: fingerprint,
            ids,
            response: Some(StoredResponse {
                status: status.as_u16(),
                body,
            }),
        };
        if let Ok(bytes) = serde_json::to_vec(&done)
            && let Err(e) = kv.put(record_key.as_str(), bytes.into()).await
        {
            tracing::warn!(error = %e, "could not store idempotent answer");
        }
    }
    result
}
