-- Subscription notifications (订阅通知) from the same outbox. docs/subscribe.md.

-- What a row sends: 'template' (every row before this, and the default) or 'subscribe'. Any
-- other value fails its own row with a reason, rather than the app's INSERT.
ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'template';
-- A subscribe row's link (bizsend's `page`); template rows keep `url`.
ALTER TABLE outbox ADD COLUMN page TEXT;

-- Rows held for a user's consent, found when WeChat pushes it (one index probe per pushed
-- item, however many rows wait for other users). touser and template_id are at most 128
-- characters on a held row: longer ones fail before any hold.
CREATE INDEX outbox_held_for_consent ON outbox (account, touser, template_id)
    WHERE status = 'held' AND held_for = 'consent';

-- The account's subscription templates as /wxaapi/newtmpl/gettemplate lists them. `long_term`
-- is WeChat's type 3 (长期订阅: a consent serves until withdrawn); type 2 is one-time.
CREATE TABLE subscribe_templates (
    account      TEXT    NOT NULL,
    template_id  TEXT    NOT NULL,
    title        TEXT,
    -- With its typed {{thing1.DATA}} parameters.
    content      TEXT,
    example      TEXT,
    long_term    INTEGER NOT NULL DEFAULT 0,
    last_seen_at TEXT,
    -- Why it is not usable (missing from the list at the last sync).
    note         TEXT,
    PRIMARY KEY (account, template_id)
);

-- The consent ledger: what each user allowed the account to send them, per template. Written
-- from WeChat's pushes (subscribe_msg_popup_event, subscribe_msg_change_event) and from its
-- answers (43101 teaches a refusal); apps read report_consents to know whom they may notify.
CREATE TABLE consents (
    account     TEXT    NOT NULL,
    openid      TEXT    NOT NULL,
    template_id TEXT    NOT NULL,
    -- 'accept' or 'reject', the user's last word.
    status      TEXT    NOT NULL,
    -- One-time sends allowed and not used yet (each accept in a popup allows one).
    granted     INTEGER NOT NULL DEFAULT 0,
    -- Sends made under this consent that may have reached the user (accepted, or unknown).
    used        INTEGER NOT NULL DEFAULT 0,
    -- What wrote the last change: 'popup', 'change', 'wechat' (an answer such as 43101).
    source      TEXT    NOT NULL,
    -- When what it allows last changed: an answer, a one-time consent taken or given back
    -- (a long-term send only counts in `used`).
    updated_at  TEXT    NOT NULL,
    -- When the user (or WeChat's 43101) last said accept or reject; sends do not move it, so
    -- a 43101 answered to a request older than the user's last word does not overwrite it.
    answered_at TEXT,
    PRIMARY KEY (account, openid, template_id)
);

-- The consents changed lately (answered, or a one-time consent taken or given back), for the
-- release pass that wakes rows held for them.
CREATE INDEX consents_changed ON consents (updated_at);

-- Which template a subscription push is about (one row per <List> item).
ALTER TABLE inbound_events ADD COLUMN template_id TEXT;

-- Delivery events of both kinds wait for their rows in the same way.
DROP INDEX inbound_events_unjoined;
CREATE INDEX inbound_events_unjoined ON inbound_events (received_at)
    WHERE event IN ('TEMPLATESENDJOBFINISH', 'subscribe_msg_sent_event')
      AND joined_at IS NULL AND given_up_at IS NULL;

DROP VIEW report_events;
CREATE VIEW report_events AS
SELECT account,
       CASE WHEN joined_at IS NOT NULL THEN 'joined'
            WHEN given_up_at IS NOT NULL THEN 'given up'
            ELSE 'waiting' END AS state,
       join_problem AS problem,
       COUNT(*) AS event_count,
       MIN(received_at) AS first_received,
       MAX(received_at) AS last_received,
       event
FROM inbound_events
WHERE event IN ('TEMPLATESENDJOBFINISH', 'subscribe_msg_sent_event')
GROUP BY 1, 2, 3, 7;

-- Whom the account may notify, and with which template. docs/reports.md.
CREATE VIEW report_consents AS
SELECT c.account, c.openid, c.template_id, t.title, c.status,
       COALESCE(t.long_term, 0) AS long_term, c.granted, c.used,
       CASE WHEN c.status = 'accept' AND (c.granted > 0 OR COALESCE(t.long_term, 0) = 1)
            THEN 1 ELSE 0 END AS may_send,
       c.source, c.updated_at
FROM consents c
LEFT JOIN subscribe_templates t ON t.account = c.account AND t.template_id = c.template_id;
