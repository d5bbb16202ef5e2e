-- When each chat update happened (its event's time), so a device added at time T can start its
-- cursor at the chat's sequence as of T, whichever of the users and chats projections ran first.
-- Rows written before this column existed have NULL: they count as before any device.
ALTER TABLE chat_updates ADD COLUMN at timestamptz;
