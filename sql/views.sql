-- Views for humans (psql, `pgflow inspect`). Recreated on every `pgflow migrate`.

-- Per consumer and shard: where its cursor stands and how much is still ahead of it.
CREATE OR REPLACE VIEW pgflow.consumer_lag AS
SELECT c.consumer,
       c.shard,
       c.shard_count,
       c.stream,
       c.types,
       c.tx AS cursor_tx,
       c.id AS cursor_id,
       c.updated_at,
       ahead.events AS lag_events,
       coalesce(extract(epoch FROM now() - ahead.oldest), 0)::double precision AS lag_seconds
FROM pgflow.cursors c
CROSS JOIN LATERAL (
    SELECT count(*) AS events, min(e.created_at) AS oldest
    FROM pgflow.events e
    WHERE e.stream = c.stream
      AND (c.types IS NULL OR e.type = ANY (c.types))
      AND (e.tx, e.id) > (c.tx, c.id)
      AND (c.shard_count = 1 OR e.shard_hash % c.shard_count = c.shard)
) ahead;
