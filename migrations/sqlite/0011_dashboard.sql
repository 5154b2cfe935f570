-- What operators did from the dashboard (docs/dashboard.md): who, what, to which rows. Written
-- in the same transaction as the change it records.
CREATE TABLE dashboard_audit (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    at            TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    -- The configured user (basic auth) or 'token' (bearer).
    actor         TEXT        NOT NULL,
    -- cancel, cancel_matching, resend, resume_account, template_out_of_use
    action        TEXT        NOT NULL,
    account       TEXT,
    template_id   TEXT,
    -- The row acted on (cancel, resend), and the row a resend created.
    outbox_id     INTEGER,
    new_outbox_id INTEGER,
    -- Rows the action changed.
    row_count     INTEGER      NOT NULL DEFAULT 0,
    detail        TEXT        NOT NULL
);
CREATE INDEX dashboard_audit_outbox ON dashboard_audit (outbox_id) WHERE outbox_id IS NOT NULL;
CREATE INDEX dashboard_audit_new_outbox ON dashboard_audit (new_outbox_id)
    WHERE new_outbox_id IS NOT NULL;
-- A failed row is sent again once: a second click (or a second operator) finds it done.
CREATE UNIQUE INDEX dashboard_audit_resent_once ON dashboard_audit (outbox_id)
    WHERE action = 'resend';

-- A message's page lists the delivery events joined to it.
CREATE INDEX inbound_events_outbox ON inbound_events (outbox_id) WHERE outbox_id IS NOT NULL;
