"""Hold a transaction with an xid open in another database for the whole CI run.

pgflow 0.1's readers stalled behind any such transaction anywhere in the cluster
(issue 8); the suite must pass with one open. Runs until killed; exits quietly when no
server is reachable (the tests then start a throwaway cluster of their own).
"""

from __future__ import annotations

import os
import sys
import time

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

HOLDER_DB = "pgflow_ci_xid_holder"


def main() -> int:
    server = (
        os.environ.get("PGFLOW_TEST_DSN")
        or os.environ.get("DATABASE_URL")
        or "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    try:
        with psycopg.connect(server, autocommit=True, connect_timeout=3) as admin:
            exists = admin.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (HOLDER_DB,)
            ).fetchone()
            if not exists:
                admin.execute(f'CREATE DATABASE "{HOLDER_DB}"')
    except psycopg.Error as exc:
        print(f"hold_xid: no server to hold an xid on ({exc}); skipping", file=sys.stderr)
        return 0
    params = conninfo_to_dict(server)
    params["dbname"] = HOLDER_DB
    params["application_name"] = "pgflow-ci-xid-holder"
    with psycopg.connect(make_conninfo("", **params)) as conn:
        row = conn.execute("SELECT pg_current_xact_id()").fetchone()
        print(f"hold_xid: holding xid {row[0] if row else '?'} in {HOLDER_DB}", flush=True)
        while True:
            time.sleep(3600)  # idle in transaction until killed


if __name__ == "__main__":
    sys.exit(main())
