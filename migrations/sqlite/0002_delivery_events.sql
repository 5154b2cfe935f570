-- Delivery events: what WeChat pushes to the callback endpoint, kept before it is answered,
-- and joined to the sent row by msgid. See docs/delivery-events.md.

-- The raw Status of the TEMPLATESENDJOBFINISH event and WeChat's time of it.
ALTER TABLE outbox ADD COLUMN delivery_status TEXT;
ALTER TABLE outbox ADD COLUMN delivered_at TEXT;
CREATE INDEX outbox_msgid ON outbox (account, msgid) WHERE msgid IS NOT NULL;

-- Every accepted push, once: WeChat's retries of the same push share a dedup_key.
CREATE TABLE inbound_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    account     TEXT    NOT NULL,
    dedup_key   TEXT    NOT NULL,
    msg_type    TEXT,
    event       TEXT,
    from_user   TEXT,
    to_user     TEXT,
    create_time INTEGER,
    -- MsgID of a template event (the send's msgid), or MsgId of a user message.
    msgid       INTEGER,
    -- Status of a TEMPLATESENDJOBFINISH event, as WeChat wrote it.
    status      TEXT,
    -- The decrypted XML, for apps that read other pushes by SQL.
    raw_xml     TEXT    NOT NULL,
    received_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    -- Set when a template event has been joined to its outbox row.
    outbox_id   INTEGER,
    joined_at   TEXT
);
CREATE UNIQUE INDEX inbound_events_dedup ON inbound_events (account, dedup_key);
CREATE INDEX inbound_events_unjoined ON inbound_events (account, msgid)
    WHERE event = 'TEMPLATESENDJOBFINISH' AND joined_at IS NULL;

-- Users who unsubscribed: rows for them fail at once without an API call or quota.
-- `subscribe` deletes the row.
CREATE TABLE suppressed_openids (
    account TEXT NOT NULL,
    openid  TEXT NOT NULL,
    since   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    PRIMARY KEY (account, openid)
);
