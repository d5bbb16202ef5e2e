//! `POST /v1/chats` (createChat) and `POST /v1/chats/{chat_id}/participants`
//! (modifyParticipants). One DM per pair is reserved create-only in the `dms` bucket.

use async_nats::jetstream::kv::CreateErrorKind;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{Json, Router};
use futures::{StreamExt, TryStreamExt};
use parley_nats::AppendContext;
use parley_platform::{ApiJson, PathIds, Principal};
use parley_schemas::{ChatId, ChatKind, ChatTitle, UserId, Visibility};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{answer, respond};
use crate::domain::chat::{self, ChatCommand};
use crate::error::ApiError;
use crate::idempotency::{self, IdempotencyKey};
use crate::state::CommandState;

pub fn router() -> Router<CommandState> {
    Router::new()
        .route("/v1/chats", post(create))
        .route("/v1/chats/{chat_id}/participants", post(participants))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChatRequest {
    #[schema(value_type = String, example = "group")]
    kind: ChatKind,
    /// 1..128 characters; not for a dm.
    title: Option<String>,
    /// The others; the creator is always in.
    #[schema(value_type = Vec<String>)]
    members: Vec<UserId>,
    /// `public` (anyone may join by adding themselves) or `private` (the default); only a
    /// channel may be public.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "public")]
    visibility: Option<Visibility>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreateChatResponse {
    #[schema(value_type = String, format = Uuid)]
    chat_id: ChatId,
    #[schema(value_type = String)]
    kind: ChatKind,
    /// The chat's sequence: 1 for a new chat; an existing dm's current sequence.
    sequence: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ParticipantsRequest {
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    add: Vec<UserId>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    remove: Vec<UserId>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SequenceResponse {
    /// The chat's sequence after the command.
    pub sequence: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct Ids {
    chat_id: ChatId,
}

/// Most user ids one request may name (a channel grows by several requests).
const MAX_IDS_PER_REQUEST: usize = 1000;

#[utoipa::path(post, path = "/v1/chats", request_body = CreateChatRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "1..64 printable ASCII")),
    security(("bearer" = [])),
    responses(
        (status = 201, body = CreateChatResponse),
        (status = 200, body = CreateChatResponse, description = "the existing dm of this pair"),
        (status = 400, body = parley_platform::Problem),
        (status = 401, body = parley_platform::Problem),
        (status = 404, body = parley_platform::Problem, description = "a named member is not someone the caller may add (never says why)"),
        (status = 422, body = parley_platform::Problem, description = "unknown members, over the member limit, bad dm, a public group or dm"),
    ))]
pub async fn create(
    State(state): State<CommandState>,
    me: Principal,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateChatRequest>,
) -> Result<Response, ApiError> {
    let key = IdempotencyKey::from_headers(&headers)?;
    let state = &state;
    let title = req.title.clone().map(ChatTitle::parse).transpose()?;
    if req.members.len() > MAX_IDS_PER_REQUEST {
        return Err(ApiError::Invalid(format!(
            "at most {MAX_IDS_PER_REQUEST} members per request"
        )));
    }
    let blocked_by = users_to_add(state, me.user_id, &req.members).await?;
    let scope = format!("chats:{}", me.user_id);
    let ids = || Ids {
        chat_id: ChatId::new(),
    };
    let req = &req;
    let res = idempotency::once(state, &scope, key, req, ids, |ids, msg_id| async move {
        let mut chat_id = ids.chat_id;
        // Someone who blocked the caller gets no dm reservation: decide refuses the dm anyway.
        if req.kind == ChatKind::Dm
            && blocked_by.is_empty()
            && let [other] = dedup(&req.members, me.user_id)[..]
            && let Reservation::Existing(existing) =
                reserve_dm(state, me.user_id, other, chat_id).await?
        {
            chat_id = existing;
        }
        let cmd = ChatCommand::Create {
            chat_id,
            creator: me.user_id,
            kind: req.kind,
            title: title.map(String::from),
            members: req.members.clone(),
            max_members: max_members(state, req.kind),
            visibility: req.visibility.unwrap_or_default(),
            blocked_by: blocked_by.clone(),
        };
        let ctx = AppendContext::idempotent(me.user_id, msg_id);
        let outcome = state
            .chats
            .execute(*chat_id.as_uuid(), &ctx, |s| chat::decide(s, &cmd))
            .await?;
        // A dm that already existed answers 200 with its current sequence.
        let (status, sequence) = if chat_id != ids.chat_id {
            (StatusCode::OK, outcome.version)
        } else {
            (StatusCode::CREATED, 1)
        };
        Ok(answer(
            status,
            &CreateChatResponse {
                chat_id,
                kind: req.kind,
                sequence,
            },
        ))
    })
    .await?;
    Ok(respond(res))
}

#[utoipa::path(post, path = "/v1/chats/{chat_id}/participants", request_body = ParticipantsRequest,
    params(("chat_id" = String, Path, format = Uuid)),
    security(("bearer" = [])),
    description = "Admins add and remove others; any member may remove itself (leave). Anyone may \
                   join a public channel by adding only itself.",
    responses(
        (status = 200, body = SequenceResponse),
        (status = 403, body = parley_platform::Problem, description = "not an admin"),
        (status = 404, body = parley_platform::Problem, description = "unknown chat or not a member (and not joining a public channel), or a user to add who is not the caller's to add"),
        (status = 422, body = parley_platform::Problem, description = "over the member limit, unknown users, a dm"),
    ))]
pub async fn participants(
    State(state): State<CommandState>,
    me: Principal,
    PathIds(chat_id): PathIds<ChatId>,
    ApiJson(req): ApiJson<ParticipantsRequest>,
) -> Result<Json<SequenceResponse>, ApiError> {
    if req.add.len() + req.remove.len() > MAX_IDS_PER_REQUEST {
        return Err(ApiError::Invalid(format!(
            "at most {MAX_IDS_PER_REQUEST} users per request"
        )));
    }
    // Membership first (or a public channel, which anyone may join), so a non-member learns
    // nothing about which users exist.
    let kind = state
        .chats
        .read(*chat_id.as_uuid(), |c, _| {
            (c.is_member(me.user_id) || c.is_public())
                .then(|| c.kind())
                .flatten()
        })
        .await?
        .ok_or(ApiError::Rejected(crate::domain::Rejection::NotFound))?;
    let blocked_by = users_to_add(&state, me.user_id, &req.add).await?;
    let cmd = ChatCommand::ModifyParticipants {
        actor: me.user_id,
        add: req.add,
        remove: req.remove,
        max_members: max_members(&state, kind),
        blocked_by,
    };
    let outcome = state
        .chats
        .execute(*chat_id.as_uuid(), &AppendContext::new(me.user_id), |s| {
            chat::decide(s, &cmd)
        })
        .await?;
    Ok(Json(SequenceResponse {
        sequence: outcome.version,
    }))
}

fn max_members(state: &CommandState, kind: ChatKind) -> usize {
    match kind {
        ChatKind::Dm => 2,
        ChatKind::Group => state.config.max_group_members,
        ChatKind::Channel => state.config.max_channel_members,
    }
}

fn dedup(list: &[UserId], me: UserId) -> Vec<UserId> {
    let mut out = Vec::new();
    for u in list {
        if *u != me && !out.contains(u) {
            out.push(*u);
        }
    }
    out
}

/// Every named user must be registered: checked against the `USERS` stream (not the lagging
/// read model), with a few lookups in flight at once. Answers those of them who block `actor`,
/// a fact `decide` needs and cannot read itself.
async fn users_to_add(
    state: &CommandState,
    actor: UserId,
    users: &[UserId],
) -> Result<Vec<UserId>, ApiError> {
    let found: Vec<(UserId, bool, bool)> = futures::stream::iter(users.iter().copied())
        .map(|u| async move {
            let (exists, blocks) = state
                .users
                .read(*u.as_uuid(), |user, v| (v > 0, user.blocks(actor)))
                .await?;
            Ok::<_, ApiError>((u, exists, blocks))
        })
        .buffer_unordered(32)
        .try_collect()
        .await?;
    let unknown: Vec<UserId> = found
        .iter()
        .filter(|(_, exists, _)| !exists)
        .map(|(u, _, _)| *u)
        .collect();
    if unknown.is_empty() {
        Ok(found
            .into_iter()
            .filter(|(_, _, blocks)| *blocks)
            .map(|(u, _, _)| u)
            .collect())
    } else {
        let list: Vec<String> = unknown.iter().take(5).map(|u| u.to_string()).collect();
        Err(ApiError::Invalid(format!(
            "unknown users: {}",
            list.join(", ")
        )))
    }
}

enum Reservation {
    Ours,
    Existing(ChatId),
}

async fn reserve_dm(
    state: &CommandState,
    a: UserId,
    b: UserId,
    chat_id: ChatId,
) -> Result<Reservation, ApiError> {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let key = format!("{lo}_{hi}");
    let kv = &state.buckets.dms;
    match kv.create(key.as_str(), chat_id.to_string().into()).await {
        Ok(_) => Ok(Reservation::Ours),
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
            let existing = kv
                .get(key.as_str())
                .await
                .map_err(|e| ApiError::Unavailable(e.to_string()))?
                .and_then(|b| {
                    std::str::from_utf8(&b)
                        .ok()
                        .and_then(|s| ChatId::parse(s).ok())
                })
                .ok_or_else(|| ApiError::Internal(format!("dm reservation {key} unreadable")))?;
            // The reserved chat may never have been created (a crash between reservation and
            // append): the caller's create below completes it, since decide is a no-op for an
            // existing chat and creates an absent one.
            Ok(if existing == chat_id {
                Reservation::Ours
            } else {
                Reservation::Existing(existing)
            })
        }
        Err(e) => Err(ApiError::Unavailable(e.to_string())),
    }
}
