-- Views for humans (psql, `pgflow inspect`, `pgflow runs|lag|show|dead-letters`).
-- Recreated on every `pgflow migrate` with CREATE OR REPLACE, so:
--   * only ever ADD columns, at the END of a view's select list (PostgreSQL refuses to
--     rename, retype or reorder the columns of an existing view), and
--   * never drop a view here: users may have built their own views on ours.
--
-- "Where is order-123 and how did it get there?" is one SELECT:
--   SELECT * FROM pgflow.run_history WHERE foreign_id = 'order-123' ORDER BY at, step;
-- (add `AND workflow = 'orders'` on big tables: it lets the planner use the indexes).

-- How long a run in progress may sit without moving before `pgflow.stuck_runs` lists
-- it. Default 15 minutes; per transaction `SET LOCAL pgflow.stuck_after = '1 hour'`
-- (a session `SET` is lost behind a transaction pooler), or for a whole database
-- `ALTER DATABASE app SET pgflow.stuck_after = '1 hour'`.
CREATE OR REPLACE FUNCTION pgflow.stuck_after() RETURNS interval
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(nullif(current_setting('pgflow.stuck_after', true), '')::interval,
                    interval '15 minutes')
$$;

-- Sessions holding a transaction id. pg_stat_activity hides the transaction details of
-- other roles' sessions from a role without pg_read_all_stats — such as pgflow_reader,
-- the role `pgflow inspect` runs as — which would blind pgflow.horizon. This function
-- runs as its owner (the role that ran `pgflow migrate`) and returns only the columns
-- the view shows; never the query text.
CREATE OR REPLACE FUNCTION pgflow.xid_holders()
RETURNS TABLE (pid integer, usename text, application_name text, client_addr text,
               state text, xact_start timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a.pid, a.usename::text, a.application_name, a.client_addr::text, a.state,
           a.xact_start
    FROM pg_catalog.pg_stat_activity a
    WHERE a.backend_xid IS NOT NULL AND a.xact_start IS NOT NULL
$$;

-- The oldest transaction holding an xid (also prepared ones). Readers deliver around
-- it (snapshot batches), but its own events wait until it commits, and it holds back
-- vacuum and `pgflow prune`. One row; age 0 and NULLs when none.
CREATE OR REPLACE VIEW pgflow.horizon AS
SELECT coalesce(extract(epoch FROM clock_timestamp() - o.xact_start), 0)::double precision
           AS age_seconds,
       o.pid,
       o.usename,
       o.application_name,
       o.client_addr,
       o.state,
       o.xact_start,
       o.prepared_gid,
       pg_snapshot_xmin(pg_current_snapshot())::text AS xmin
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT * FROM (
        SELECT a.pid, a.usename, a.application_name, a.client_addr, a.state,
               a.xact_start, NULL::text AS prepared_gid
        FROM pgflow.xid_holders() a
        UNION ALL
        SELECT NULL, p.owner::text, NULL, NULL, 'prepared', p.prepared, p.gid
        FROM pg_prepared_xacts p
    ) holders
    ORDER BY holders.xact_start
    LIMIT 1
) AS o ON true;

-- Per consumer and shard: where its cursor stands and how much is still ahead of it.
-- (The first ten columns are the original contract; later ones were appended.)
-- A cursor is a snapshot (pgflow/log/snapshots.py): cursor_tx is its xmin, cursor_id the
-- last id taken from the diff being read (0 between diffs); cursor_snapshot and
-- cursor_upto are the position itself. An event is ahead of the cursor when the cursor
-- has not consumed it (pgflow.consumed, migration 0013: not visible in the snapshot and
-- not yet taken from the diff being read).
CREATE OR REPLACE VIEW pgflow.consumer_lag AS
SELECT c.consumer,
       c.shard,
       c.shard_count,
       c.stream,
       c.types,
       pg_snapshot_xmin(c.snap) AS cursor_tx,
       c.after_id AS cursor_id,
       c.updated_at,
       ahead.events AS lag_events,
       -- clock_timestamp(): live even inside a long psql transaction; never negative.
       greatest(coalesce(extract(epoch FROM clock_timestamp() - ahead.oldest), 0), 0)::double precision
           AS lag_seconds,
       ahead.oldest AS oldest_pending_at,
       h.age_seconds AS horizon_age_seconds,
       c.snap::text AS cursor_snapshot,
       c.upto::text AS cursor_upto
FROM pgflow.cursors c
CROSS JOIN LATERAL (
    SELECT count(*) AS events, min(e.created_at) AS oldest
    FROM pgflow.events e
    WHERE e.stream = c.stream
      AND (c.types IS NULL OR e.type = ANY (c.types))
      AND e.tx >= pg_snapshot_xmin(c.snap)  -- the (stream, tx, id) index's bound
      AND NOT pgflow.consumed(e.tx, e.id, c.snap, c.upto, c.after_id)
      AND (c.shard_count = 1 OR e.shard_hash % c.shard_count = c.shard)
) ahead
CROSS JOIN (SELECT age_seconds FROM pgflow.horizon) h;

-- One row per run: its latest state, readably. `idle_for` is how long since it last
-- moved; `trace_id` is what to paste into Jaeger's search box.
CREATE OR REPLACE VIEW pgflow.runs AS
SELECT r.workflow,
       r.foreign_id,
       r.run_id,
       r.status,
       r.run_state,
       r.run_state IN ('INITIATED', 'RUNNING', 'PAUSED') AS active,
       r.version,
       r.err_count,
       r.last_error,
       r.retry_at,
       r.created_at,
       r.updated_at,
       date_trunc('second', now() - r.updated_at) AS idle_for,
       date_trunc('second', r.updated_at - r.created_at) AS age_at_last_move,
       substr(r.traceparent, 4, 32) AS trace_id,
       r.traceparent,
       r.object,
       r.meta,
       -- why the run is in its run state (pause/cancel/delete_data reason=, or the
       -- engine's own, e.g. "max error retry threshold hit")
       r.meta ->> 'run_state_reason' AS run_state_reason
FROM pgflow.records r;

-- Every transition of every run, in order (`step` 1, 2, ... per run). Built from the
-- event log (each record change appends an event carrying the new version, what
-- happened — `change`: trigger, step, pause, ... — and the run state after it).
-- Filters on workflow / foreign_id / run_id are pushed below the window functions
-- (they are its PARTITION BY columns), so one run's history reads a handful of rows.
CREATE OR REPLACE VIEW pgflow.run_history AS
SELECT r.workflow,
       r.foreign_id,
       r.run_id,
       row_number() OVER w AS step,
       lag(e.type) OVER w AS from_status,
       e.type AS status,
       e.headers ->> 'change' AS change,
       e.headers ->> 'run_state' AS run_state,
       e.version,
       e.created_at AS at,
       date_trunc('milliseconds', e.created_at - lag(e.created_at) OVER w) AS after,
       e.id AS event_id,
       substr(e.traceparent, 4, 32) AS trace_id,
       e.traceparent,
       e.headers,
       r.status AS current_status,
       r.run_state AS current_run_state,
       r.created_at AS run_created_at,
       e.headers ->> 'reason' AS reason
FROM pgflow.records r
JOIN pgflow.events e
  ON e.stream = r.workflow AND e.foreign_id = r.foreign_id AND e.run_id = r.run_id
WINDOW w AS (PARTITION BY r.workflow, r.foreign_id, r.run_id ORDER BY e.version, e.id);

-- Runs in progress that need a human look: paused, failing (err_count > 0), or not
-- moved for longer than pgflow.stuck_after() (15 minutes by default). A run waiting
-- on a timer that is not yet due is not stuck; one whose timer is long overdue is.
CREATE OR REPLACE VIEW pgflow.stuck_runs AS
SELECT r.workflow,
       r.foreign_id,
       r.run_id,
       r.status,
       r.run_state,
       CASE
           WHEN r.run_state = 'PAUSED' THEN 'paused'
           WHEN r.err_count > 0 THEN 'erroring'
           WHEN t.next_timer_at IS NOT NULL THEN 'timer overdue'
           ELSE 'idle'
       END AS reason,
       r.err_count,
       r.last_error,
       r.retry_at,
       date_trunc('second', now() - r.updated_at) AS idle_for,
       t.next_timer_at,
       r.updated_at,
       r.created_at,
       substr(r.traceparent, 4, 32) AS trace_id
FROM pgflow.records r
LEFT JOIN LATERAL (
    SELECT min(x.expire_at) AS next_timer_at
    FROM pgflow.timeouts x
    WHERE x.run_id = r.run_id AND NOT x.completed
) t ON true
WHERE r.run_state IN ('INITIATED', 'RUNNING', 'PAUSED')
  AND (r.run_state = 'PAUSED'
       OR r.err_count > 0
       OR (r.updated_at < now() - pgflow.stuck_after()
           AND (t.next_timer_at IS NULL OR t.next_timer_at < now() - pgflow.stuck_after())));

-- Dead letters, readably: `state` is pending until replayed (`pgflow dead-letters
-- --replay ID`).
CREATE OR REPLACE VIEW pgflow.dead_letter_queue AS
SELECT d.id,
       d.consumer,
       d.foreign_id,
       d.type,
       d.reason,
       d.attempts,
       CASE WHEN d.replayed_at IS NULL THEN 'pending' ELSE 'replayed' END AS state,
       d.created_at,
       d.replayed_at,
       date_trunc('second', now() - d.created_at) AS age,
       d.event_id,
       d.headers,
       d.payload
FROM pgflow.dead_letters d;

-- Runs per workflow, status and run state: the dashboard in one query.
CREATE OR REPLACE VIEW pgflow.run_counts AS
SELECT r.workflow,
       r.status,
       r.run_state,
       count(*) AS runs,
       count(*) FILTER (WHERE r.err_count > 0) AS erroring,
       min(r.updated_at) AS oldest_update,
       max(r.updated_at) AS newest_update
FROM pgflow.records r
GROUP BY r.workflow, r.status, r.run_state;
