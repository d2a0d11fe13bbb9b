-- Indexes for the web console (`pgflow ui`), so every page stays fast on big tables
-- (a million runs, ten million events): lists are keyset pages walked in index order,
-- counts are capped index scans. Each index names the query it serves
-- (pgflow/ui/_queries.py). On a large existing table, CREATE INDEX blocks writes to
-- pgflow.records while it builds: run `pgflow migrate` in a quiet moment, or create
-- these by hand with CREATE INDEX CONCURRENTLY first (IF NOT EXISTS makes that safe).

-- Runs page filtered by workflow (and by workflow + status): the same keyset indexes
-- as wf.list() (migration 0009 of the luno-parity work creates them under these names;
-- IF NOT EXISTS keeps one copy whichever migration runs first).
CREATE INDEX IF NOT EXISTS records_list_created
    ON pgflow.records (workflow, created_at, run_id);
CREATE INDEX IF NOT EXISTS records_list_status
    ON pgflow.records (workflow, status, created_at, run_id);
-- Runs page with no workflow filter: newest first, next page = (created_at, run_id) < last.
CREATE INDEX IF NOT EXISTS records_ui_created ON pgflow.records (created_at, run_id);
-- Runs page filtered by run state alone, and the per-run-state counts (capped, index
-- only) at the top of it.
CREATE INDEX IF NOT EXISTS records_ui_run_state
    ON pgflow.records (run_state, created_at, run_id);
-- Foreign id prefix filter (LIKE 'abc%' needs pattern ops unless the collation is C).
CREATE INDEX IF NOT EXISTS records_ui_foreign_id_prefix
    ON pgflow.records (foreign_id text_pattern_ops);
-- Runs in progress only (few of them): pgflow.stuck_runs ordered by updated_at, and the
-- Workflows page's runs in progress per status.
CREATE INDEX IF NOT EXISTS records_ui_active_updated ON pgflow.records (updated_at)
    WHERE run_state IN ('INITIATED', 'RUNNING', 'PAUSED');
CREATE INDEX IF NOT EXISTS records_ui_active_status ON pgflow.records (workflow, status)
    WHERE run_state IN ('INITIATED', 'RUNNING', 'PAUSED');
