-- Change capture: app tables' inserts/updates/deletes as rows of pgflow.changes,
-- written by a row trigger in the app's own transaction (no NOTIFY there: readers
-- poll, see DESIGN.md §3), and read gap-free by (tx, id) like the event log.

CREATE TABLE pgflow.changes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    table_name  text        NOT NULL,            -- schema.table of the captured table
    op          text        NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE')),
    pk          text        NOT NULL,            -- key value; composite keys: JSON array
    old         jsonb,                           -- row before (UPDATE, DELETE)
    new         jsonb,                           -- row after (INSERT, UPDATE)
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX changes_table_tx_id ON pgflow.changes (table_name, tx, id);
CREATE INDEX changes_tx_id ON pgflow.changes (tx, id);

-- The row trigger. Arguments: the key column names. UPDATEs that change nothing
-- (same row image) are not recorded.
CREATE FUNCTION pgflow.capture_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row_new jsonb;
    row_old jsonb;
    key_row jsonb;
    key_text text;
BEGIN
    IF TG_OP <> 'DELETE' THEN row_new := to_jsonb(NEW); END IF;
    IF TG_OP <> 'INSERT' THEN row_old := to_jsonb(OLD); END IF;
    IF TG_OP = 'UPDATE' AND row_new = row_old THEN
        RETURN NULL;
    END IF;
    key_row := coalesce(row_new, row_old);
    IF TG_NARGS = 1 THEN
        key_text := key_row ->> TG_ARGV[0];
    ELSE
        SELECT jsonb_agg(key_row -> k.col ORDER BY k.ord)::text INTO key_text
        FROM unnest(TG_ARGV) WITH ORDINALITY AS k(col, ord);
    END IF;
    INSERT INTO pgflow.changes (table_name, op, pk, old, new)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_OP, coalesce(key_text, ''),
            row_old, row_new);
    RETURN NULL;
END
$$;

-- Install capture on a table (idempotent: re-installing replaces the trigger).
-- key_columns defaults to the primary key.
CREATE FUNCTION pgflow.capture(tbl regclass, key_columns text[] DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    cols text[] := key_columns;
    missing text;
    args text;
BEGIN
    IF cols IS NULL THEN
        SELECT array_agg(a.attname::text ORDER BY k.ord) INTO cols
        FROM pg_index i
        CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = tbl AND i.indisprimary;
    END IF;
    IF cols IS NULL OR cardinality(cols) = 0 THEN
        RAISE EXCEPTION 'pgflow.capture: table % has no primary key; pass key columns, e.g. SELECT pgflow.capture(%L, ARRAY[''id''])', tbl, tbl::text;
    END IF;
    SELECT string_agg(c, ', ') INTO missing FROM unnest(cols) AS c
    WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                      WHERE a.attrelid = tbl AND a.attname = c AND a.attnum > 0
                        AND NOT a.attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'pgflow.capture: table % has no column(s) %', tbl, missing;
    END IF;
    SELECT string_agg(quote_literal(c), ', ') INTO args FROM unnest(cols) AS c;
    EXECUTE format('DROP TRIGGER IF EXISTS pgflow_capture ON %s', tbl);
    EXECUTE format('CREATE TRIGGER pgflow_capture AFTER INSERT OR UPDATE OR DELETE ON %s'
                   ' FOR EACH ROW EXECUTE FUNCTION pgflow.capture_change(%s)', tbl, args);
END
$$;

-- Remove capture from a table (already recorded changes stay).
CREATE FUNCTION pgflow.uncapture(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS pgflow_capture ON %s', tbl);
END
$$;
