-- Worker liveness (issue 9): one row per running `pgflow worker` process, refreshed
-- every few seconds. `pgflow workers` shows them; a row whose heartbeat is old belongs
-- to a process that died without saying goodbye (a clean stop deletes its row).
CREATE TABLE pgflow.workers (
    worker_id     uuid        PRIMARY KEY,
    host          text        NOT NULL,
    pid           integer     NOT NULL,
    workflows     text[]      NOT NULL,
    tasks         integer     NOT NULL DEFAULT 0,   -- supervised tasks this process runs
    failure       text,                             -- set when a task gave up
    interval_s    real        NOT NULL,             -- heartbeat period
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

-- A timeout whose timer() failed (issue 9): the row stands for "call timer() again at
-- expire_at" instead of "expire at expire_at". The poller re-arms it with backoff, so
-- a failing timer neither blocks the arming consumer nor re-runs the status's step.
ALTER TABLE pgflow.timeouts ADD COLUMN rearm boolean NOT NULL DEFAULT false;

-- Steps run once per (run, record version) (issue 9). A step that returns None (it
-- waits for a callback or a timeout) does not move the run, so the version alone
-- cannot tell a re-read event (a new shard layout, a lost cursor, two deploys at once)
-- from a new one. The step consumer sets this to the version it handled, in the
-- batch transaction, and skips events whose run has step_done_version = version.
ALTER TABLE pgflow.records ADD COLUMN step_done_version bigint;

-- Hooks run after commit from the event log (issue 9), read by a new consumer per hook
-- kind. Events up to this one were written by code that ran the hooks inside the
-- change's transaction: the hook consumers skip them, so an upgrade does not fire the
-- hooks of every past run again.
CREATE TABLE pgflow.hooks_from (event_id bigint NOT NULL);
INSERT INTO pgflow.hooks_from SELECT coalesce(max(id), 0) FROM pgflow.events;
