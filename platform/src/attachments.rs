//! The read-model half of the attachment rule, shared by the command side (which attachments a
//! sender may put in a message) and the query side (who may download one).

use parley_schemas::{AttachmentId, UserId};
use sqlx::PgPool;

/// The statement of [`visible_through_chats`] (`$1` the user, `$2` the attachment id). It
/// repeats the predicate of the partial index `messages_by_attachment` (only messages that carry
/// attachments), without which the planner could not use that index.
pub const VISIBLE_THROUGH_CHATS: &str = "SELECT EXISTS (SELECT 1 FROM messages m \
     JOIN members mb ON mb.chat_id = m.chat_id \
     WHERE mb.user_id = $1 AND mb.left_seq IS NULL AND NOT m.deleted \
       AND m.attachments <> '[]'::jsonb \
       AND m.attachments @> jsonb_build_array(jsonb_build_object('attachment_id', $2::text)))";

/// Whether `user` is a current member of a chat holding a non-deleted message that carries
/// `attachment` (deleting a message empties its attachments in the read model). The uploader
/// is checked by the caller from the attachment's own metadata.
pub async fn visible_through_chats(
    pg: &PgPool,
    user: UserId,
    attachment: AttachmentId,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(VISIBLE_THROUGH_CHATS)
        .bind(user.as_uuid())
        .bind(attachment.to_string())
        .fetch_one(pg)
        .await
}
