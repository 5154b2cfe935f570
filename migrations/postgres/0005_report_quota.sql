-- The limits each account runs with, written by the daemon at start (they live in its
-- configuration), so that SQL can show the quota: report_quota. docs/reports.md.
CREATE TABLE account_limits (
    account              TEXT    PRIMARY KEY,
    active_templates     INTEGER NOT NULL,
    monthly_per_template INTEGER NOT NULL,
    daily_per_account    INTEGER NOT NULL,
    rate_per_second      INTEGER NOT NULL,
    -- Where quota months and days begin (limits.timezone).
    timezone             TEXT    NOT NULL,
    -- Its offset from UTC now; SQLite has no timezone rules, so the daemon refreshes it.
    utc_offset_minutes   INTEGER NOT NULL,
    updated_at           TIMESTAMPTZ NOT NULL
);

-- Per account and template: this month's sends against the monthly limit, the account's sends
-- today against the daily cap, and the day on which this month's pace so far would exhaust
-- the template's month (NULL when it would last the month). Templates in use, and any with
-- sends this month, have a row; an account with neither has one row without a template.
-- Postgres knows the timezone's rules, so periods follow `timezone` itself.
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
SELECT account, template_id, month, month_used, month_limit,
       GREATEST(month_limit - month_used, 0) AS month_remaining,
       CASE WHEN exhausted_at < month_end THEN to_char(exhausted_at, 'YYYY-MM-DD') END
         AS month_exhausted_on,
       day, day_used, day_limit, GREATEST(day_limit - day_used, 0) AS day_remaining
FROM figures;
