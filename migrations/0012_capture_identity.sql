-- Change capture records the captured table's identity (issue 10, item 6).
--
-- 0004 recorded TG_TABLE_SCHEMA.TG_TABLE_NAME: a change to a partition was recorded
-- under the partition's name (changes_stream('parent') got nothing), and after a
-- rename new changes carried the new name while readers filtered on the old one and
-- went silent. Now each change row carries the captured (root) table's oid, which a
-- rename does not change, and the root's name; changes_stream() resolves the names it
-- is given to oids when it reads, so a table that no longer has that name is an error
-- ("relation ... does not exist"), never silence.

ALTER TABLE pgflow.changes ADD COLUMN table_oid oid;
UPDATE pgflow.changes
SET table_oid = pg_catalog.to_regclass(table_name)::pg_catalog.oid
WHERE table_oid IS NULL;

-- Reads filter by oid now: part A / bounds and the id walk of part B
-- (pgflow/snapshots.py).
CREATE INDEX changes_table_oid_tx_id ON pgflow.changes (table_oid, tx, id);
CREATE INDEX changes_table_oid_id ON pgflow.changes (table_oid, id);
DROP INDEX IF EXISTS pgflow.changes_table_tx_id;

-- The row trigger (0004's, search_path pinned and every call qualified as in 0007),
-- recording the root of a partition tree and its oid.
CREATE OR REPLACE FUNCTION pgflow.capture_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    row_new jsonb;
    row_old jsonb;
    key_row jsonb;
    key_text text;
    root pg_catalog.oid := TG_RELID;
    root_name text := TG_TABLE_SCHEMA OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) TG_TABLE_NAME;
    parent pg_catalog.regclass;
BEGIN
    IF TG_OP OPERATOR(pg_catalog.<>) 'DELETE' THEN row_new := pg_catalog.to_jsonb(NEW); END IF;
    IF TG_OP OPERATOR(pg_catalog.<>) 'INSERT' THEN row_old := pg_catalog.to_jsonb(OLD); END IF;
    IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' AND row_new OPERATOR(pg_catalog.=) row_old THEN
        RETURN NULL;
    END IF;
    key_row := coalesce(row_new, row_old);
    IF TG_NARGS OPERATOR(pg_catalog.=) 1 THEN
        key_text := key_row OPERATOR(pg_catalog.->>) TG_ARGV[0];
    ELSE
        SELECT pg_catalog.jsonb_agg(key_row OPERATOR(pg_catalog.->) k.col ORDER BY k.ord)::pg_catalog.text
        INTO key_text
        FROM pg_catalog.unnest(TG_ARGV) WITH ORDINALITY AS k(col, ord);
    END IF;
    parent := pg_catalog.pg_partition_root(TG_RELID);
    IF parent IS NOT NULL AND parent::pg_catalog.oid OPERATOR(pg_catalog.<>) TG_RELID THEN
        root := parent::pg_catalog.oid;
        SELECT n.nspname OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) c.relname
        INTO root_name
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
        WHERE c.oid OPERATOR(pg_catalog.=) root;
    END IF;
    INSERT INTO pgflow.changes (table_name, table_oid, op, pk, old, new)
    VALUES (root_name, root, TG_OP, coalesce(key_text, ''), row_old, row_new);
    RETURN NULL;
END
$fn$;
