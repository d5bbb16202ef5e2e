//! `POST /v1/attachments` (createAttachment): streams the request body into the `attachments`
//! object store, checking the declared type against the first bytes and the size against the
//! limit for the type's kind as the bytes pass. Nothing is buffered beyond one chunk.

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::post;
use bytes::{Bytes, BytesMut};
use chrono::Utc;
use futures::{Stream, StreamExt};
use parley_nats::NewAttachment;
use parley_platform::Principal;
use parley_platform::extract::ApiQuery;
use parley_schemas::AttachmentId;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{answer, respond};
use crate::domain::media::{MediaKind, MediaType, SNIFF_LEN};
use crate::error::ApiError;
use crate::idempotency::{self, IdempotencyKey};
use crate::state::CommandState;

pub fn router() -> Router<CommandState> {
    // The per-kind limit is enforced while streaming (see `upload`); the JSON body limit of
    // the other routes must not apply to raw uploads.
    Router::new().route(
        "/v1/attachments",
        post(upload).layer(DefaultBodyLimit::disable()),
    )
}

/// Largest attachment per kind, in bytes (`PARLEY_ATTACHMENT_MAX_*`).
#[derive(Debug, Clone, Copy)]
pub struct AttachmentLimits {
    pub image: u64,
    pub audio: u64,
    pub video: u64,
    pub document: u64,
}

impl Default for AttachmentLimits {
    fn default() -> Self {
        const MIB: u64 = 1024 * 1024;
        Self {
            image: 16 * MIB,
            audio: 16 * MIB,
            video: 100 * MIB,
            document: 100 * MIB,
        }
    }
}

impl AttachmentLimits {
    pub fn of(&self, kind: MediaKind) -> u64 {
        match kind {
            MediaKind::Image => self.image,
            MediaKind::Audio => self.audio,
            MediaKind::Video => self.video,
            MediaKind::Document => self.document,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// Shown to downloaders (`Content-Disposition`): 1..255 characters, no control
    /// characters, `/` or `\`.
    filename: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UploadResponse {
    #[schema(value_type = String, format = Uuid)]
    attachment_id: AttachmentId,
    /// Bytes stored.
    size: u64,
    /// The declared media type, without parameters.
    content_type: String,
    /// sha256 of the bytes, lowercase hex (also the download's `ETag`).
    sha256: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct Ids {
    attachment_id: AttachmentId,
}

/// What an idempotent retry must repeat. The bytes are not part of it: they cannot be read
/// twice, so a retry with the same key gets the first answer whatever it sends.
#[derive(Serialize)]
struct Fingerprint<'a> {
    content_type: &'a str,
    filename: Option<&'a str>,
    content_length: Option<&'a str>,
}

#[utoipa::path(post, path = "/v1/attachments",
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The raw bytes. `Content-Type` must be one of: image/png, image/jpeg, \
image/gif, image/webp (image); audio/mpeg, audio/ogg, audio/wav, audio/webm, audio/mp4 (audio); \
video/mp4, video/quicktime, video/webm, video/ogg (video); application/pdf, application/zip, \
text/plain, text/csv, text/markdown (document). Limits per kind (configurable): image and \
audio 16 MiB, video and document 100 MiB."),
    params(UploadQuery,
           ("Content-Type" = String, Header, description = "the media type of the bytes"),
           ("Idempotency-Key" = Option<String>, Header, description = "1..64 printable ASCII")),
    security(("bearer" = [])),
    responses(
        (status = 201, body = UploadResponse),
        (status = 400, body = parley_platform::Problem, description = "bad filename parameter or unreadable body"),
        (status = 401, body = parley_platform::Problem),
        (status = 413, body = parley_platform::Problem, description = "over the limit for its kind; nothing is stored"),
        (status = 415, body = parley_platform::Problem, description = "Content-Type missing or not allowed"),
        (status = 422, body = parley_platform::Problem, description = "empty, bad filename, or the bytes do not look like the declared type"),
    ),
    description = "Only the uploader may attach the returned id to a message; downloads are for \
the uploader and for members of chats whose messages carry it.")]
pub async fn upload(
    State(state): State<CommandState>,
    me: Principal,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<UploadQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let key = IdempotencyKey::from_headers(&headers)?;
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media = MediaType::parse(declared).ok_or_else(|| {
        ApiError::UnsupportedMediaType(format!(
            "Content-Type must be one of: {}",
            MediaType::allowed().collect::<Vec<_>>().join(", ")
        ))
    })?;
    let filename = query.filename.as_deref().map(check_filename).transpose()?;
    let limit = state.config.attachment_limits.of(media.kind());
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok());
    // An honest Content-Length over the limit is refused before a byte is read.
    if length
        .and_then(|l| l.parse::<u64>().ok())
        .is_some_and(|l| l > limit)
    {
        return Err(ApiError::TooLarge(format!(
            "at most {limit} bytes for this kind of attachment"
        )));
    }
    let fingerprint = Fingerprint {
        content_type: media.essence(),
        filename: filename.as_deref(),
        content_length: length,
    };
    let scope = format!("attachments:{}", me.user_id);
    let mint = || Ids {
        attachment_id: AttachmentId::new(),
    };
    let state = &state;
    let stored_name = filename.clone();
    let res = idempotency::once(
        state,
        &scope,
        key,
        &fingerprint,
        mint,
        |ids, _| async move {
            let (prefix, rest) = sniff(body.into_data_stream()).await?;
            if prefix.is_empty() {
                return Err(ApiError::Invalid("an attachment cannot be empty".into()));
            }
            if !media.agrees(&prefix) {
                return Err(ApiError::Invalid(format!(
                    "the bytes do not look like {}",
                    media.essence()
                )));
            }
            let new = NewAttachment {
                attachment_id: ids.attachment_id,
                uploader: me.user_id,
                content_type: media.essence().to_owned(),
                filename: stored_name,
                created_at: Utc::now(),
            };
            let bytes = futures::stream::iter([Ok(prefix)]).chain(rest);
            let meta = state.buckets.attachments.put(new, limit, bytes).await?;
            Ok(answer(
                StatusCode::CREATED,
                &UploadResponse {
                    attachment_id: meta.attachment_id,
                    size: meta.size,
                    content_type: meta.content_type,
                    sha256: meta.sha256,
                },
            ))
        },
    )
    .await?;
    Ok(respond(res))
}

/// Reads the body until it has [`SNIFF_LEN`] bytes (or ends), returning them and the rest.
async fn sniff<S>(mut body: S) -> Result<(Bytes, S), ApiError>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    let mut prefix = BytesMut::new();
    while prefix.len() < SNIFF_LEN {
        match body.next().await {
            Some(Ok(data)) => prefix.extend_from_slice(&data),
            Some(Err(e)) => {
                return Err(parley_nats::AttachmentError::Body(e.to_string()).into());
            }
            None => break,
        }
    }
    Ok((prefix.freeze(), body))
}

/// A filename is shown to others and ends up in a header: printable, no path, bounded.
fn check_filename(name: &str) -> Result<String, ApiError> {
    let ok = (1..=255).contains(&name.chars().count())
        && !name
            .chars()
            .any(|c| c.is_control() || c == '/' || c == '\\')
        && name.trim() == name;
    if ok {
        Ok(name.to_owned())
    } else {
        Err(ApiError::Invalid(
            "filename must be 1..255 characters without control characters, '/', '\\' or \
             surrounding spaces"
                .into(),
        ))
    }
}
