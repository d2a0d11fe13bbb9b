-- Snapshot batches (see pgflow/snapshots.py): a reader's position becomes a snapshot
-- instead of a (tx, id) pair below the xid horizon, so an open transaction anywhere in
-- the cluster no longer stalls every reader.

-- 1. Cursors: the position is (snap, upto, after_id, lo, hi).
--    Everything visible in `snap` is consumed; while a diff is read in chunks, `upto`
--    is its upper snapshot, `after_id` the last id taken from it, lo/hi the id bounds
--    of its new transactions.
DROP VIEW IF EXISTS pgflow.consumer_lag;  -- recreated by sql/views.sql

ALTER TABLE pgflow.cursors
    ADD COLUMN snap     pg_snapshot NOT NULL DEFAULT '1:1:',
    ADD COLUMN upto     pg_snapshot,
    ADD COLUMN after_id bigint      NOT NULL DEFAULT 0,
    ADD COLUMN lo       bigint,
    ADD COLUMN hi       bigint,
    -- The table a connector cursor reads (e.g. 'pgflow.changes'); NULL for cursors
    -- of the event log (`stream`) and for query sources. Prune keeps the change log's
    -- rows until every cursor whose source is pgflow.changes has read them.
    ADD COLUMN source   text;

-- Convert 0.1 positions with nothing redelivered and nothing skipped. A (tx, id)
-- cursor below the xid horizon consumed every transaction before `tx` (all final when
-- it was written) and the events of `tx` up to `id`. That is the snapshot
-- 'tx:tx:' (everything before tx visible) in the middle of the diff to
-- 'tx+1:tx+1:' (tx's own events) after `id`. hi bounds that diff: the largest id of
-- tx's events (event-log cursors), or unbounded for connector cursors over other
-- tables (read once, to the end, then the cursor is a plain snapshot).
UPDATE pgflow.cursors c
SET snap = (c.tx::text || ':' || c.tx::text || ':')::pg_snapshot,
    upto = ((c.tx::text::numeric + 1)::text || ':' || (c.tx::text::numeric + 1)::text || ':')::pg_snapshot,
    after_id = c.id,
    lo = NULL,
    hi = CASE WHEN c.stream IS NULL THEN 9223372036854775807
              ELSE coalesce((SELECT max(e.id) FROM pgflow.events e WHERE e.tx = c.tx), 0) END
WHERE c.tx > '0'::xid8;

ALTER TABLE pgflow.cursors DROP COLUMN tx, DROP COLUMN id;

-- 2. `tx` cannot be forged: whatever an INSERT says, the row gets its writer's
--    transaction id. (A row stamped with an older, already-read transaction's id would
--    fall into a diff that was read before it existed and never be delivered.)
CREATE FUNCTION pgflow.stamp_tx() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.tx := pg_catalog.pg_current_xact_id();
    RETURN NEW;
END
$$;

-- The same for an app table whose transaction-id column has another name (slower:
-- generic record assignment). Argument: the column name.
CREATE FUNCTION pgflow.stamp_tx_column() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW := pg_catalog.jsonb_populate_record(NEW,
        pg_catalog.jsonb_build_object(TG_ARGV[0], pg_catalog.pg_current_xact_id()));
    RETURN NEW;
END
$$;

CREATE TRIGGER stamp_tx BEFORE INSERT ON pgflow.events
    FOR EACH ROW EXECUTE FUNCTION pgflow.stamp_tx();
CREATE TRIGGER stamp_tx BEFORE INSERT ON pgflow.changes
    FOR EACH ROW EXECUTE FUNCTION pgflow.stamp_tx();

-- 3. Indexes for the id-ordered walk of a diff's new transactions (part B); the
--    existing (stream[, type], tx, id) indexes serve part A and the bounds. (The
--    change log's are in 0012, with the captured table's identity.)
CREATE INDEX events_stream_type_id ON pgflow.events (stream, type, id);
CREATE INDEX events_stream_id ON pgflow.events (stream, id);
