-- Indexes for the web console (`pgflow ui`), so every page stays fast on big tables
-- (a million runs, ten million events): lists are keyset pages walked in index order,
-- counts are capped index scans. Each index names the query it serves
-- (pgflow/ui/_queries.py). On a large existing table, CREATE INDEX blocks writes to
-- pgflow.records while it builds: run `pgflow migrate` in a quiet moment, or create
-- these by hand with CREATE INDEX CONCURRENTLY first (IF NOT EXISTS makes that safe).

-- Runs page, no workflow filter: newest first, next page = (created_at, run_id) < last.
CREATE INDEX IF NOT EXISTS records_ui_created ON pgflow.records (created_at, run_id);
-- Runs page filtered by workflow (and by workflow + status).
CREATE INDEX IF NOT EXISTS records_ui_workflow_created
    ON pgflow.records (workflow, created_at, run_id);
CREATE INDEX IF NOT EXISTS records_ui_workflow_status_created
    ON pgflow.records (workflow, status, created_at, run_id);
-- Counts per run state (capped): an index-only walk of one run state.
CREATE INDEX IF NOT EXISTS records_ui_run_state ON pgflow.records (run_state, workflow);
-- Foreign id prefix filter (LIKE 'abc%' needs pattern ops unless the collation is C).
CREATE INDEX IF NOT EXISTS records_ui_foreign_id_prefix
    ON pgflow.records (foreign_id text_pattern_ops);
-- pgflow.stuck_runs ordered by updated_at, and runs in progress by state: only the
-- (few) active runs are indexed.
CREATE INDEX IF NOT EXISTS records_ui_active_updated ON pgflow.records (updated_at)
    WHERE run_state IN ('INITIATED', 'RUNNING', 'PAUSED');
