"""Workflow chaining: one workflow's transitions as another's connector events.

luno chains workflows with a reflex stream over workflow A's events feeding a connector
of workflow B. Here A's transitions are rows of ``pgflow.events`` (stream = A's name,
type = the status reached), read by the table connector
(:mod:`pgflow.connectors.table`) in the same gap-free order as any consumer. When B
lives in the same database — it does whenever both are pgflow workflows on one
database — the connector runner moves the chain's cursor in the same transaction as B's
effects (``api.trigger``/``api.callback`` on the bound API): each transition of A is
handled by B **exactly once**, across crashes and restarts::

    from pgflow.workflow.chain import on_status

    @notify.add_connector("orders-shipped", on_status("orders", OrderStatus.SHIPPED, db=DSN))
    ...
    async def on_shipped(api, event):            # event.foreign_id: A's foreign id
        await api.trigger(event.foreign_id, initial=Mail(order=event.foreign_id))

Only moves *to* a status count (a trigger, step, callback, timeout, update_status or
save_and_repeat of A): not A's step retries, pauses, resumes or erasures, which append
events of the status A is already at. :func:`on_run_state` follows run states instead
(``on_run_state("orders", RunState.COMPLETED)``: luno's ``OnComplete`` stream).

The cursor is ``connector:workflow:<A>:<B>--<connector>-<i>-of-<N>`` in
``pgflow.cursors``. A new chain starts at the beginning of A's log: it sees A's
history, not only what happens after it was added (``pgflow prune`` bounds that).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from pgflow.connectors._base import ConnectorEvent
from pgflow.connectors.table import Connector, CursorStore, Row, TableStream, header_value
from pgflow.workflow.records import RunState

__all__ = ["MOVES", "on_run_state", "on_status", "workflow_events", "workflow_translator"]

#: ``change`` header values of events that move a run *to* their status
MOVES = ("trigger", "step", "callback", "timeout", "update_status", "save_and_repeat")
_COLUMNS = ("id", "stream", "type", "foreign_id", "run_id", "version", "headers", "created_at")
#: ``change`` header values that only re-announce where a run already is
_REPEATS = ("retry",)


def _name(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return value.name if not isinstance(value, RunState) else str(value)
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"expected a status (enum member or name), got {value!r}")


def _workflow_name(source: Any) -> str:
    name = source if isinstance(source, str) else getattr(source, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"expected a workflow name, Workflow or Builder, got {source!r}")
    return name


def workflow_translator(row: Row) -> ConnectorEvent:
    """A ``pgflow.events`` row as a connector event: ``foreign_id`` and ``type`` (the
    status name) of the source run; headers ``workflow``, ``run_id``, ``version``,
    ``run_state``, ``change`` (plus any other header the event carried)."""
    headers = {str(k): header_value(v) for k, v in dict(row.get("headers") or {}).items()}
    headers.update(
        {
            "workflow": str(row["stream"]),
            "run_id": "" if row.get("run_id") is None else str(row["run_id"]),
            "version": str(row.get("version", "")),
        }
    )
    stamp = row.get("created_at")
    return ConnectorEvent(
        id=f"{row['stream']}:{row['id']}",
        foreign_id=str(row["foreign_id"]),
        type=str(row["type"]),
        headers=headers,
        created_at=stamp if isinstance(stamp, datetime) else datetime.now(UTC),
    )


def workflow_events(
    workflow: Any,
    statuses: Iterable[Any] | None = None,
    *,
    run_states: Iterable[RunState | str] | None = None,
    changes: Iterable[str] | None = MOVES,
) -> TableStream:
    """The source ``workflow``'s events as a table-connector stream, narrowed to
    ``statuses`` (reached), ``run_states`` (entered) and ``changes``."""
    name = _workflow_name(workflow)
    where = ["s.stream = %(chain_workflow)s"]
    params: dict[str, Any] = {"chain_workflow": name}
    if statuses is not None:
        params["chain_types"] = [_name(s) for s in statuses]
        where.append("s.type = ANY(%(chain_types)s)")
    if run_states is not None:
        params["chain_states"] = [str(RunState(str(s).upper())) for s in run_states]
        where.append("s.headers ->> 'run_state' = ANY(%(chain_states)s)")
    if changes is not None:
        params["chain_changes"] = list(changes)
        where.append("s.headers ->> 'change' = ANY(%(chain_changes)s)")
    return TableStream(
        table="pgflow.events",
        columns=_COLUMNS,
        where=" AND ".join(where),
        params=params,
        name=f"workflow:{name}",
        translator=workflow_translator,
    )


def on_status(
    workflow: Any,
    *statuses: Any,
    db: str | AsyncConnectionPool[Any] | CursorStore,
    batch_size: int = 100,
    poll_interval: float = 0.2,
) -> Connector:
    """A connector of the source ``workflow``'s runs reaching any of ``statuses`` (all
    statuses when none given). ``db``: the database of both workflows (a DSN, a pool
    or a :class:`~pgflow.connectors.table.CursorStore`)."""
    return Connector(
        workflow_events(workflow, statuses or None),
        db,
        batch_size=batch_size,
        poll_interval=poll_interval,
    )


def on_run_state(
    workflow: Any,
    *run_states: RunState | str,
    db: str | AsyncConnectionPool[Any] | CursorStore,
    batch_size: int = 100,
    poll_interval: float = 0.2,
) -> Connector:
    """A connector of the source ``workflow``'s runs entering any of ``run_states``
    (e.g. ``RunState.COMPLETED``, ``RunState.CANCELLED``)."""
    if not run_states:
        raise ValueError("on_run_state needs at least one run state")
    stream = workflow_events(workflow, run_states=run_states, changes=None)
    # leave out the poller's retry re-emissions (same run state, nothing entered)
    stream = TableStream(
        table=stream.table,
        columns=stream.columns,
        where=f"{stream.where} AND s.headers ->> 'change' <> ALL(%(chain_repeats)s)",
        params={**stream.params, "chain_repeats": list(_REPEATS)},
        name=stream.name,
        translator=stream.translator,
    )
    return Connector(
        stream,
        db,
        batch_size=batch_size,
        poll_interval=poll_interval,
    )
