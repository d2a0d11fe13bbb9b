-- The per-consumer read without a type filter (`stream = ? AND (tx, id) > (?, ?)
-- ORDER BY tx, id`, optionally sharded) walks this index in order from the cursor.
-- Without it the planner had to choose between (tx, id) — filtering out every other
-- stream's events — and (stream, type, tx, id), which cannot return (tx, id) order
-- across types, so a sharded read of a 200k backlog sorted the whole stream for every
-- batch (35 ms per batch instead of 0.3 ms, measured).
CREATE INDEX IF NOT EXISTS events_stream_tx_id ON pgflow.events (stream, tx, id);
