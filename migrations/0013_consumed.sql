-- Has a cursor read a row? One definition of the predicate (issue 14, item 3).
--
-- A cursor row (pgflow.cursors: snap, upto, after_id) has read a row of a log
-- (tx, id) when the row's transaction is visible in the cursor's snapshot, or the row
-- was taken from the diff the cursor is reading: visible in `upto`, id up to
-- `after_id` (pgflow/log/snapshots.py explains positions). It was written out in
-- pgflow.consumer_lag, in `pgflow prune` and in the xid-reset repair; now they all
-- call this function (Python through pgflow.log.snapshots.CONSUMED).
--
-- A plain SQL expression, IMMUTABLE and not STRICT, so the planner inlines it: a
-- query calling it plans exactly as one with the expression written in place (no
-- function call per row). Index bounds (e.g. `e.tx >= pg_snapshot_xmin(c.snap)`)
-- stay with the callers, which know their indexes.
CREATE OR REPLACE FUNCTION pgflow.consumed(
    tx xid8, id bigint, snap pg_snapshot, upto pg_snapshot, after_id bigint
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT pg_catalog.pg_visible_in_snapshot(tx, snap)
        OR (upto IS NOT NULL AND pg_catalog.pg_visible_in_snapshot(tx, upto)
            AND id <= after_id)
$$;
