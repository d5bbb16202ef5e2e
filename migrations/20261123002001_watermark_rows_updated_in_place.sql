-- Every delivered receipt rewrites one row in each of these tables: the member's watermark,
-- the device's cursor, the activity rollup's watermark. In a 5,000-member channel that is 5,000
-- rows of each per message. None of the rewritten columns is indexed, so PostgreSQL can update
-- such a row on its own page without touching any index (a HOT update), if the page has room
-- for the new version. At the default fill factor of 100 the pages were full: most updates
-- moved the row to another page and added an entry to every index, and the tables bloated
-- between vacuums. Leaving 30 % of each page free keeps nearly all of them in place: 5,000
-- member watermarks raised forty times over took 40-77 ms per statement at 100 and 6 % were
-- HOT; at 70, 9-11 ms and 97 % (docs/benchmarks.md, "Session 19").
--
-- The setting applies to pages written from now on. Rows an update moves land on pages filled
-- to 70 %, so an existing table converges as it is written; `VACUUM FULL` (or pg_repack) in a
-- quiet hour rewrites it at once.
ALTER TABLE members SET (fillfactor = 70);
ALTER TABLE device_cursors SET (fillfactor = 70);
ALTER TABLE activity_watermarks SET (fillfactor = 70);
