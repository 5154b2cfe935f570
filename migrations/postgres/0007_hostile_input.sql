-- One app's row or one pushed event must never stop the others (docs/reliability.md,
-- "Hostile input").

-- Times the daemon reads must be finite and within years 1-9999: `infinity` or a year past
-- 262142 is a valid timestamptz that no program's clock type holds (chrono panicked on it and
-- the daemon crash-looped). Rows already waiting or being sent with such a value fail now,
-- naming the column, so that the constraints below hold for every row. (The constraints are
-- checked against the whole table while it is locked: on a large outbox shared with an app,
-- run the upgrade when a pause of the app's inserts is acceptable; docs/operations.md.)
UPDATE outbox SET status = 'failed', last_errcode = NULL, held_for = NULL,
       lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
       last_error = CASE
           WHEN NOT (send_after IS NULL OR (isfinite(send_after) AND send_after BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00'))
               THEN 'send_after is outside years 1-9999 (infinity?); not sent'
           WHEN NOT (expires_at IS NULL OR (isfinite(expires_at) AND expires_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00'))
               THEN 'expires_at is outside years 1-9999 (infinity?); not sent'
           WHEN NOT (isfinite(next_attempt_at) AND next_attempt_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00')
               THEN 'next_attempt_at is outside years 1-9999 (infinity?); not sent'
           WHEN NOT (in_doubt_since IS NULL OR (isfinite(in_doubt_since) AND in_doubt_since BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00'))
               THEN 'in_doubt_since is outside years 1-9999 (infinity?); not sent'
           ELSE 'attempts is negative or above 1000000; not sent' END
WHERE status IN ('pending', 'held', 'sending')
  AND NOT ((send_after IS NULL OR (isfinite(send_after) AND send_after BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00'))
       AND (expires_at IS NULL OR (isfinite(expires_at) AND expires_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00'))
       AND (isfinite(next_attempt_at) AND next_attempt_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00')
       AND (in_doubt_since IS NULL OR (isfinite(in_doubt_since) AND in_doubt_since BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00'))
       AND attempts BETWEEN 0 AND 1000000);

-- A row in a final state keeps no such value either: its times are cleared (next_attempt_at,
-- which is NOT NULL, takes updated_at or now) and attempts is brought into range, as the
-- constraints below hold for every row. They are unconditional because a condition on status
-- doubled their cost on every update of the queue (16 against 36 µs a statement, measured).
UPDATE outbox SET
    send_after = CASE WHEN send_after IS NULL OR (isfinite(send_after) AND send_after BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00') THEN send_after END,
    expires_at = CASE WHEN expires_at IS NULL OR (isfinite(expires_at) AND expires_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00') THEN expires_at END,
    in_doubt_since = CASE WHEN in_doubt_since IS NULL OR (isfinite(in_doubt_since) AND in_doubt_since BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00') THEN in_doubt_since END,
    next_attempt_at = CASE WHEN isfinite(next_attempt_at) AND next_attempt_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00' THEN next_attempt_at
                           WHEN isfinite(updated_at) AND updated_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00' THEN updated_at
                           ELSE now() END,
    attempts = LEAST(GREATEST(attempts, 0), 1000000)
WHERE NOT ((send_after IS NULL OR (isfinite(send_after) AND send_after BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00'))
       AND (expires_at IS NULL OR (isfinite(expires_at) AND expires_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00'))
       AND (isfinite(next_attempt_at) AND next_attempt_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00')
       AND (in_doubt_since IS NULL OR (isfinite(in_doubt_since) AND in_doubt_since BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00'))
       AND attempts BETWEEN 0 AND 1000000);

-- Each constraint names its column, so the app's error says which value was refused.
ALTER TABLE outbox
    ADD CONSTRAINT outbox_send_after_in_range CHECK (send_after IS NULL
        OR (isfinite(send_after) AND send_after BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00')),
    ADD CONSTRAINT outbox_expires_at_in_range CHECK (expires_at IS NULL
        OR (isfinite(expires_at) AND expires_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00')),
    ADD CONSTRAINT outbox_next_attempt_at_in_range CHECK (
        isfinite(next_attempt_at) AND next_attempt_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00'),
    ADD CONSTRAINT outbox_in_doubt_since_in_range CHECK (in_doubt_since IS NULL
        OR (isfinite(in_doubt_since) AND in_doubt_since BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00')),
    -- The claim adds one per attempt and never passes the bound (it counts no further).
    ADD CONSTRAINT outbox_attempts_in_range CHECK (attempts BETWEEN 0 AND 1000000);

-- Delivery events that never join (sent by another system on the same account, or whose
-- FromUserName is not the row's touser) are given up on instead of being probed every second
-- forever: `join_problem` says why, `given_up_at` when.
ALTER TABLE inbound_events ADD COLUMN given_up_at TIMESTAMPTZ;
ALTER TABLE inbound_events ADD COLUMN join_problem TEXT;
DROP INDEX inbound_events_unjoined;
CREATE INDEX inbound_events_unjoined ON inbound_events (received_at)
    WHERE event = 'TEMPLATESENDJOBFINISH' AND joined_at IS NULL AND given_up_at IS NULL;

-- Held rows are looked up by what they wait for, in claim order, when room appears (a send
-- given back, a limit raised, a template taken out of use).
CREATE INDEX outbox_held_for ON outbox (account, held_for, template_id, priority DESC, id)
    WHERE status = 'held';

-- Template delivery events per account and how their join ended. docs/reports.md.
CREATE VIEW report_events AS
SELECT account,
       CASE WHEN joined_at IS NOT NULL THEN 'joined'
            WHEN given_up_at IS NOT NULL THEN 'given up'
            ELSE 'waiting' END AS state,
       join_problem AS problem,
       COUNT(*) AS event_count,
       MIN(received_at) AS first_received,
       MAX(received_at) AS last_received
FROM inbound_events
WHERE event = 'TEMPLATESENDJOBFINISH'
GROUP BY 1, 2, 3;

-- A row in a final state may keep an infinite time (the constraints above bind waiting rows);
-- subtracting one fails the whole view ("cannot subtract infinite timestamps"), so such rows
-- are left out of the latencies. Otherwise as in 0004.
CREATE OR REPLACE VIEW report_latency AS
WITH timed AS (
    SELECT account, template_id,
           CAST(EXTRACT(EPOCH FROM sent_at - created_at) AS double precision) AS to_sent,
           CASE WHEN isfinite(delivered_at)
                THEN CAST(EXTRACT(EPOCH FROM delivered_at - sent_at) AS double precision) END
               AS to_delivered
    FROM outbox
    WHERE sent_at IS NOT NULL AND sent_at >= now() - interval '1 day'
      AND isfinite(sent_at) AND isfinite(created_at)
), ranked AS (
    SELECT account, template_id, to_sent, to_delivered,
           ROW_NUMBER() OVER (PARTITION BY account, template_id ORDER BY to_sent) AS sent_rank,
           COUNT(*) OVER (PARTITION BY account, template_id) AS sent_rows,
           ROW_NUMBER() OVER (PARTITION BY account, template_id, to_delivered IS NULL ORDER BY to_delivered) AS delivered_rank,
           COUNT(to_delivered) OVER (PARTITION BY account, template_id) AS delivered_rows
    FROM timed
)
SELECT account, template_id, MAX(sent_rows) AS sent_rows,
       AVG(to_sent) AS mean_to_sent_secs,
       MIN(CASE WHEN sent_rank >= 0.5 * sent_rows THEN to_sent END) AS p50_to_sent_secs,
       MIN(CASE WHEN sent_rank >= 0.95 * sent_rows THEN to_sent END) AS p95_to_sent_secs,
       MAX(delivered_rows) AS delivered_rows,
       AVG(to_delivered) AS mean_to_delivered_secs,
       MIN(CASE WHEN to_delivered IS NOT NULL AND delivered_rank >= 0.5 * delivered_rows THEN to_delivered END) AS p50_to_delivered_secs,
       MIN(CASE WHEN to_delivered IS NOT NULL AND delivered_rank >= 0.95 * delivered_rows THEN to_delivered END) AS p95_to_delivered_secs
FROM ranked
GROUP BY account, template_id;
