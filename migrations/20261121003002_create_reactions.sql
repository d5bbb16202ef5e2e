-- Who reacted to which message with which emoji. A message carries at most 20 distinct emoji
-- (enforced by the command-api); a deleted message carries none.
CREATE TABLE reactions (
    message_id uuid NOT NULL,
    emoji      text NOT NULL,
    user_id    uuid NOT NULL,
    chat_id    uuid NOT NULL,
    -- The sequence of the `reaction_added` event: reactors are listed in this order.
    sequence   bigint NOT NULL,
    PRIMARY KEY (message_id, emoji, user_id)
);
