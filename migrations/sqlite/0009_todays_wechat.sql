-- What WeChat added since the 2014 interface page (docs/todays-wechat.md).

-- Users who refused a template (43101, WeChat 8.0.38 and later): later rows to the same
-- account, openid and template fail without a request or quota until `expires_at` (the user
-- can accept the template again). Delete a row to send to the pair again at once.
CREATE TABLE refusals (
    account     TEXT    NOT NULL,
    openid      TEXT    NOT NULL,
    template_id TEXT    NOT NULL,
    refused_at  TEXT    NOT NULL,
    expires_at  TEXT    NOT NULL,
    -- The row WeChat refused.
    outbox_id   INTEGER,
    PRIMARY KEY (account, openid, template_id)
);

-- WeChat's own count of the account's template sends today (openapi/quota/get), read at start
-- and hourly, beside the daemon's count at the same moment.
CREATE TABLE wechat_quota (
    account     TEXT    PRIMARY KEY,
    daily_limit INTEGER NOT NULL,
    used        INTEGER NOT NULL,
    remain      INTEGER NOT NULL,
    own_used    INTEGER NOT NULL,
    read_at     TEXT    NOT NULL
);

-- Refusals in force and expired (docs/reports.md).
CREATE VIEW report_refusals AS
SELECT account, template_id, openid, refused_at, expires_at,
       CASE WHEN expires_at > strftime('%Y-%m-%d %H:%M:%f', 'now') THEN 1 ELSE 0 END AS in_force
FROM refusals r;

-- report_daily counts undelivered rows whose event said WeChat's frequency limit on their own.
DROP VIEW report_daily;
CREATE VIEW report_daily AS
SELECT date(created_at, '+8 hours') AS day, account, template_id,
       COUNT(*) AS queued,
       SUM(CASE WHEN sent_at IS NOT NULL THEN 1 ELSE 0 END) AS sent,
       SUM(CASE WHEN status = 'delivered' THEN 1 ELSE 0 END) AS delivered,
       SUM(CASE WHEN status = 'blocked' THEN 1 ELSE 0 END) AS blocked,
       SUM(CASE WHEN status = 'undelivered' THEN 1 ELSE 0 END) AS undelivered,
       SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed,
       CAST(SUM(CASE WHEN status = 'delivered' THEN 1 ELSE 0 END) AS REAL)
         / NULLIF(SUM(CASE WHEN status IN ('delivered', 'blocked', 'undelivered') THEN 1 ELSE 0 END), 0)
         AS delivery_rate,
       -- among undelivered: the event said `failed:freq limit`
       SUM(CASE WHEN status = 'undelivered' AND lower(delivery_status) LIKE '%freq%'
                THEN 1 ELSE 0 END) AS freq_limited
FROM outbox
GROUP BY 1, 2, 3;

-- report_quota shows WeChat's own figures beside the daemon's.
DROP VIEW report_quota;
CREATE VIEW report_quota AS
WITH clock AS (
    SELECT l.*, datetime('now', printf('%+d minutes', l.utc_offset_minutes)) AS local_now
    FROM account_limits l
), periods AS (
    SELECT c.*, strftime('%Y-%m', local_now) AS month, strftime('%Y-%m-%d', local_now) AS day,
           julianday(strftime('%Y-%m-01 00:00:00', local_now)) AS month_start,
           julianday(datetime(strftime('%Y-%m-01 00:00:00', local_now), '+1 month')) AS month_end,
           julianday(local_now) - julianday(strftime('%Y-%m-01 00:00:00', local_now)) AS elapsed_days
    FROM clock c
), month_templates AS (
    SELECT q.account, substr(q.scope, 10) AS template_id
    FROM quota_usage q JOIN periods p ON p.account = q.account AND q.period = p.month
    WHERE q.scope LIKE 'template:%'
    UNION
    SELECT account, template_id FROM templates WHERE in_use = 1
), figures AS (
    SELECT p.account, t.template_id, p.month, COALESCE(m.used, 0) AS month_used,
           p.monthly_per_template AS month_limit,
           p.month_start + p.elapsed_days * p.monthly_per_template / NULLIF(m.used, 0) AS exhausted_at,
           p.month_end, p.day, COALESCE(d.used, 0) AS day_used, p.daily_per_account AS day_limit
    FROM periods p
    LEFT JOIN month_templates t ON t.account = p.account
    LEFT JOIN quota_usage m
           ON m.account = p.account AND m.scope = 'template:' || t.template_id AND m.period = p.month
    LEFT JOIN quota_usage d ON d.account = p.account AND d.scope = 'account' AND d.period = p.day
)
SELECT f.account, f.template_id, f.month, f.month_used, f.month_limit,
       MAX(f.month_limit - f.month_used, 0) AS month_remaining,
       CASE WHEN f.exhausted_at < f.month_end THEN date(f.exhausted_at) END AS month_exhausted_on,
       f.day, f.day_used, f.day_limit, MAX(f.day_limit - f.day_used, 0) AS day_remaining,
       w.daily_limit AS wechat_day_limit, w.used AS wechat_day_used,
       w.remain AS wechat_day_remaining, w.read_at AS wechat_read_at
FROM figures f LEFT JOIN wechat_quota w ON w.account = f.account;

-- report_stuck no longer lists sent rows without a msgid (a resend WeChat answered 40241, or an
-- answer without one): no delivery event can join them, so they are not waiting for one.
DROP VIEW report_stuck;
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
   OR (status = 'sent' AND msgid IS NOT NULL AND sent_at < strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 hour'));
