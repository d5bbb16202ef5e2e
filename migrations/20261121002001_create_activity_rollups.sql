-- Activity rollups for analysts (the `activity` projection, docs/analysts.md): one row per
-- message sent, with when it first reached someone else; per-chat, per-hour counts, distinct
-- senders and median send→deliver latency are aggregated from these rows when read.
-- The projection owns these three tables and nothing else, so it rebuilds on its own.

-- The per-chat checkpoint of the projection: the chat's version (CloudEvent `sequence`) it has
-- applied. Both of its readers (CHATS and RECEIPTS) lock this row, so they serialise per chat.
CREATE TABLE activity_chats (
    chat_id       uuid PRIMARY KEY,
    last_sequence bigint NOT NULL
);

CREATE TABLE activity_messages (
    chat_id      uuid NOT NULL,
    sequence     bigint NOT NULL,
    sender_id    uuid NOT NULL,
    -- The `time` of the message_sent event.
    sent_at      timestamptz NOT NULL,
    -- The `time` of the first delivered receipt covering the message from a user other than the
    -- sender; NULL until there is one.
    delivered_at timestamptz,
    PRIMARY KEY (chat_id, sequence)
);
CREATE INDEX activity_messages_by_time ON activity_messages (chat_id, sent_at);

-- Each user's delivered watermark per chat, as this projection has seen it, and the time of the
-- receipt that set it: a receipt covers the messages between the old and the new watermark.
CREATE TABLE activity_watermarks (
    chat_id         uuid NOT NULL,
    user_id         uuid NOT NULL,
    delivered_up_to bigint NOT NULL,
    at              timestamptz NOT NULL,
    PRIMARY KEY (chat_id, user_id)
);
