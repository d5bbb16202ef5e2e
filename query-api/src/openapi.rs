//! The OpenAPI 3.1 description of the query API, and the schemas of shapes defined outside
//! this crate (`MessageView` lives in `parley-schemas`, `Problem` in `parley-platform`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// The description of every route `router` serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Parley query API",
        description = "Reads of the Parley read models. Every chat route answers 404 to callers \
                       that are not current members, and accepts `min_sequence` to read its own \
                       writes. Errors are RFC 9457 application/problem+json."
    ),
    paths(
        crate::me::me,
        crate::chats::list,
        crate::chats::detail,
        crate::messages::history,
        crate::messages::thread,
        crate::chats::channels,
        crate::receipts::receipts,
        crate::presence::presence,
        crate::search::search,
        crate::stats::stats,
        crate::attachments::download,
    ),
    components(schemas(ProblemDoc, MessageDoc, AttachmentDoc)),
    modifiers(&BearerAuth),
    tags(
        (name = "me", description = "The caller"),
        (name = "chats", description = "The caller's chats"),
        (name = "messages", description = "Chat history"),
        (name = "users", description = "Other users"),
        (name = "search", description = "Full-text search over the caller's chats"),
        (name = "attachments", description = "Uploaded files"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("opaque")
                    .build(),
            ),
        );
    }
}

/// An RFC 9457 problem: the body of every error.
#[derive(ToSchema)]
#[schema(as = Problem)]
#[allow(dead_code)] // Only described, never built: `parley_platform::Problem` is what is sent.
pub(crate) struct ProblemDoc {
    /// A URI naming the kind of problem.
    #[schema(example = "https://parley.invalid/problems/not-found")]
    r#type: String,
    #[schema(example = "Not Found")]
    title: String,
    #[schema(example = 404)]
    status: u16,
    #[schema(example = "no such chat")]
    detail: String,
}

/// A message as history and `newMessage` frames show it (`parley_schemas::frames::MessageView`).
/// A deleted message keeps its id and sequence, with `body` null and `deleted` true.
#[derive(ToSchema)]
#[schema(as = Message)]
#[allow(dead_code)] // Only described, never built: `MessageView` is what is sent.
pub(crate) struct MessageDoc {
    message_id: uuid::Uuid,
    sequence: u64,
    sender_id: uuid::Uuid,
    /// Null once deleted.
    body: Option<String>,
    reply_to: Option<uuid::Uuid>,
    attachments: Vec<AttachmentDoc>,
    sent_at: DateTime<Utc>,
    edited_at: Option<DateTime<Utc>>,
    deleted: bool,
    /// Emoji to the users who reacted with it.
    reactions: BTreeMap<String, Vec<uuid::Uuid>>,
    /// The root of the thread this message replies in; null in the main conversation.
    thread_root: Option<uuid::Uuid>,
    /// On a thread's root: how many replies it has (0 on any other message).
    thread_reply_count: u64,
    /// On a thread's root: when its latest reply was sent.
    last_reply_at: Option<DateTime<Utc>>,
    /// Members the body names by `@handle`, resolved when sent.
    mentions: Vec<uuid::Uuid>,
}

/// An attachment of a message.
#[derive(ToSchema)]
#[schema(as = Attachment)]
#[allow(dead_code)] // Only described, never built: `AttachmentView` is what is sent.
pub(crate) struct AttachmentDoc {
    attachment_id: uuid::Uuid,
    content_type: String,
    size: u64,
    filename: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use parley_schemas::frames::MessageView;
    use parley_schemas::{MessageId, UserId};
    use serde_json::Value;

    use super::*;

    fn spec() -> Value {
        serde_json::to_value(openapi()).unwrap()
    }

    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn spec_is_openapi_3_1_with_every_route() {
        let spec = spec();
        assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
        for path in [
            "/v1/me",
            "/v1/chats",
            "/v1/chats/{chat_id}",
            "/v1/chats/{chat_id}/messages",
            "/v1/chats/{chat_id}/messages/{message_id}/thread",
            "/v1/channels",
            "/v1/users/{user_id}/presence",
            "/v1/search",
            "/v1/chats/{chat_id}/stats",
        ] {
            assert!(spec["paths"][path]["get"].is_object(), "{path} missing");
        }
        assert_eq!(
            spec["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
    }

    #[test]
    fn every_schema_reference_resolves() {
        let spec = spec();
        let mut found = Vec::new();
        refs(&spec, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            assert!(
                spec["components"]["schemas"][name].is_object(),
                "{r} does not resolve"
            );
        }
    }

    #[test]
    fn message_schema_names_exactly_the_fields_message_view_serialises() {
        let view = MessageView {
            message_id: MessageId::new(),
            sequence: 1,
            sender_id: UserId::new(),
            body: None,
            reply_to: None,
            attachments: Vec::new(),
            sent_at: Utc::now(),
            edited_at: None,
            deleted: true,
            reactions: BTreeMap::new(),
            thread_root: None,
            thread_reply_count: 0,
            last_reply_at: None,
            mentions: Vec::new(),
        };
        let sent: BTreeSet<String> = serde_json::to_value(&view)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let spec = spec();
        let described: BTreeSet<String> = spec["components"]["schemas"]["Message"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(sent, described);
    }
}
