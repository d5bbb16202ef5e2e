-- Each message's reactions as history shows them, `{emoji: [user_id]}` with reactors in the
-- order they reacted (NULL: none), kept by the chats projection beside the `reactions` rows.
-- History pages and inbox replays read it with the row instead of aggregating `reactions` once
-- per message: that subquery doubled a 50-message page's query time (docs/benchmarks.md,
-- "Session 11").
ALTER TABLE messages ADD COLUMN reactions jsonb;

UPDATE messages m SET reactions = s.summary
FROM (
    SELECT message_id, jsonb_object_agg(emoji, users) AS summary
    FROM (
        SELECT message_id, emoji, jsonb_agg(user_id ORDER BY sequence) AS users
        FROM reactions GROUP BY message_id, emoji
    ) per_emoji
    GROUP BY message_id
) s
WHERE m.message_id = s.message_id AND NOT m.deleted;
