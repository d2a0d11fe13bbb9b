-- luno/workflow parity (issue 11): list API indexes, several timeouts per status,
-- schedules that carry a value and a filter.

-- wf.list(): keyset pagination on (created_at, run_id), per workflow, optionally one
-- status or one run state. Each filter combination the API documents as index-ordered
-- has its own index, so a page reads `limit` index entries whatever the table size.
-- created_at never changes (these entries are not rewritten by HOT-eligible updates);
-- status and run_state already left HOT through records_workflow_status, which the
-- status index below replaces (its leading columns serve the same lookups).
CREATE INDEX records_list_created ON pgflow.records (workflow, created_at, run_id);
CREATE INDEX records_list_status ON pgflow.records (workflow, status, created_at, run_id);
CREATE INDEX records_list_run_state ON pgflow.records (workflow, run_state, created_at, run_id);
DROP INDEX IF EXISTS pgflow.records_workflow_status;

-- Several timeouts on one status (luno AddTimeout may be called many times): each is
-- armed and fired on its own; `timer` is its position among the status's timeouts.
ALTER TABLE pgflow.timeouts ADD COLUMN timer integer NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX timeouts_one_per_timer ON pgflow.timeouts (run_id, status, version, timer);
DROP INDEX IF EXISTS pgflow.timeouts_one_per_status;

-- schedule(foreign_id, spec, initial=..., filter=fn): the object each tick's run starts
-- with, and whether a Python filter decides each tick (only a process that registered
-- the filter fires such a schedule; see pgflow/_timers.py).
ALTER TABLE pgflow.schedules ADD COLUMN initial jsonb;
ALTER TABLE pgflow.schedules ADD COLUMN filtered boolean NOT NULL DEFAULT false;
