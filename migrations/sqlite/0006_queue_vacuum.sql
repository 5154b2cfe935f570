-- Postgres' 0006 makes autovacuum keep up with the outbox, whose rows are updated two or three
-- times each; without it dead entries pile up in the claim index. SQLite has no MVCC: an
-- updated row's old index entry is gone when the statement ends, so there is nothing to tune.
-- This version exists so that both backends' schemas carry the same version numbers.
SELECT 1;
