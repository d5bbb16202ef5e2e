-- From this version the chats projector records the activity rollup in its own batch
-- transaction (ADR 9, addendum) and deletes the rollup's own `CHATS` consumer
-- (`proj-activity-chats`). That reader may have been behind the chats projection when the last
-- process of the previous version stopped; the events in between are before the chats
-- projector's position, so no consumer would deliver them again. Their effect on the rollup is
-- one row per message, which the chats projection already holds: copy those rows, with a
-- delivery time from the watermarks as a message applied after its receipts gets, and move
-- each chat's rollup version up to the chats projection's. Where the rollup is ahead, it stays.

INSERT INTO activity_messages (chat_id, sequence, sender_id, sent_at, delivered_at)
SELECT m.chat_id, m.sequence, m.sender_id, m.sent_at,
       (SELECT min(w.at) FROM activity_watermarks w
        WHERE w.chat_id = m.chat_id AND w.user_id <> m.sender_id
          AND w.delivered_up_to >= m.sequence)
FROM chats c
LEFT JOIN activity_chats a ON a.chat_id = c.chat_id
JOIN messages m ON m.chat_id = c.chat_id AND m.sequence > COALESCE(a.last_sequence, 0)
ON CONFLICT DO NOTHING;

INSERT INTO activity_chats (chat_id, last_sequence)
SELECT chat_id, last_sequence FROM chats
ON CONFLICT (chat_id) DO UPDATE SET last_sequence = EXCLUDED.last_sequence
WHERE activity_chats.last_sequence < EXCLUDED.last_sequence;
