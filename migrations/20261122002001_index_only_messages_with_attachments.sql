-- Only messages that carry attachments are in the attachment index. Almost no message does,
-- and each row's empty array still cost its insert a GIN entry (the empty item): 2–30 % of
-- the projector's insert of 500 rows (docs/benchmarks.md, session 12). The download check
-- (`platform/src/attachments.rs`) repeats the predicate, which lets the planner use this index.
-- The index is rebuilt while the migration holds its lock on `messages`; with the predicate
-- that is one scan of the table and an index of the few rows that have attachments.
DROP INDEX messages_by_attachment;
CREATE INDEX messages_by_attachment ON messages USING gin (attachments jsonb_path_ops)
    WHERE attachments <> '[]'::jsonb;
