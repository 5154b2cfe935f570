-- The outbox: apps insert rows, the daemon sends them. See README "The SQL contract".
-- Times are stored as UTC text 'YYYY-MM-DD HH:MM:SS.SSS', which sorts and compares as text.
-- Apps may write any form SQLite's date functions understand (datetime('now'), ISO 8601 with
-- 'T', 'Z' or an offset, or a Unix epoch number); triggers below refuse what does not parse
-- and normalise the rest, so comparisons stay correct.
CREATE TABLE outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    -- written by apps
    account          TEXT    NOT NULL DEFAULT 'default',
    touser           TEXT,
    template_id      TEXT,
    data             TEXT,
    url              TEXT,
    miniprogram      TEXT,
    client_msg_id    TEXT,
    priority         INTEGER NOT NULL DEFAULT 0,
    -- NUMERIC, not TEXT: TEXT affinity would turn an epoch number into text that reads as a
    -- Julian day. ISO text stays text; the triggers below normalise both.
    send_after       NUMERIC,
    expires_at       NUMERIC,
    -- owned by the daemon
    status           TEXT    NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    in_doubt         INTEGER NOT NULL DEFAULT 0,
    -- When the first attempt that may have reached WeChat began: the start of its
    -- client_msg_id de-duplication window. NULL while nothing is in doubt.
    in_doubt_since   TEXT,
    last_errcode     INTEGER,
    last_error       TEXT,
    msgid            INTEGER,
    lease_owner      TEXT,
    lease_expires_at TEXT,
    created_at       TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    sent_at          TEXT,
    updated_at       TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    -- held, delivered, blocked and undelivered are set by the quota and delivery-event features;
    -- they are admitted now because SQLite cannot change a CHECK without rebuilding the table.
    CONSTRAINT outbox_status_valid CHECK (status IN
        ('pending', 'sending', 'sent', 'failed', 'expired', 'cancelled', 'unknown',
         'held', 'delivered', 'blocked', 'undelivered')),
    -- SQLite would otherwise store any type in any column; refuse at insert what Postgres refuses.
    CONSTRAINT outbox_account_text CHECK (typeof(account) = 'text'),
    CONSTRAINT outbox_priority_integer CHECK (typeof(priority) = 'integer'),
    CONSTRAINT outbox_text_columns CHECK (
        (touser IS NULL OR typeof(touser) = 'text')
        AND (template_id IS NULL OR typeof(template_id) = 'text')
        AND (data IS NULL OR typeof(data) = 'text')
        AND (url IS NULL OR typeof(url) = 'text')
        AND (miniprogram IS NULL OR typeof(miniprogram) = 'text')
        AND (client_msg_id IS NULL OR typeof(client_msg_id) = 'text'))
);

-- An app's own idempotency key: a second insert with the same account + client_msg_id fails.
CREATE UNIQUE INDEX outbox_client_msg_id ON outbox (account, client_msg_id)
    WHERE client_msg_id IS NOT NULL;
-- Serves the claim exactly: pending rows in the order they are taken.
CREATE INDEX outbox_claim ON outbox (priority DESC, next_attempt_at, id) WHERE status = 'pending';
-- Serve the once-a-second maintenance pass without scanning the backlog: the lease rescuer,
-- expiry, and the settling of in-doubt rows.
CREATE INDEX outbox_leases ON outbox (lease_expires_at) WHERE status = 'sending';
CREATE INDEX outbox_expiry ON outbox (expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;
CREATE INDEX outbox_in_doubt ON outbox (in_doubt_since) WHERE status = 'pending' AND in_doubt = 1;

-- Times written by apps: refuse what SQLite cannot read as a time, like Postgres does...
CREATE TRIGGER outbox_times_valid_insert BEFORE INSERT ON outbox
WHEN (NEW.send_after IS NOT NULL AND typeof(NEW.send_after) = 'text'
        AND strftime('%s', NEW.send_after) IS NULL)
  OR (NEW.expires_at IS NOT NULL AND typeof(NEW.expires_at) = 'text'
        AND strftime('%s', NEW.expires_at) IS NULL)
  OR (NEW.send_after IS NOT NULL AND typeof(NEW.send_after) NOT IN ('text', 'integer', 'real'))
  OR (NEW.expires_at IS NOT NULL AND typeof(NEW.expires_at) NOT IN ('text', 'integer', 'real'))
BEGIN
    SELECT RAISE(ABORT, 'outbox: send_after and expires_at must be times such as datetime(''now'', ''+5 minutes''), ''2026-11-27T10:00:00+08:00'' or a Unix epoch number');
END;

CREATE TRIGGER outbox_times_valid_update BEFORE UPDATE OF send_after, expires_at ON outbox
WHEN (NEW.send_after IS NOT NULL AND typeof(NEW.send_after) = 'text'
        AND strftime('%s', NEW.send_after) IS NULL)
  OR (NEW.expires_at IS NOT NULL AND typeof(NEW.expires_at) = 'text'
        AND strftime('%s', NEW.expires_at) IS NULL)
  OR (NEW.send_after IS NOT NULL AND typeof(NEW.send_after) NOT IN ('text', 'integer', 'real'))
  OR (NEW.expires_at IS NOT NULL AND typeof(NEW.expires_at) NOT IN ('text', 'integer', 'real'))
BEGIN
    SELECT RAISE(ABORT, 'outbox: send_after and expires_at must be times such as datetime(''now'', ''+5 minutes''), ''2026-11-27T10:00:00+08:00'' or a Unix epoch number');
END;

-- ...and normalise the rest to the canonical UTC text form (numbers are Unix epoch seconds).
CREATE TRIGGER outbox_times_normalise_insert AFTER INSERT ON outbox
WHEN NEW.send_after IS NOT NULL OR NEW.expires_at IS NOT NULL
BEGIN
    UPDATE outbox SET
        send_after = CASE
            WHEN NEW.send_after IS NULL THEN NULL
            WHEN typeof(NEW.send_after) = 'text' THEN strftime('%Y-%m-%d %H:%M:%f', NEW.send_after)
            ELSE strftime('%Y-%m-%d %H:%M:%f', NEW.send_after, 'unixepoch') END,
        expires_at = CASE
            WHEN NEW.expires_at IS NULL THEN NULL
            WHEN typeof(NEW.expires_at) = 'text' THEN strftime('%Y-%m-%d %H:%M:%f', NEW.expires_at)
            ELSE strftime('%Y-%m-%d %H:%M:%f', NEW.expires_at, 'unixepoch') END
    WHERE id = NEW.id;
END;

CREATE TRIGGER outbox_times_normalise_update AFTER UPDATE OF send_after, expires_at ON outbox
BEGIN
    UPDATE outbox SET
        send_after = CASE
            WHEN NEW.send_after IS NULL THEN NULL
            WHEN typeof(NEW.send_after) = 'text' THEN strftime('%Y-%m-%d %H:%M:%f', NEW.send_after)
            ELSE strftime('%Y-%m-%d %H:%M:%f', NEW.send_after, 'unixepoch') END,
        expires_at = CASE
            WHEN NEW.expires_at IS NULL THEN NULL
            WHEN typeof(NEW.expires_at) = 'text' THEN strftime('%Y-%m-%d %H:%M:%f', NEW.expires_at)
            ELSE strftime('%Y-%m-%d %H:%M:%f', NEW.expires_at, 'unixepoch') END
    WHERE id = NEW.id;
END;

-- Accounts held back by WeChat (45009 daily limit, 48001/48004 not authorised or banned).
-- Delete a row to resume the account at once.
CREATE TABLE account_pauses (
    account      TEXT PRIMARY KEY,
    paused_until TEXT NOT NULL,
    errcode      INTEGER,
    reason       TEXT NOT NULL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

-- One access token per account, shared by every daemon on this database. The refresh lease
-- lets one daemon at a time fetch a new token while the others wait for it.
CREATE TABLE access_tokens (
    account             TEXT PRIMARY KEY,
    access_token        TEXT,
    expires_at          TEXT,
    refreshed_at        TEXT,
    refresh_owner       TEXT,
    refresh_lease_until TEXT
);
