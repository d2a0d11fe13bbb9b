"""``pgflow demo``: run the seed example end to end and show what happened."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from pgflow._db import DSN_ENV_VARS, redact
from pgflow.cli._common import add_command


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "demo",
        "run the example order workflow fed by a payment connector",
        "Feed payment events (completed, failed, refunded, a high-value one, two invalid "
        "ones and a duplicate) through a connector into an order workflow, then print the "
        "runs, the dead letters and SQL to inspect them. Without --dsn or "
        "PGFLOW_DATABASE_URL it starts an embedded PostgreSQL. Safe on a database with "
        "your own data: the demo's workflow is named 'pgflow-demo' and it deletes nothing.",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="give up after N seconds")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pgflow.demos.orders import (
        CONNECTOR,
        HIGH_VALUE_THRESHOLD,
        WORKFLOW,
        format_table,
        run_demo,
    )

    dsn = args.dsn or next((os.environ[v] for v in DSN_ENV_VARS if os.environ.get(v)), None)
    if dsn is None:
        from pgflow.postgres import default_data_dir, embedded_dsn

        print(f"no --dsn given: using the embedded PostgreSQL in {default_data_dir()}")
        dsn = embedded_dsn()
    # Retries and dead letters are part of the story; the table below tells it.
    for name in ("pgflow.workflow._connectors", "pgflow.workflow._connector_batches"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    result = asyncio.run(run_demo(dsn, timeout=args.timeout))
    print(f"\nworkflow {WORKFLOW!r} fed by connector {CONNECTOR!r} ({redact(dsn)})\n")
    print(format_table(["foreign id", "status", "run state", "notes"], result.runs))
    if result.dead_letters:
        print("\ndead letters (invalid payment headers, after retries):\n")
        print(format_table(["event id", "reason"], result.dead_letters))
    print(
        f"\nskipped without a run: {', '.join(result.skipped) or 'none'} "
        f"(amount above {HIGH_VALUE_THRESHOLD}, or a refund for an unknown order); "
        "the duplicate delivery of order-2 found its run"
    )
    print(f"finished in {result.seconds:.2f}s\n")
    print("inspect it yourself:")
    print(f'  psql "{redact(dsn)}"')
    print(
        f"    SELECT foreign_id, status, run_state, object FROM pgflow.runs"
        f" WHERE workflow = '{WORKFLOW}';"
    )
    print(
        f"    SELECT foreign_id, step, from_status, status, change, at FROM pgflow.run_history"
        f" WHERE workflow = '{WORKFLOW}' ORDER BY foreign_id, run_id, step;"
    )
    print("    SELECT consumer, event_id, reason, attempts FROM pgflow.dead_letter_queue;")
    print("    SELECT * FROM pgflow.consumer_lag;")
    return 0
