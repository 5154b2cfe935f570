-- What WeChat added since the 2014 interface page (docs/todays-wechat.md).

-- Users who refused a template (43101, WeChat 8.0.38 and later): later rows to the same
-- account, openid and template fail without a request or quota until `expires_at` (the user
-- can accept the template again). Delete a row to send to the pair again at once.
CREATE TABLE refusals (
    account     TEXT        NOT NULL,
    openid      TEXT        NOT NULL,
    template_id TEXT        NOT NULL,
    refused_at  TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL,
    -- The row WeChat refused.
    outbox_id   BIGINT,
    PRIMARY KEY (account, openid, template_id)
);

-- WeChat's own count of the account's template sends today (openapi/quota/get), read at start
-- and hourly, beside the daemon's count at the same moment.
CREATE TABLE wechat_quota (
    account     TEXT        PRIMARY KEY,
    daily_limit BIGINT      NOT NULL,
    used        BIGINT      NOT NULL,
    remain      BIGINT      NOT NULL,
    own_used    BIGINT      NOT NULL,
    read_at     TIMESTAMPTZ NOT NULL
);

-- Refusals in force and expired (docs/reports.md).
CREATE VIEW report_refusals AS
SELECT account, template_id, openid, refused_at, expires_at,
       CAST(CASE WHEN expires_at > now() THEN 1 ELSE 0 END AS BIGINT) AS in_force
FROM refusals r;

-- report_daily counts undelivered rows whose event said WeChat's frequency limit on their own.
DROP VIEW report_daily;
CREATE VIEW report_daily AS
SELECT to_char(created_at AT TIME ZONE 'Asia/Shanghai', 'YYYY-MM-DD') AS day, account, template_id,
       COUNT(*) AS queued,
       COUNT(*) FILTER (WHERE sent_at IS NOT NULL) AS sent,
       COUNT(*) FILTER (WHERE status = 'delivered') AS delivered,
       COUNT(*) FILTER (WHERE status = 'blocked') AS blocked,
       COUNT(*) FILTER (WHERE status = 'undelivered') AS undelivered,
       COUNT(*) FILTER (WHERE status = 'failed') AS failed,
       CAST(COUNT(*) FILTER (WHERE status = 'delivered') AS double precision)
         / NULLIF(COUNT(*) FILTER (WHERE status IN ('delivered', 'blocked', 'undelivered')), 0)
         AS delivery_rate,
       -- among undelivered: the event said `failed:freq limit`
       COUNT(*) FILTER (WHERE status = 'undelivered' AND lower(delivery_status) LIKE '%freq%')
         AS freq_limited
FROM outbox
GROUP BY 1, 2, 3;

-- report_quota shows WeChat's own figures beside the daemon's.
DROP VIEW report_quota;
CREATE VIEW report_quota AS
WITH clock AS (
    SELECT l.*, now() AT TIME ZONE l.timezone AS local_now
    FROM account_limits l
), periods AS (
    SELECT c.*, to_char(local_now, 'YYYY-MM') AS month, to_char(local_now, 'YYYY-MM-DD') AS day,
           date_trunc('month', local_now) AS month_start,
           date_trunc('month', local_now) + interval '1 month' AS month_end,
           CAST(EXTRACT(EPOCH FROM local_now - date_trunc('month', local_now)) AS double precision)
             / 86400 AS elapsed_days
    FROM clock c
), month_templates AS (
    SELECT q.account, substr(q.scope, 10) AS template_id
    FROM quota_usage q JOIN periods p ON p.account = q.account AND q.period = p.month
    WHERE q.scope LIKE 'template:%'
    UNION
    SELECT account, template_id FROM templates WHERE in_use
), figures AS (
    SELECT p.account, t.template_id, p.month, CAST(COALESCE(m.used, 0) AS BIGINT) AS month_used,
           CAST(p.monthly_per_template AS BIGINT) AS month_limit,
           p.month_start + p.elapsed_days * p.monthly_per_template / NULLIF(m.used, 0)
             * interval '1 day' AS exhausted_at,
           p.month_end, p.day, CAST(COALESCE(d.used, 0) AS BIGINT) AS day_used,
           CAST(p.daily_per_account AS BIGINT) AS day_limit
    FROM periods p
    LEFT JOIN month_templates t ON t.account = p.account
    LEFT JOIN quota_usage m
           ON m.account = p.account AND m.scope = 'template:' || t.template_id AND m.period = p.month
    LEFT JOIN quota_usage d ON d.account = p.account AND d.scope = 'account' AND d.period = p.day
)
SELECT f.account, f.template_id, f.month, f.month_used, f.month_limit,
       GREATEST(f.month_limit - f.month_used, 0) AS month_remaining,
       CASE WHEN f.exhausted_at < f.month_end THEN to_char(f.exhausted_at, 'YYYY-MM-DD') END
         AS month_exhausted_on,
       f.day, f.day_used, f.day_limit, GREATEST(f.day_limit - f.day_used, 0) AS day_remaining,
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
WHERE (status = 'pending' AND next_attempt_at < now() - interval '5 minutes'
       AND (send_after IS NULL OR send_after < now() - interval '5 minutes'))
   OR (status = 'sending' AND lease_expires_at < now())
   OR (status = 'sent' AND msgid IS NOT NULL AND sent_at < now() - interval '1 hour');
