-- Change capture functions with a pinned search_path (issue 10, item 5).
--
-- The trigger runs as whoever writes to a captured table — often a superuser or the
-- app's owner role. Before this migration it called polymorphic functions
-- (to_jsonb(NEW), jsonb_agg, unnest, ...) through the writer's search_path, so a role
-- with CREATE on any schema in that path could define e.g.
-- public.to_jsonb(public.payments) — an exact match beats pg_catalog's anyelement
-- version — and run code with the writer's privileges on its next INSERT.
--
-- Now every pgflow function pins `search_path = pg_catalog, pg_temp` (pg_temp last:
-- a temporary object can never shadow a catalog one) AND qualifies every call and
-- operator's schema explicitly, so neither a hostile search_path nor a future edit
-- that forgets one qualification reopens the hole. Same behaviour otherwise; the
-- bodies are those of 0004 with the names qualified.
--
-- Written so the order of migrations cannot lose anyone's work: a body is replaced
-- only while it is still exactly 0004's (md5 of its source). If another migration has
-- already replaced it (say one numbered below 0007 that landed on another branch),
-- that body is kept and only its search_path is pinned, with a notice. sql/zz_reader.sql
-- re-pins the search_path of these functions on every `pgflow migrate` either way.

DO $do$
BEGIN
    IF pg_catalog.to_regprocedure('pgflow.capture_change()') IS NULL THEN
        RETURN;  -- renamed or re-signed by another migration: nothing of 0004's left
    END IF;
    IF (SELECT pg_catalog.md5(prosrc) FROM pg_catalog.pg_proc
        WHERE oid = pg_catalog.to_regprocedure('pgflow.capture_change()')) = 'b361b1e1ed187f79b23384f058d2d871' THEN
        EXECUTE $ddl$
CREATE OR REPLACE FUNCTION pgflow.capture_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    row_new jsonb;
    row_old jsonb;
    key_row jsonb;
    key_text text;
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
    INSERT INTO pgflow.changes (table_name, op, pk, old, new)
    VALUES (TG_TABLE_SCHEMA OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) TG_TABLE_NAME,
            TG_OP, coalesce(key_text, ''), row_old, row_new);
    RETURN NULL;
END
$fn$;
        $ddl$;
    ELSE
        RAISE NOTICE 'pgflow: pgflow.capture_change() was changed by another migration; keeping its body';
    END IF;
    ALTER FUNCTION pgflow.capture_change() SET search_path = pg_catalog, pg_temp;
END
$do$;

DO $do$
BEGIN
    IF pg_catalog.to_regprocedure('pgflow.capture(regclass, text[])') IS NULL THEN
        RETURN;  -- renamed or re-signed by another migration: nothing of 0004's left
    END IF;
    IF (SELECT pg_catalog.md5(prosrc) FROM pg_catalog.pg_proc
        WHERE oid = pg_catalog.to_regprocedure('pgflow.capture(regclass, text[])')) = '0f48ba3e1a6d60a10c49379d82b087b7' THEN
        EXECUTE $ddl$
CREATE OR REPLACE FUNCTION pgflow.capture(tbl regclass, key_columns text[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    cols text[] := key_columns;
    missing text;
    args text;
BEGIN
    IF cols IS NULL THEN
        SELECT pg_catalog.array_agg(a.attname::pg_catalog.text ORDER BY k.ord) INTO cols
        FROM pg_catalog.pg_index i
        CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_catalog.pg_attribute a
          ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid
         AND a.attnum OPERATOR(pg_catalog.=) k.attnum
        WHERE i.indrelid OPERATOR(pg_catalog.=) tbl AND i.indisprimary;
    END IF;
    IF cols IS NULL OR pg_catalog.cardinality(cols) OPERATOR(pg_catalog.=) 0 THEN
        RAISE EXCEPTION 'pgflow.capture: table % has no primary key; pass key columns, e.g. SELECT pgflow.capture(%L, ARRAY[''id''])', tbl, tbl::pg_catalog.text;
    END IF;
    SELECT pg_catalog.string_agg(c, ', ') INTO missing FROM pg_catalog.unnest(cols) AS c
    WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                      WHERE a.attrelid OPERATOR(pg_catalog.=) tbl
                        AND a.attname OPERATOR(pg_catalog.=) c
                        AND a.attnum OPERATOR(pg_catalog.>) 0
                        AND NOT a.attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'pgflow.capture: table % has no column(s) %', tbl, missing;
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.quote_literal(c), ', ') INTO args
    FROM pg_catalog.unnest(cols) AS c;
    -- regclass prints schema-qualified here (only pg_catalog is on the path).
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgflow_capture ON %s', tbl);
    EXECUTE pg_catalog.format('CREATE TRIGGER pgflow_capture AFTER INSERT OR UPDATE OR DELETE ON %s'
                              ' FOR EACH ROW EXECUTE FUNCTION pgflow.capture_change(%s)', tbl, args);
END
$fn$;
        $ddl$;
    ELSE
        RAISE NOTICE 'pgflow: pgflow.capture(regclass, text[]) was changed by another migration; keeping its body';
    END IF;
    ALTER FUNCTION pgflow.capture(regclass, text[]) SET search_path = pg_catalog, pg_temp;
END
$do$;

DO $do$
BEGIN
    IF pg_catalog.to_regprocedure('pgflow.uncapture(regclass)') IS NULL THEN
        RETURN;  -- renamed or re-signed by another migration: nothing of 0004's left
    END IF;
    IF (SELECT pg_catalog.md5(prosrc) FROM pg_catalog.pg_proc
        WHERE oid = pg_catalog.to_regprocedure('pgflow.uncapture(regclass)')) = '339000a08cb8298a38ac4a79f3cc607b' THEN
        EXECUTE $ddl$
CREATE OR REPLACE FUNCTION pgflow.uncapture(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgflow_capture ON %s', tbl);
END
$fn$;
        $ddl$;
    ELSE
        RAISE NOTICE 'pgflow: pgflow.uncapture(regclass) was changed by another migration; keeping its body';
    END IF;
    ALTER FUNCTION pgflow.uncapture(regclass) SET search_path = pg_catalog, pg_temp;
END
$do$;
