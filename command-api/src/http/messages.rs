//! `POST /v1/chats/{chat_id}/messages` (sendMessage): replies, thread replies and `@handle`
//! mentions are resolved here into facts the decider records.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use chrono::{DateTime, Utc};
use parley_nats::{AppendContext, AttachmentError};
use parley_platform::{ApiJson, ClientIp, PathIds, Principal, attachments};
use parley_schemas::events::AttachmentRef;
use parley_schemas::{AttachmentId, ChatId, MessageBody, MessageId, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{answer, respond};
use crate::domain::Rejection;
use crate::domain::chat::{self, ChatCommand, MAX_ATTACHMENTS};
use crate::domain::mentions::mentioned_handles;
use crate::error::ApiError;
use crate::idempotency::{self, IdempotencyKey};
use crate::state::CommandState;

pub fn router() -> Router<CommandState> {
    Router::new().route("/v1/chats/{chat_id}/messages", post(send))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// 1..4000 characters, not only whitespace.
    body: String,
    /// A message of the same chat.
    #[schema(value_type = Option<String>, format = Uuid)]
    reply_to: Option<MessageId>,
    /// At most 10.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    attachments: Vec<AttachmentId>,
    /// Reply in the thread of this message: a message of the same chat that is itself in no
    /// thread (422 otherwise). The thread is listed by
    /// `GET /v1/chats/{chat_id}/messages/{thread_root}/thread`.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Uuid)]
    thread_root: Option<MessageId>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SendResponse {
    #[schema(value_type = String, format = Uuid)]
    message_id: MessageId,
    #[schema(value_type = String, format = Uuid)]
    chat_id: ChatId,
    sequence: u64,
    sent_at: DateTime<Utc>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Ids {
    message_id: MessageId,
}

#[utoipa::path(post, path = "/v1/chats/{chat_id}/messages", request_body = SendRequest,
    params(("chat_id" = String, Path, format = Uuid),
           ("Idempotency-Key" = Option<String>, Header, description = "1..64 printable ASCII")),
    security(("bearer" = [])),
    responses(
        (status = 201, body = SendResponse),
        (status = 400, body = parley_platform::Problem),
        (status = 404, body = parley_platform::Problem, description = "unknown chat or not a member"),
        (status = 413, body = parley_platform::Problem),
        (status = 422, body = parley_platform::Problem, description = "bad body, reply_to, thread_root or attachments"),
        (status = 429, body = parley_platform::Problem, description = "rate limited or flooding (see Retry-After)"),
    ),
    description = "`@handle` tokens in the body that name current members are recorded as the message's `mentions`.")]
pub async fn send(
    State(state): State<CommandState>,
    me: Principal,
    ClientIp(ip): ClientIp,
    PathIds(chat_id): PathIds<ChatId>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<SendRequest>,
) -> Result<Response, ApiError> {
    state.limits.send(ip, me.user_id, chat_id, &req.body)?;
    let key = IdempotencyKey::from_headers(&headers)?;
    let state = &state;
    let body = MessageBody::parse(req.body.clone())?;
    // Checked again by `decide`; here so that eleven ids cost no lookups.
    if req.attachments.len() > MAX_ATTACHMENTS {
        return Err(ApiError::Invalid(format!(
            "at most {MAX_ATTACHMENTS} attachments"
        )));
    }
    let scope = format!("messages:{}:{chat_id}", me.user_id);
    // Only members get a message key made or taken for them: a stranger can neither fill the
    // bucket nor drain the pool. The cached state answers the common case without a round
    // trip; only a "no" is checked against the stream (the user may have joined through
    // another process), inside, so that a retried command still gets its stored answer. A
    // stale "yes" (just removed elsewhere) costs one unused key: `decide` refuses.
    let member_cached = state
        .chats
        .read_cached(*chat_id.as_uuid(), |c, _| c.is_member(me.user_id))
        .await?;
    // The id of a key already stored (none when the pool is empty): no KV write before the
    // append. A retried command keeps the id (and key) its first attempt minted.
    let pooled = if member_cached {
        state.key_pool.take(chat_id).await
    } else {
        None
    };
    let ids = || Ids {
        message_id: pooled.unwrap_or_else(MessageId::new),
    };
    let req = &req;
    let res = idempotency::once(state, &scope, key, req, ids, |ids, msg_id| async move {
        if let Some(target) = req.reply_to {
            check_target(state, me.user_id, chat_id, target, Target::Reply).await?;
        }
        if let Some(root) = req.thread_root {
            check_target(state, me.user_id, chat_id, root, Target::ThreadRoot).await?;
        }
        if req.reply_to.is_none() && req.thread_root.is_none() && !member_cached {
            require_member(state, me.user_id, chat_id).await?;
        }
        let mentions = resolve_mentions(state, &body).await?;
        let attachments = resolve_attachments(state, me.user_id, &req.attachments).await?;
        // The key exists before the event does, so every reader of the event can open it: a
        // pooled key was stored before it was pooled, any other is stored here.
        let key = state.keys.create(chat_id, ids.message_id).await?;
        let sealed = parley_nats::message_keys::seal(&key, chat_id, ids.message_id, body.as_str());
        let cmd = ChatCommand::SendSealedMessage {
            actor: me.user_id,
            message_id: ids.message_id,
            body: sealed,
            reply_to: req.reply_to,
            thread_root: req.thread_root,
            mentions,
            attachments,
        };
        let ctx = AppendContext::idempotent(me.user_id, msg_id);
        let outcome = state
            .chats
            .execute(*chat_id.as_uuid(), &ctx, |s| chat::decide(s, &cmd))
            .await?;
        let meta = outcome
            .appended
            .first()
            .ok_or_else(|| ApiError::Internal("send appended nothing".into()))?;
        Ok(answer(
            StatusCode::CREATED,
            &SendResponse {
                message_id: ids.message_id,
                chat_id,
                sequence: meta.sequence,
                sent_at: meta.time,
            },
        ))
    })
    .await?;
    Ok(respond(res))
}

/// The chat's current version if `me` is a member; 404 otherwise.
pub(crate) async fn require_member(
    state: &CommandState,
    me: parley_schemas::UserId,
    chat_id: ChatId,
) -> Result<u64, ApiError> {
    state
        .chats
        .read(*chat_id.as_uuid(), |c, v| c.is_member(me).then_some(v))
        .await?
        .ok_or(ApiError::Rejected(Rejection::NotFound))
}

/// The users the body's `@handle`s name, from the `handles` bucket (authoritative, unlike the
/// lagging read model). Unknown handles name nobody; `decide` keeps only current members.
async fn resolve_mentions(
    state: &CommandState,
    body: &MessageBody,
) -> Result<Vec<UserId>, ApiError> {
    let handles = mentioned_handles(body.as_str());
    let found: Vec<Option<UserId>> = futures::stream::iter(handles)
        .map(|h| async move {
            let owner = state
                .buckets
                .handles
                .get(h.as_str())
                .await
                .map_err(|e| ApiError::Unavailable(e.to_string()))?;
            Ok::<_, ApiError>(owner.and_then(|b| {
                std::str::from_utf8(&b)
                    .ok()
                    .and_then(|s| UserId::parse(s).ok())
            }))
        })
        .buffered(8)
        .try_collect()
        .await?;
    Ok(found.into_iter().flatten().collect())
}

/// The metadata of each attachment `me` may put in a message: one it uploaded, or one it can
/// already see in a chat it belongs to (forwarding). Anything else is "unknown", whether it
/// exists or not, so ids of others' uploads cannot be probed.
async fn resolve_attachments(
    state: &CommandState,
    me: UserId,
    ids: &[AttachmentId],
) -> Result<Vec<AttachmentRef>, ApiError> {
    futures::stream::iter(ids.to_vec())
        .map(|id| async move {
            let unknown = || ApiError::Invalid(format!("unknown attachment {id}"));
            let meta = match state.buckets.attachments.meta(id).await {
                Err(AttachmentError::NotFound) => return Err(unknown()),
                other => other?,
            };
            if meta.uploader != me
                && !attachments::visible_through_chats(&state.pg, me, id)
                    .await
                    .map_err(|e| ApiError::Unavailable(e.to_string()))?
            {
                return Err(unknown());
            }
            Ok(AttachmentRef {
                attachment_id: id,
                content_type: meta.content_type,
                size: meta.size,
                filename: meta.filename,
                sha256: meta.sha256,
            })
        })
        .buffered(4)
        .try_collect()
        .await
}

/// What a message may point at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// `reply_to`: any message of the chat.
    Reply,
    /// `thread_root`: a message of the chat that is itself in no thread.
    ThreadRoot,
}

/// A reply or thread reply must name a message of the same chat. Messages are not aggregate
/// state, so this reads the read model; if the read model is behind the chat, it waits (up to
/// 2 s) for it to catch up before deciding the target does not exist.
async fn check_target(
    state: &CommandState,
    me: UserId,
    chat_id: ChatId,
    target: MessageId,
    kind: Target,
) -> Result<(), ApiError> {
    let field = match kind {
        Target::Reply => "reply_to",
        Target::ThreadRoot => "thread_root",
    };
    let version = require_member(state, me, chat_id).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let row: Option<(bool, bool, i64)> = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE chat_id = $1 AND message_id = $2), \
                    EXISTS (SELECT 1 FROM messages WHERE chat_id = $1 AND message_id = $2 \
                            AND thread_root IS NOT NULL), \
             COALESCE((SELECT last_sequence FROM chats WHERE chat_id = $1), 0)",
        )
        .bind(chat_id.as_uuid())
        .bind(target.as_uuid())
        .fetch_optional(&state.pg)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let (found, in_thread, projected) = row.unwrap_or((false, false, 0));
        if found && kind == Target::ThreadRoot && in_thread {
            return Err(ApiError::Invalid(
                "thread_root names a message that is itself in a thread; reply to its root".into(),
            ));
        }
        if found {
            return Ok(());
        }
        if projected as u64 >= version || tokio::time::Instant::now() >= deadline {
            return Err(ApiError::Invalid(format!(
                "{field} does not name a message of this chat"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
