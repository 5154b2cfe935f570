-- Per-user pacing (`[limits] per_user_interval_secs`, docs/todays-wechat.md): when each
-- recipient may get their next send, shared by every daemon. Rows long past are pruned.
CREATE TABLE recipient_turns (
    account      TEXT        NOT NULL,
    openid       TEXT        NOT NULL,
    next_send_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (account, openid)
);
-- The prune deletes turns long past through this.
CREATE INDEX recipient_turns_next ON recipient_turns (next_send_at);
