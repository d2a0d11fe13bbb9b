"""Acting on one run: ``pgflow retry|pause|resume|cancel|delete-data FOREIGN_ID``.

Run-state changes go through :mod:`pgflow.workflow.actions`, the same functions the
Python API and the web console use, so the CLI cannot do anything the engine would not.
"""

from __future__ import annotations

import argparse
from typing import Any

from psycopg import AsyncConnection

from pgflow.cli._common import add_command, connected
from pgflow.cli._runs import resolve_run

__all__ = ["VERBS", "register"]

#: the commands, with their help line
VERBS = (
    ("retry", "run a run's current step again now (resets errors, unpauses)"),
    ("pause", "pause a run in progress"),
    ("resume", "resume a paused run (its current step runs again)"),
    ("cancel", "cancel a run for good"),
    ("delete-data", "request erasure of a finished run's data (a worker erases it)"),
)


def register(subparsers: Any) -> None:
    for verb, text in VERBS:
        p = add_command(
            subparsers,
            verb,
            text,
            f"{text[0].upper()}{text[1:]}. Uses the newest run unless --run-id is given; "
            "--workflow is needed when the foreign id has runs in several workflows.",
        )
        p.add_argument("foreign_id", metavar="FOREIGN_ID")
        p.add_argument("--workflow", help="the workflow (needed if ambiguous)")
        p.add_argument("--run-id", help="this run (a unique prefix is enough)")
        p.add_argument(
            "--reason", help="why (stored on the record: run_state_reason in pgflow.runs)"
        )
        p.set_defaults(func=connected(_act), verb=verb)


async def _act(conn: AsyncConnection[Any], args: argparse.Namespace) -> int:
    from pgflow.workflow import actions

    (run,) = await resolve_run(conn, args.foreign_id, args.workflow, args.run_id, single=True)
    action = {
        "retry": actions.retry,
        "pause": actions.pause,
        "resume": actions.resume,
        "cancel": actions.cancel,
        # only requests it: a running worker erases it with the workflow's custom_delete
        "delete-data": actions.request_data_deletion,
    }[args.verb]
    rec = await action(conn, run.workflow, run.foreign_id, run.run_id, reason=args.reason)
    why = f" — {rec.run_state_reason}" if rec.run_state_reason else ""
    print(
        f"{args.verb}: {rec.workflow} / {rec.foreign_id} / run {rec.run_id}: "
        f"{rec.status} ({rec.run_state}){why}"
    )
    return 0
