-- The outbox is a queue: every row is updated two or three times within seconds of its insert,
-- and each update leaves a dead version behind in the claim index until VACUUM removes it.
-- With the default thresholds (20 % of the table dead) a large backlog makes every claim step
-- over hundreds of thousands of dead index entries. Vacuum it early and without pauses.
-- docs/benchmarks.md.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0.02
);
