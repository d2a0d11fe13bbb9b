"""The workflow tests/test_chaos_restart.py runs in its (killed, restarted) workers.

``pgflow worker tests.chaos_connector_app:wf`` (DSN from ``PGFLOW_DATABASE_URL``, the
webhook's port from ``CHAOS_WEBHOOK_PORT``). Two connectors feed one workflow:

* a table connector tailing ``cx_orders`` (rows written by concurrent writers that
  commit or roll back at random);
* a webhook (``POST`` events with an ``id``; a sender retries until it gets a 200).

Each event triggers one run (idempotent on the event: ``api.run_id_for``); the run's
one step writes its effect through ``run.tx`` into ``cx_effects`` (unique: a second
committed application would fail) and ``cx_effect_log`` (no constraint: it would show
as a duplicate row).
"""

from __future__ import annotations

import enum
import os
from typing import Any

import pgflow
from pgflow.connectors import table, webhook


class Status(enum.IntEnum):
    RECEIVED = 1
    DONE = 2


APP_TABLES = (
    "CREATE TABLE cx_orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " foreign_id text NOT NULL, type text NOT NULL DEFAULT 'order');"
    "CREATE TABLE cx_effects (foreign_id text PRIMARY KEY);"
    "CREATE TABLE cx_effect_log (foreign_id text NOT NULL)"
)


async def effect(run: pgflow.Run[dict[str, Any], Status]) -> Status:
    await run.tx.execute("INSERT INTO cx_effects VALUES (%s)", (run.foreign_id,))
    await run.tx.execute("INSERT INTO cx_effect_log VALUES (%s)", (run.foreign_id,))
    return Status.DONE


async def from_table(api: pgflow.API[dict[str, Any], Status], ev: Any) -> None:
    await api.trigger(ev.foreign_id, run_id=api.run_id_for("table", ev.id))


async def from_webhook(api: pgflow.API[dict[str, Any], Status], ev: Any) -> None:
    await api.trigger(ev.foreign_id, run_id=api.run_id_for("webhook", ev.id))


def wf() -> pgflow.Workflow[dict[str, Any], Status]:
    dsn = os.environ["PGFLOW_DATABASE_URL"]
    b: pgflow.Builder[dict[str, Any], Status] = pgflow.Builder(
        "cx", dict, Status, polling_frequency=0.05, batch_size=50, err_backoff=0.05
    )
    b.add_step(Status.RECEIVED, effect, Status.DONE, parallel_count=2)
    orders = table.Connector(
        table.TableStream("cx_orders"), table.CursorStore(dsn), batch_size=100, poll_interval=0.05
    )
    b.add_connector("orders", orders, from_table, polling_frequency=0.05)
    hook = webhook.Connector(
        dsn, "cx", port=int(os.environ["CHAOS_WEBHOOK_PORT"]), poll_interval=0.05
    )
    b.add_connector("hooks", hook, from_webhook, polling_frequency=0.05)
    return b.build(None, pool_size=5)
