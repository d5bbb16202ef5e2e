-- Who may download an attachment: members of a chat with a (non-deleted) message carrying it.
-- `attachments @> '[{"attachment_id": "…"}]'` finds those messages through this index.
CREATE INDEX messages_by_attachment ON messages USING gin (attachments jsonb_path_ops);
