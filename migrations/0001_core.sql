-- pgflow core schema: the event log, consumer cursors, workflow records,
-- timeouts and dead letters. Applied once by `pgflow migrate`.

CREATE SCHEMA IF NOT EXISTS pgflow;

-- The append-only event log. `tx` is the writer's top-level transaction id:
-- readers only deliver events whose transaction finished before the oldest
-- transaction still running (the xid horizon), so late commits are never skipped.
CREATE TABLE pgflow.events (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx            xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream        text        NOT NULL,              -- workflow or source name
    type          text        NOT NULL,              -- status name / event type
    foreign_id    text        NOT NULL,
    run_id        uuid,
    version       bigint      NOT NULL DEFAULT 0,    -- record version this event reflects
    -- stable, language-independent shard hash of foreign_id (md5 prefix, 28 bits)
    shard_hash    integer     NOT NULL GENERATED ALWAYS AS
                     (('x' || substr(md5(foreign_id), 1, 7))::bit(28)::integer) STORED,
    headers       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    traceparent   text,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- The per-consumer read: stream = ? AND type = ANY(?) AND (tx, id) > (?, ?) ORDER BY tx, id.
CREATE INDEX events_stream_type_tx_id ON pgflow.events (stream, type, tx, id);
CREATE INDEX events_foreign_id ON pgflow.events (stream, foreign_id, id);
CREATE INDEX events_tx_id ON pgflow.events (tx, id);

-- One row per (consumer, shard): the pair cursor, advanced by compare-and-set in
-- the same transaction as the consumer's effects. `stream`/`types` record the
-- consumer's filter so `pgflow.consumer_lag` can count what is still ahead of it.
CREATE TABLE pgflow.cursors (
    consumer     text        NOT NULL,
    shard        integer     NOT NULL,
    shard_count  integer     NOT NULL,
    tx           xid8        NOT NULL DEFAULT '0'::xid8,
    id           bigint      NOT NULL DEFAULT 0,
    stream       text,
    types        text[],
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, shard, shard_count),
    CHECK (shard >= 0 AND shard < shard_count)
);

-- One row per workflow run: its current status and object.
CREATE TABLE pgflow.records (
    run_id       uuid        PRIMARY KEY,
    workflow     text        NOT NULL,
    foreign_id   text        NOT NULL,
    status       text        NOT NULL,
    run_state    text        NOT NULL,
    object       jsonb,
    version      bigint      NOT NULL DEFAULT 1,
    err_count    integer     NOT NULL DEFAULT 0,
    last_error   text,
    traceparent  text,
    meta         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (run_state IN ('INITIATED', 'RUNNING', 'PAUSED', 'COMPLETED', 'CANCELLED',
                         'REQUESTED_DATA_DELETED', 'DATA_DELETED'))
);
-- At most one active run per (workflow, foreign id): concurrent triggers race here.
CREATE UNIQUE INDEX records_one_active_run ON pgflow.records (workflow, foreign_id)
    WHERE run_state IN ('INITIATED', 'RUNNING', 'PAUSED');
CREATE INDEX records_workflow_foreign_id ON pgflow.records (workflow, foreign_id, created_at);
CREATE INDEX records_workflow_status ON pgflow.records (workflow, status, run_state);

-- Timers armed by add_timeout; fired exactly once by the timeout poller.
CREATE TABLE pgflow.timeouts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow     text        NOT NULL,
    foreign_id   text        NOT NULL,
    run_id       uuid        NOT NULL,
    status       text        NOT NULL,
    version      bigint      NOT NULL,
    expire_at    timestamptz NOT NULL,
    completed    boolean     NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX timeouts_due ON pgflow.timeouts (workflow, status, expire_at) WHERE NOT completed;
CREATE UNIQUE INDEX timeouts_one_per_status ON pgflow.timeouts (run_id, status, version);

-- Events that could not be processed after all retries, with the reason.
CREATE TABLE pgflow.dead_letters (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer     text        NOT NULL,
    event_id     text        NOT NULL,
    foreign_id   text,
    type         text,
    headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    payload      jsonb,
    reason       text        NOT NULL,
    attempts     integer     NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    replayed_at  timestamptz,
    UNIQUE (consumer, event_id)
);

-- Cron schedules registered with Workflow.schedule().
CREATE TABLE pgflow.schedules (
    workflow     text        NOT NULL,
    foreign_id   text        NOT NULL,
    spec         text        NOT NULL,
    next_at      timestamptz NOT NULL,
    last_at      timestamptz,
    PRIMARY KEY (workflow, foreign_id)
);
