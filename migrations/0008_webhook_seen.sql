-- Webhook replay protection: the event ids (or, for id-less signed posts, the
-- signature) a webhook connector has stored, per stream. A post whose id is here is
-- answered 200 with the first post's position and not stored again. Claimed in the
-- same transaction as the pgflow.events insert, so "seen" and "stored" commit together.

CREATE TABLE pgflow.webhook_seen (
    stream    text        NOT NULL,              -- 'webhook:<name>'
    event_id  text        NOT NULL,              -- the sender's id, or 'v1:<signature>'
    position  bigint      NOT NULL,              -- pgflow.events.id of the stored event
    seen_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, event_id)
);
CREATE INDEX webhook_seen_seen_at ON pgflow.webhook_seen (seen_at);
