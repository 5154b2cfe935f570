-- The timestamp and nonce each push was signed with, and a hash of its body, kept for twice the
-- callback's timestamp window. Plain mode's signature covers no body: without this, one
-- observed URL would carry any number of forged pushes. The same triple with another body is
-- refused; an identical retry is answered without a second copy. See docs/delivery-events.md.
CREATE TABLE callback_replays (
    account         TEXT        NOT NULL,
    -- The query's `timestamp` and `nonce` as signed (text: the signature covers the text).
    timestamp_param TEXT        NOT NULL,
    nonce           TEXT        NOT NULL,
    -- sha1 of the body as received, hex.
    body_sha1       TEXT        NOT NULL,
    received_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (account, timestamp_param, nonce)
);
-- Entries past the window are deleted a few at a time with each push.
CREATE INDEX callback_replays_received ON callback_replays (received_at);
