-- Threads, mentions, chat visibility and per-member settings (issue 4, part 2).

-- A message's thread (the root it replies in, NULL in the main conversation), and on roots the
-- thread summary the chats projector keeps: reply count and the latest reply's time.
ALTER TABLE messages
    ADD COLUMN thread_root        uuid,
    ADD COLUMN thread_reply_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN last_reply_at      timestamptz,
    ADD COLUMN mentions           uuid[] NOT NULL DEFAULT '{}';
-- A thread's replies in order: keyset paging by (chat, root, sequence).
CREATE INDEX messages_by_thread ON messages (chat_id, thread_root, sequence)
    WHERE thread_root IS NOT NULL;

-- `public` channels anyone may join; everything else is `private`.
ALTER TABLE chats ADD COLUMN visibility text NOT NULL DEFAULT 'private';
CREATE INDEX chats_public ON chats (last_activity_at DESC) WHERE visibility = 'public';

-- A member's own settings per chat, from `parley.user.chat_settings_changed.v1` on USERS. Kept
-- apart from `members` (a CHATS projection): the users projector may apply a settings change
-- before the chats projector has written the membership it belongs to. `users.version` is the
-- checkpoint that makes applying it idempotent.
CREATE TABLE member_settings (
    user_id uuid NOT NULL,
    chat_id uuid NOT NULL,
    muted   boolean NOT NULL,
    notify  text NOT NULL,
    PRIMARY KEY (user_id, chat_id)
);

-- Whom each user blocks (USERS), for reads; command-api decides from the user aggregate.
CREATE TABLE user_blocks (
    user_id    uuid NOT NULL,
    blocked_id uuid NOT NULL,
    since      timestamptz NOT NULL,
    PRIMARY KEY (user_id, blocked_id)
);
