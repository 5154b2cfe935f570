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
    updated_at           TEXT    NOT NULL
);

-- Per account and template: this month's sends against the monthly limit, the account's sends
-- today against the daily cap, and the day on which this month's pace so far would exhaust
-- the template's month (NULL when it would last the month). Templates in use, and any with
-- sends this month, have a row; an account with neither has one row without a template.
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
SELECT account, template_id, month, month_used, month_limit,
       MAX(month_limit - month_used, 0) AS month_remaining,
       CASE WHEN exhausted_at < month_end THEN date(exhausted_at) END AS month_exhausted_on,
       day, day_used, day_limit, MAX(day_limit - day_used, 0) AS day_remaining
FROM figures;
