-- pgflow workflow engine additions (issue "The workflow engine on the event log").

-- When a failed step is due for its next attempt. The step consumer records the
-- error and moves on (its shard is never blocked by one bad run); the timer poller
-- re-emits the run's current event once this moment has passed.
ALTER TABLE pgflow.records ADD COLUMN retry_at timestamptz;
CREATE INDEX records_retry_due ON pgflow.records (workflow, retry_at)
    WHERE retry_at IS NOT NULL;

-- Runs whose data erasure was requested but not finished (crash between the two
-- steps of delete_data); the timer poller finishes them.
CREATE INDEX records_data_delete_requested ON pgflow.records (workflow)
    WHERE run_state = 'REQUESTED_DATA_DELETED';
