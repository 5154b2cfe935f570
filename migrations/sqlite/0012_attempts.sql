-- Attempts that did not end in a send (a retry, a failure, a wait, a release), for a row's
-- timeline on the dashboard (docs/dashboard.md). A sent attempt is the row's sent_at: the
-- happy path writes nothing here. At most 50 per row (attempts in doubt always: they are
-- bounded by retry.max_attempts); pruned with the rows (retention).
CREATE TABLE outbox_attempts (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id INTEGER     NOT NULL,
    at        TEXT        NOT NULL,
    -- The status the attempt left the row in.
    status    TEXT        NOT NULL,
    errcode   INTEGER,
    error     TEXT,
    -- The attempt may have reached WeChat: the row is never offered to be sent again.
    in_doubt  INTEGER     NOT NULL DEFAULT 0
);
CREATE INDEX outbox_attempts_row ON outbox_attempts (outbox_id, id);
CREATE INDEX outbox_attempts_at ON outbox_attempts (at);
