-- The account's limits: templates in use, quota counters, live daemons. See docs/limits.md.

-- Templates per account, synced from WeChat's list and editable by SQL and the CLI.
CREATE TABLE templates (
    account      TEXT    NOT NULL,
    template_id  TEXT    NOT NULL,
    title        TEXT,
    -- With its {{name.DATA}} parameters; NULL until a sync has seen the template.
    content      TEXT,
    in_use       BOOLEAN NOT NULL DEFAULT false,
    in_use_since TIMESTAMPTZ,
    -- When WeChat's list last contained it.
    last_seen_at TIMESTAMPTZ,
    -- Why it is not in use, when the daemon took it out (40037, missing from the list).
    note         TEXT,
    PRIMARY KEY (account, template_id)
);

-- Sends counted per period: scope 'template:<id>' per month ('2026-11'), scope 'account' per
-- day ('2026-11-27'), in the configured timezone. A send is counted before its request leaves
-- and uncounted when WeChat refused it.
CREATE TABLE quota_usage (
    account    TEXT    NOT NULL,
    scope      TEXT    NOT NULL,
    period     TEXT    NOT NULL,
    used       INTEGER NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (account, scope, period)
);

-- Live daemons, for dividing the cluster-wide send rate.
CREATE TABLE daemons (
    owner        TEXT PRIMARY KEY,
    started_at   TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL
);

-- The periods a row's send was counted in, so a retry does not count it again.
ALTER TABLE outbox ADD COLUMN quota_month TEXT;
ALTER TABLE outbox ADD COLUMN quota_day TEXT;

-- Held rows come back when their next_attempt_at (the end of the period) passes.
CREATE INDEX outbox_held ON outbox (next_attempt_at) WHERE status = 'held';
DROP INDEX outbox_expiry;
CREATE INDEX outbox_expiry ON outbox (expires_at)
    WHERE status IN ('pending', 'held') AND expires_at IS NOT NULL;

-- Why a held row waits: 'template' (no room among templates in use), 'monthly quota',
-- 'daily quota'. NULL for rows that are not held.
ALTER TABLE outbox ADD COLUMN held_for TEXT;
