-- Runs after every other sql/*.sql file (hence the name): it grants on whatever
-- views those files just (re)created, and re-pins functions they may have replaced.
--
-- 1. pgflow_reader: the NOLOGIN role `pgflow inspect` switches to (SET LOCAL ROLE) when
--    the connecting role may, so that a query the validator wrongly let through still
--    meets a permission error. It may use schema pgflow and SELECT from its views —
--    nothing else: no table, no sequence, no other schema's relations, no
--    pg_read_server_files, no REPLICATION. Roles are cluster-wide while this runs once
--    per database, and many databases of one server may migrate at the same time, so
--    creating it tolerates losing that race; a migrating role without CREATEROLE skips
--    it (inspect then runs under the connecting role, see docs/observability.md).
DO $$
DECLARE
    v regclass;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgflow_reader') THEN
        BEGIN
            CREATE ROLE pgflow_reader NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migrate created it first
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'pgflow: no CREATEROLE, role pgflow_reader not created; '
                             '`pgflow inspect` runs under the connecting role';
                RETURN;
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgflow_reader'
               AND (rolsuper OR rolcanlogin OR rolreplication OR rolbypassrls
                    OR rolcreaterole OR rolcreatedb)) THEN
        RAISE WARNING 'pgflow: role pgflow_reader has more than NOLOGIN attributes; '
                      '`pgflow inspect` will not use it (ALTER ROLE pgflow_reader NOSUPERUSER '
                      'NOLOGIN NOREPLICATION NOBYPASSRLS NOCREATEROLE NOCREATEDB)';
    END IF;
    GRANT USAGE ON SCHEMA pgflow TO pgflow_reader;
    FOR v IN SELECT c.oid::regclass FROM pg_catalog.pg_class c
             WHERE c.relnamespace = 'pgflow'::regnamespace AND c.relkind IN ('v', 'm')
             ORDER BY c.oid
    LOOP
        EXECUTE pg_catalog.format('GRANT SELECT ON %s TO pgflow_reader', v);
    END LOOP;
END
$$;

-- 2. The byte cap of `pgflow inspect`, kept on the server so that nothing over it is
--    ever sent. The statement inspect runs is (see pgflow/inspect.py, _capped)
--      SELECT b.n, CASE WHEN b.n >= 0 THEN b.c1 END, ... FROM (
--          SELECT pgflow.inspect_row_budget(octet_length(ROW(s.*)::text), <cap>) AS n, s.*
--          FROM (<query>) AS s(c1, ...) OFFSET 0) AS b
--    This function adds each row's size to a transaction-local running total and
--    returns it; from the first row that would pass the cap on it returns minus that
--    row's size (and keeps doing so), and the row goes out as NULLs. VOLATILE, in the
--    target list of a subquery that OFFSET 0 keeps whole: once per row, in order.
CREATE OR REPLACE FUNCTION pgflow.inspect_row_budget(row_bytes bigint, max_bytes bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    used bigint := coalesce(nullif(current_setting('pgflow.inspect_used', true), ''), '0')::bigint;
BEGIN
    IF used < 0 OR used + row_bytes > max_bytes THEN
        PERFORM set_config('pgflow.inspect_used', '-1', true);
        RETURN -greatest(row_bytes, 1);
    END IF;
    PERFORM set_config('pgflow.inspect_used', (used + row_bytes)::text, true);
    RETURN row_bytes;
END
$$;
DROP FUNCTION IF EXISTS pgflow.inspect_row_bytes(bigint, bigint);

-- 3. Capture functions never run on the writer's search_path (migration 0007 also
--    qualifies every call). Re-pinned on every migrate, so a later migration that
--    replaces a body without the SET clause cannot reopen the hole.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'pgflow'::regnamespace
               AND p.proname IN ('capture_change', 'capture', 'uncapture')
    LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END
$$;
