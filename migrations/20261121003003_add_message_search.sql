-- Full-text search over message bodies. The `simple` configuration (lower-casing, no stemming,
-- no stop words) because chats mix languages; a deleted message's NULL body indexes as empty,
-- so it is never found, and an edit reindexes by rewriting the generated column.
ALTER TABLE messages ADD COLUMN search tsvector
    GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, COALESCE(body, ''))) STORED;
CREATE INDEX messages_search ON messages USING GIN (search);
