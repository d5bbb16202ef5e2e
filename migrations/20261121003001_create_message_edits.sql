-- Edit history: the body each edit replaced, kept in the read model only (the stream holds
-- every version sealed under the message's key). Deleting the message deletes its history.
CREATE TABLE message_edits (
    chat_id       uuid NOT NULL,
    -- The sequence of the `message_edited` event.
    sequence      bigint NOT NULL,
    message_id    uuid NOT NULL,
    previous_body text,
    edited_at     timestamptz NOT NULL,
    PRIMARY KEY (chat_id, sequence)
);
CREATE INDEX message_edits_by_message ON message_edits (message_id);

-- A deletion scrubs the bodies its edits left in `chat_updates` (the inbox replay of
-- `message_edited`); this finds them without scanning the chat.
CREATE INDEX chat_updates_message_edits ON chat_updates (chat_id, ("update"->>'message_id'))
    WHERE "update"->>'kind' = 'message_edited';
