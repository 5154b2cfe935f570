-- One app's row or one pushed event must never stop the others (docs/reliability.md,
-- "Hostile input"). SQLite stores any value in any column and cannot add a CHECK without
-- rebuilding the table under running apps, so the checks are triggers, one RAISE per column so
-- that the app's error names it.

-- Rows already waiting with a value the daemon cannot read fail now, naming the column.
UPDATE outbox SET status = 'failed', last_errcode = NULL, held_for = NULL,
       lease_owner = NULL, lease_expires_at = NULL,
       updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now'),
       last_error = CASE
           WHEN NOT (typeof(attempts) = 'integer' AND attempts BETWEEN 0 AND 1000000)
               THEN 'attempts is not an integer from 0 to 1000000; not sent'
           WHEN NOT (typeof(in_doubt) = 'integer' AND in_doubt IN (0, 1))
               THEN 'in_doubt is not 0 or 1; not sent'
           WHEN NOT (in_doubt_since IS NULL OR (typeof(in_doubt_since) = 'text' AND strftime('%s', in_doubt_since) IS NOT NULL))
               THEN 'in_doubt_since is not a time; not sent'
           WHEN NOT (typeof(next_attempt_at) = 'text' AND strftime('%s', next_attempt_at) IS NOT NULL)
               THEN 'next_attempt_at is not a time; not sent'
           ELSE 'quota_month or quota_day is not text; not sent' END
WHERE status IN ('pending', 'held', 'sending')
  AND NOT ((typeof(attempts) = 'integer' AND attempts BETWEEN 0 AND 1000000)
       AND (typeof(in_doubt) = 'integer' AND in_doubt IN (0, 1))
       AND (in_doubt_since IS NULL OR (typeof(in_doubt_since) = 'text' AND strftime('%s', in_doubt_since) IS NOT NULL))
       AND (typeof(next_attempt_at) = 'text' AND strftime('%s', next_attempt_at) IS NOT NULL)
       AND (quota_month IS NULL OR typeof(quota_month) = 'text')
       AND (quota_day IS NULL OR typeof(quota_day) = 'text'));

-- Times written by apps: a number outside years 0-9999 passed the old check and was normalised
-- to NULL, silently turning "expires in year 270000" into "never expires". Checked per column.
DROP TRIGGER outbox_times_valid_insert;
DROP TRIGGER outbox_times_valid_update;

CREATE TRIGGER outbox_send_after_valid_insert BEFORE INSERT ON outbox
WHEN NEW.send_after IS NOT NULL AND NOT (
        (typeof(NEW.send_after) = 'text' AND strftime('%s', NEW.send_after) IS NOT NULL)
     OR (typeof(NEW.send_after) IN ('integer', 'real') AND strftime('%s', NEW.send_after, 'unixepoch') IS NOT NULL))
BEGIN
    SELECT RAISE(ABORT, 'outbox: send_after must be a time in years 0-9999, such as datetime(''now'', ''+5 minutes''), ''2026-11-27T10:00:00+08:00'' or a Unix epoch number');
END;

CREATE TRIGGER outbox_send_after_valid_update BEFORE UPDATE OF send_after ON outbox
WHEN NEW.send_after IS NOT NULL AND NOT (
        (typeof(NEW.send_after) = 'text' AND strftime('%s', NEW.send_after) IS NOT NULL)
     OR (typeof(NEW.send_after) IN ('integer', 'real') AND strftime('%s', NEW.send_after, 'unixepoch') IS NOT NULL))
BEGIN
    SELECT RAISE(ABORT, 'outbox: send_after must be a time in years 0-9999, such as datetime(''now'', ''+5 minutes''), ''2026-11-27T10:00:00+08:00'' or a Unix epoch number');
END;

CREATE TRIGGER outbox_expires_at_valid_insert BEFORE INSERT ON outbox
WHEN NEW.expires_at IS NOT NULL AND NOT (
        (typeof(NEW.expires_at) = 'text' AND strftime('%s', NEW.expires_at) IS NOT NULL)
     OR (typeof(NEW.expires_at) IN ('integer', 'real') AND strftime('%s', NEW.expires_at, 'unixepoch') IS NOT NULL))
BEGIN
    SELECT RAISE(ABORT, 'outbox: expires_at must be a time in years 0-9999, such as datetime(''now'', ''+5 minutes''), ''2026-11-27T10:00:00+08:00'' or a Unix epoch number');
END;

CREATE TRIGGER outbox_expires_at_valid_update BEFORE UPDATE OF expires_at ON outbox
WHEN NEW.expires_at IS NOT NULL AND NOT (
        (typeof(NEW.expires_at) = 'text' AND strftime('%s', NEW.expires_at) IS NOT NULL)
     OR (typeof(NEW.expires_at) IN ('integer', 'real') AND strftime('%s', NEW.expires_at, 'unixepoch') IS NOT NULL))
BEGIN
    SELECT RAISE(ABORT, 'outbox: expires_at must be a time in years 0-9999, such as datetime(''now'', ''+5 minutes''), ''2026-11-27T10:00:00+08:00'' or a Unix epoch number');
END;

-- Columns the daemon owns, as Postgres' types and CHECKs hold them: an app that writes
-- `in_doubt = 'yes'` or `attempts = 2^40` is refused, naming the column.
CREATE TRIGGER outbox_daemon_columns_insert BEFORE INSERT ON outbox
WHEN NOT ((typeof(NEW.attempts) = 'integer' AND NEW.attempts BETWEEN 0 AND 1000000)
      AND (typeof(NEW.in_doubt) = 'integer' AND NEW.in_doubt IN (0, 1))
      AND (NEW.in_doubt_since IS NULL OR (typeof(NEW.in_doubt_since) = 'text' AND strftime('%s', NEW.in_doubt_since) IS NOT NULL))
      AND (typeof(NEW.next_attempt_at) = 'text' AND strftime('%s', NEW.next_attempt_at) IS NOT NULL)
      AND (NEW.quota_month IS NULL OR typeof(NEW.quota_month) = 'text')
      AND (NEW.quota_day IS NULL OR typeof(NEW.quota_day) = 'text'))
BEGIN
    SELECT RAISE(ABORT, 'outbox: attempts must be an integer from 0 to 1000000')
        WHERE NOT (typeof(NEW.attempts) = 'integer' AND NEW.attempts BETWEEN 0 AND 1000000);
    SELECT RAISE(ABORT, 'outbox: in_doubt must be 0 or 1')
        WHERE NOT (typeof(NEW.in_doubt) = 'integer' AND NEW.in_doubt IN (0, 1));
    SELECT RAISE(ABORT, 'outbox: in_doubt_since must be NULL or a time')
        WHERE NOT (NEW.in_doubt_since IS NULL OR (typeof(NEW.in_doubt_since) = 'text' AND strftime('%s', NEW.in_doubt_since) IS NOT NULL));
    SELECT RAISE(ABORT, 'outbox: next_attempt_at must be a time')
        WHERE NOT (typeof(NEW.next_attempt_at) = 'text' AND strftime('%s', NEW.next_attempt_at) IS NOT NULL);
    SELECT RAISE(ABORT, 'outbox: quota_month and quota_day must be NULL or text');
END;

-- The same on update, for the columns the daemon reads back, and on `status` so that a row put
-- back to `pending` by an app is checked too. It fires on the daemon's own claims and outcomes
-- (their values always pass): about 0.7 µs a row (docs/benchmarks.md).
CREATE TRIGGER outbox_daemon_columns_update
BEFORE UPDATE OF status, attempts, in_doubt, in_doubt_since, next_attempt_at, quota_month, quota_day
ON outbox
WHEN NOT ((typeof(NEW.attempts) = 'integer' AND NEW.attempts BETWEEN 0 AND 1000000)
      AND (typeof(NEW.in_doubt) = 'integer' AND NEW.in_doubt IN (0, 1))
      AND (NEW.in_doubt_since IS NULL OR (typeof(NEW.in_doubt_since) = 'text' AND strftime('%s', NEW.in_doubt_since) IS NOT NULL))
      AND (typeof(NEW.next_attempt_at) = 'text' AND strftime('%s', NEW.next_attempt_at) IS NOT NULL)
      AND (NEW.quota_month IS NULL OR typeof(NEW.quota_month) = 'text')
      AND (NEW.quota_day IS NULL OR typeof(NEW.quota_day) = 'text'))
  AND NEW.status IN ('pending', 'held', 'sending')
BEGIN
    SELECT RAISE(ABORT, 'outbox: attempts must be an integer from 0 to 1000000')
        WHERE NOT (typeof(NEW.attempts) = 'integer' AND NEW.attempts BETWEEN 0 AND 1000000);
    SELECT RAISE(ABORT, 'outbox: in_doubt must be 0 or 1')
        WHERE NOT (typeof(NEW.in_doubt) = 'integer' AND NEW.in_doubt IN (0, 1));
    SELECT RAISE(ABORT, 'outbox: in_doubt_since must be NULL or a time')
        WHERE NOT (NEW.in_doubt_since IS NULL OR (typeof(NEW.in_doubt_since) = 'text' AND strftime('%s', NEW.in_doubt_since) IS NOT NULL));
    SELECT RAISE(ABORT, 'outbox: next_attempt_at must be a time')
        WHERE NOT (typeof(NEW.next_attempt_at) = 'text' AND strftime('%s', NEW.next_attempt_at) IS NOT NULL);
    SELECT RAISE(ABORT, 'outbox: quota_month and quota_day must be NULL or text');
END;

-- Delivery events that never join (sent by another system on the same account, or whose
-- FromUserName is not the row's touser) are given up on instead of being probed every second
-- forever: `join_problem` says why, `given_up_at` when.
ALTER TABLE inbound_events ADD COLUMN given_up_at TEXT;
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
