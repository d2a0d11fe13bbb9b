"""A seeded fuzz of the inspect validator alone (no reader role): dangerous functions
in every position and notation we know of, inside many query shapes. Whatever the
validator accepts is run as a superuser in a READ ONLY transaction (which stops
writes, not reads, locks or signals); nothing may read a file, keep a lock, create a
replication slot or kill a session.
"""

from __future__ import annotations

import random
import uuid

import psycopg

from pgflow.ops.inspect import InspectRefused, validate

DANGER = [
    "pg_read_file", "pg_advisory_lock", "pg_terminate_backend", "pg_ls_dir",
    "current_setting", "pg_create_physical_replication_slot", "lo_import", "pg_notify",
    "set_config", "regclass", "query_to_xml", "pg_stat_file", "pg_sleep",
]  # fmt: skip
ARGS = [
    "'/etc/passwd'", "'.'", "{key}", "'{key}'::bigint", "{victim}", "'{slot}'",
    "'data_directory'", "foreign_id", "r.foreign_id", "g", "x.v", "e.value", "v.k",
]  # fmt: skip
#: "r" has rows even in an empty database, so what the fuzz accepts really runs.
R = "(SELECT 'order-1'::text AS foreign_id, '{\"a\": 1}'::jsonb AS object) r"
FROMS = [
    "runs r", f"{R}, generate_series(1, 1) g", f"{R}, jsonb_each(r.object) e",
    "(SELECT '/etc/passwd'::text AS v) x", "(VALUES ({key}::bigint)) v(k)",
    f"{R}, LATERAL jsonb_array_elements(r.object) x(v)", "generate_series({key}, {key}) g",
    f"{R} JOIN (SELECT 1 AS step) h ON true", "unnest(ARRAY['/etc/passwd']) g",
    "(SELECT 1) x, LATERAL (SELECT {key}::bigint AS v) g",
    f"{R}, generate_series({{key}}, {{key}}) AS g(v)",
    f"({R} JOIN generate_series(1, 1) g ON true)",
]  # fmt: skip
SHAPES = [
    "SELECT {e} FROM {fr}", "SELECT 1 FROM {fr} WHERE {e} IS NOT NULL",
    "SELECT * FROM {fr} ORDER BY {e}", "WITH c AS (SELECT {e} FROM {fr}) SELECT * FROM c",
    "SELECT (SELECT {e} FROM {fr})", "SELECT count(*) FILTER (WHERE {e} IS NULL) FROM {fr}",
    "SELECT * FROM {fr} JOIN LATERAL (SELECT {e}) q ON true", "VALUES ({e})", "SELECT {e}",
]  # fmt: skip


def _expr(rnd: random.Random, depth: int = 0) -> str:
    f, a = rnd.choice(DANGER), rnd.choice(ARGS)
    forms = [
        f"{f}({a})", f"({a}).{f}", f"{a}.{f}", f"r.{f}", f"g.{f}", f"x.{f}", f"e.{f}",
        f"v.{f}", f"{f}", f'"{f}"({a})', f"pg_catalog.{f}({a})", f"({a})::{f}",
        f"CAST({a} AS {f})", f"{f} {a}", f"ARRAY[{f}({a})]", f"(SELECT {f}({a}))",
        f"coalesce({a}, {f}({a}))", f"{a} || {f}", f"lower({a}.{f})", f"(r).{f}", f"{f}.{f}",
    ]  # fmt: skip
    e = rnd.choice(forms)
    if depth < 2 and rnd.random() < 0.3:
        inner = _expr(rnd, depth + 1)
        e = rnd.choice(
            [f"({e})", f"coalesce({e}, {inner})", f"CASE WHEN true THEN {e} END",
             f"{e} IS NULL", f"EXISTS (SELECT {e})"]
        )  # fmt: skip
    return e


def test_seeded_fuzz_of_the_validator_alone(pgflow_dsn: str) -> None:
    rnd = random.Random(20261129)
    slot = f"pgflow_fuzz_{uuid.uuid4().hex[:12]}"
    key = 7_000_000_000 + rnd.randrange(10**9)
    breaches: list[tuple[str, str]] = []
    accepted = 0
    victim = psycopg.connect(pgflow_dsn, autocommit=True)
    conn = psycopg.connect(pgflow_dsn, autocommit=True)
    try:
        for _ in range(3000):
            query = rnd.choice(SHAPES).format(e=_expr(rnd), fr=rnd.choice(FROMS))
            query = query.replace("{key}", str(key)).replace("{slot}", slot)
            query = query.replace("{victim}", str(victim.info.backend_pid))
            try:
                statement = validate(query)
            except InspectRefused:
                continue
            accepted += 1
            try:
                with conn.transaction(force_rollback=True):
                    conn.execute("SET TRANSACTION READ ONLY")
                    conn.execute("SET LOCAL statement_timeout = 2000")
                    conn.execute("SET LOCAL search_path = pg_catalog, pgflow, pg_temp")
                    if "root:" in repr(conn.execute(statement).fetchall()):
                        breaches.append(("file read", query))
            except psycopg.Error:
                pass  # a server error is no breach
            row = conn.execute(
                "SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid()),"
                " (SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s)",
                (slot,),
            ).fetchone()
            if row != (0, 0):
                breaches.append(("lock or slot", query))
                conn.execute("SELECT pg_advisory_unlock_all()")
            try:
                victim.execute("SELECT 1")
            except psycopg.Error:
                breaches.append(("killed a session", query))
                victim = psycopg.connect(pgflow_dsn, autocommit=True)
    finally:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (slot,),
        )
        conn.close()
        victim.close()
    assert accepted > 200  # the fuzz reaches the server, not just the validator
    assert breaches == []
