-- Reports for operators: the same view names and columns on both backends. docs/reports.md.
-- Days are Beijing days (UTC+8, no daylight saving), as WeChat counts them.

-- Rows per account, template and status.
CREATE VIEW report_status AS
SELECT account, template_id, status, COUNT(*) AS row_count
FROM outbox
GROUP BY account, template_id, status;

-- Per Beijing day of insertion, account and template: what happened to the rows.
CREATE VIEW report_daily AS
SELECT date(created_at, '+8 hours') AS day, account, template_id,
       COUNT(*) AS queued,
       SUM(CASE WHEN sent_at IS NOT NULL THEN 1 ELSE 0 END) AS sent,
       SUM(CASE WHEN status = 'delivered' THEN 1 ELSE 0 END) AS delivered,
       SUM(CASE WHEN status = 'blocked' THEN 1 ELSE 0 END) AS blocked,
       SUM(CASE WHEN status = 'undelivered' THEN 1 ELSE 0 END) AS undelivered,
       SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed,
       -- delivered among the rows whose delivery event arrived; NULL before any did
       CAST(SUM(CASE WHEN status = 'delivered' THEN 1 ELSE 0 END) AS REAL)
         / NULLIF(SUM(CASE WHEN status IN ('delivered', 'blocked', 'undelivered') THEN 1 ELSE 0 END), 0)
         AS delivery_rate
FROM outbox
GROUP BY 1, 2, 3;

-- Errors of the last 7 days, most frequent first: WeChat's errcodes and the daemon's reasons.
CREATE VIEW report_errors AS
SELECT last_errcode AS errcode, last_error AS error, COUNT(*) AS row_count, MAX(updated_at) AS last_seen
FROM outbox
WHERE last_error IS NOT NULL AND status <> 'sent'
  AND updated_at >= strftime('%Y-%m-%d %H:%M:%f', 'now', '-7 days')
GROUP BY last_errcode, last_error;

-- Rows that are overdue: pending for 5 minutes past their time, sending past the lease, sent an
-- hour ago with no delivery event yet.
CREATE VIEW report_stuck AS
SELECT id, account, template_id, status,
       CASE WHEN status = 'pending' THEN 'pending 5 minutes past next_attempt_at'
            WHEN status = 'sending' THEN 'sending past its lease'
            ELSE 'sent over an hour ago without a delivery event' END AS why,
       COALESCE(CASE WHEN status = 'pending' THEN next_attempt_at
                     WHEN status = 'sending' THEN lease_expires_at END, sent_at) AS since
FROM outbox
WHERE (status = 'pending' AND next_attempt_at < strftime('%Y-%m-%d %H:%M:%f', 'now', '-5 minutes')
       AND (send_after IS NULL OR send_after < strftime('%Y-%m-%d %H:%M:%f', 'now', '-5 minutes')))
   OR (status = 'sending' AND lease_expires_at < strftime('%Y-%m-%d %H:%M:%f', 'now'))
   OR (status = 'sent' AND sent_at < strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 hour'));

-- Seconds from insert to sent and from sent to the delivery event, over rows sent in the last
-- 24 hours: mean, and median and p95 by the nearest-rank method (the smallest value whose rank
-- is at least p·n), computed the same way on both backends.
CREATE VIEW report_latency AS
WITH timed AS (
    SELECT account, template_id,
           (julianday(sent_at) - julianday(created_at)) * 86400.0 AS to_sent,
           (julianday(delivered_at) - julianday(sent_at)) * 86400.0 AS to_delivered
    FROM outbox
    WHERE sent_at IS NOT NULL AND sent_at >= strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 day')
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
