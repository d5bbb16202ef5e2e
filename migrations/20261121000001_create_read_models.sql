-- Read models built by the projectors from the USERS and CHATS streams.
-- Every projection is idempotent per aggregate: a row's `version`/`last_sequence` is the
-- projection's checkpoint for that aggregate, written in the same transaction as its effects.

CREATE TABLE users (
    user_id      uuid PRIMARY KEY,
    handle       text NOT NULL UNIQUE,
    display_name text NOT NULL,
    created_at   timestamptz NOT NULL,
    version      bigint NOT NULL
);

CREATE TABLE devices (
    device_id   uuid PRIMARY KEY,
    user_id     uuid NOT NULL,
    device_name text NOT NULL,
    platform    text,
    created_at  timestamptz NOT NULL,
    removed_at  timestamptz
);
CREATE INDEX devices_active_by_user ON devices (user_id) WHERE removed_at IS NULL;

CREATE TABLE chats (
    chat_id          uuid PRIMARY KEY,
    kind             text NOT NULL,
    title            text,
    created_at       timestamptz NOT NULL,
    -- The chat's version: the sequence of the last event applied (the checkpoint).
    last_sequence    bigint NOT NULL,
    last_activity_at timestamptz NOT NULL,
    last_message_seq bigint
);

CREATE TABLE members (
    chat_id         uuid NOT NULL,
    user_id         uuid NOT NULL,
    role            text NOT NULL,
    -- The sequence of the event that made the user a member; a device's cursor starts below it.
    joined_seq      bigint NOT NULL,
    -- The sequence of the event that removed the user (NULL while a member). It is delivered.
    left_seq        bigint,
    read_up_to      bigint NOT NULL DEFAULT 0,
    delivered_up_to bigint NOT NULL DEFAULT 0,
    muted           boolean NOT NULL DEFAULT false,
    notify          text NOT NULL DEFAULT 'all',
    PRIMARY KEY (chat_id, user_id)
);
CREATE INDEX members_by_user ON members (user_id, chat_id);

CREATE TABLE messages (
    chat_id     uuid NOT NULL,
    sequence    bigint NOT NULL,
    message_id  uuid NOT NULL UNIQUE,
    sender_id   uuid NOT NULL,
    body        text,
    reply_to    uuid,
    attachments jsonb NOT NULL DEFAULT '[]',
    sent_at     timestamptz NOT NULL,
    edited_at   timestamptz,
    deleted     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (chat_id, sequence)
);

-- Every chat event that is not a message, rendered as the `update` of its chatUpdate frame,
-- so a device's inbox replays from here and `messages` without touching the stream.
CREATE TABLE chat_updates (
    chat_id  uuid NOT NULL,
    sequence bigint NOT NULL,
    "update" jsonb NOT NULL,
    PRIMARY KEY (chat_id, sequence)
);

-- A device's cumulative ack per chat. Absent: the cursor is `members.joined_seq - 1`, or the
-- chat's sequence when the device was added (row written then).
CREATE TABLE device_cursors (
    device_id   uuid NOT NULL,
    chat_id     uuid NOT NULL,
    acked_up_to bigint NOT NULL,
    PRIMARY KEY (device_id, chat_id)
);

-- Stream-level progress of each projector, for status and lag (per-aggregate versions above
-- are what make applying idempotent).
CREATE TABLE projector_checkpoints (
    projection text PRIMARY KEY,
    stream_seq bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
