//! `GET /v1/attachments/{attachment_id}`: an attachment's bytes, streamed from the object
//! store chunk by chunk, to its uploader and to current members of a chat with a (non-deleted)
//! message carrying it; 404 to anyone else, exactly like an unknown id.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use parley_nats::AttachmentError;
use parley_platform::Principal;
use parley_platform::attachments::visible_through_chats;
use parley_platform::extract::PathIds;
use parley_schemas::AttachmentId;

use crate::error::ApiError;
use crate::openapi::ProblemDoc;
use crate::state::QueryState;

pub(crate) fn router() -> Router<QueryState> {
    Router::new().route("/v1/attachments/{attachment_id}", get(download))
}

#[utoipa::path(
    get,
    path = "/v1/attachments/{attachment_id}",
    operation_id = "getAttachment",
    tag = "attachments",
    security(("bearer" = [])),
    params(("attachment_id" = uuid::Uuid, Path, description = "The attachment")),
    responses(
        (status = 200, description = "The bytes, with the uploaded `Content-Type`, \
`Content-Length`, `Content-Disposition: attachment` (with the filename, if any) and \
`ETag` (the sha256, quoted)", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, description = "No or bad token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such attachment, or the caller neither uploaded it nor \
is a member of a chat whose (non-deleted) message carries it", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Object store or read model unavailable; see Retry-After", body = ProblemDoc, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn download(
    State(state): State<QueryState>,
    me: Principal,
    PathIds(id): PathIds<AttachmentId>,
) -> Result<Response, ApiError> {
    let store = &state.buckets.attachments;
    let meta = store.meta(id).await.map_err(attachment_error)?;
    if meta.uploader != me.user_id && !visible_through_chats(&state.pg, me.user_id, id).await? {
        return Err(ApiError::AttachmentNotFound);
    }
    let mut res = Response::new(Body::from_stream(store.bytes(&meta)));
    *res.status_mut() = StatusCode::OK;
    let h = res.headers_mut();
    // The type was checked against the bytes at upload; `nosniff` keeps browsers to it.
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&meta.content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", meta.sha256)) {
        h.insert(header::ETAG, etag);
    }
    if let Ok(v) = HeaderValue::from_str(&content_disposition(meta.filename.as_deref())) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(res)
}

fn attachment_error(e: AttachmentError) -> ApiError {
    match e {
        AttachmentError::NotFound => ApiError::AttachmentNotFound,
        other => ApiError::AttachmentsUnavailable(other),
    }
}

/// `attachment`, with the filename as a quoted ASCII fallback (anything else becomes `_`) and
/// as RFC 8187 `filename*` for the exact UTF-8 name.
fn content_disposition(filename: Option<&str>) -> String {
    let Some(name) = filename else {
        return "attachment".into();
    };
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::content_disposition;

    #[test]
    fn content_disposition_quotes_an_ascii_fallback_and_encodes_the_utf8_name() {
        assert_eq!(content_disposition(None), "attachment");
        assert_eq!(
            content_disposition(Some("résumé \"final\".pdf")),
            "attachment; filename=\"r_sum_ _final_.pdf\"; \
             filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22.pdf"
        );
    }
}
