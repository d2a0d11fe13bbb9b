"""Dead letters: list them, and replay one.

A dead letter is an event a consumer gave up on (``pgflow.dead_letters``; the view
``pgflow.dead_letter_queue`` adds its state and age). ``pgflow dead-letters`` and the
web console's Dead letters page both go through this module, so an operator gets the
same rows and the same replay whichever tool they use::

    page = await list_dead_letters(conn, consumer="orders/CREATED")
    print(await replay_dead_letter(conn, page.rows[0]["id"]))

There are two ways to replay:

* :func:`replay_dead_letter` needs nothing but the database: a workflow run's dead
  letter retries the run; any other is appended to the log again (stream
  ``pgflow.replay``) for a fixed-up consumer to pick up.
* :func:`replay_through_connector` gives a connector's dead letter to the connector
  function of a built :class:`~pgflow.workflow.workflow.Workflow` again, in one
  transaction with marking it replayed (``pgflow dead-letters --replay ID --target``).

Either way a dead letter is replayed at most once: the mark and the replay commit
together, and a second replay is refused with :class:`~pgflow.errors.InvalidTransition`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from pgflow import _db
from pgflow.errors import ConfigError, InvalidTransition, NotFound, PgflowError, ReplayFailed
from pgflow.log.names import split_shard
from pgflow.workflow._dead_letters import mark_replayed

if TYPE_CHECKING:
    from pgflow.workflow.workflow import Workflow

__all__ = [
    "ConnectorDeadLetter",
    "DeadLetterPage",
    "ReplayFailed",
    "connector_dead_letter",
    "get_dead_letter",
    "list_dead_letters",
    "replay_dead_letter",
    "replay_through_connector",
]


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    """Rows of ``pgflow.dead_letter_queue`` (every column, as dicts) and, when more rows
    follow, the id to pass as ``after`` for the next page (None on the last page)."""

    rows: list[dict[str, Any]]
    next_after: int | None


async def list_dead_letters(
    conn: AsyncConnection[Any],
    *,
    pending_only: bool = True,
    consumer: str | None = None,
    newest_first: bool = True,
    limit: int = 50,
    after: int | None = None,
) -> DeadLetterPage:
    """One page of dead letters in id order (newest first unless ``newest_first=False``).

    ``pending_only``: only those not replayed yet. Pages by key, never OFFSET: the
    next page starts after the id of the last row (``after=page.next_after``), so
    every page costs one walk of the primary key however far down it is.
    """
    if limit < 1:
        raise ConfigError(f"limit must be positive, got {limit}")
    clauses: list[str] = []
    params: dict[str, Any] = {"limit": limit + 1}
    if pending_only:  # not state = 'pending': the view's CASE would hide the column
        clauses.append("replayed_at IS NULL")
    if consumer:
        clauses.append("consumer = %(consumer)s")
        params["consumer"] = consumer
    direction = "DESC" if newest_first else "ASC"
    if after is not None:
        clauses.append(f"id {'<' if newest_first else '>'} %(after)s")
        params["after"] = after
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT * FROM pgflow.dead_letter_queue {where}"
            f" ORDER BY id {direction} LIMIT %(limit)s",
            params,
        )
        rows = await cur.fetchall()
    if len(rows) <= limit:
        return DeadLetterPage(rows, None)
    return DeadLetterPage(rows[:limit], int(rows[limit - 1]["id"]))


async def get_dead_letter(conn: AsyncConnection[Any], dead_letter_id: int) -> dict[str, Any] | None:
    """One row of ``pgflow.dead_letter_queue``, or None."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT * FROM pgflow.dead_letter_queue WHERE id = %s", [dead_letter_id])
        return await cur.fetchone()


async def _pending(
    conn: AsyncConnection[Any], dead_letter_id: int, *, lock: bool = False
) -> tuple[Any, ...]:
    """``(consumer, event_id, foreign_id, type, headers, payload)`` of a dead letter
    that exists (else :class:`NotFound`) and is not replayed yet (else
    :class:`InvalidTransition`); ``lock``: row-locked until the transaction ends."""
    cur = await conn.execute(
        "SELECT consumer, event_id, foreign_id, type, headers, payload, replayed_at"
        f" FROM pgflow.dead_letters WHERE id = %s{' FOR UPDATE' if lock else ''}",
        [dead_letter_id],
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no dead letter with id {dead_letter_id}", dead_letter_id=dead_letter_id)
    if row[-1] is not None:
        raise InvalidTransition(
            f"dead letter {dead_letter_id} was already replayed at {row[-1]:%Y-%m-%d %H:%M:%S}"
        )
    return tuple(row[:-1])


def _headers(raw: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in dict(raw or {}).items()}


# ------------------------------------------------------------ replay, database only
async def replay_dead_letter(conn: AsyncConnection[Any], dead_letter_id: int) -> str:
    """Submit dead letter ``dead_letter_id`` again and mark it replayed (one transaction).

    * A dead letter of a workflow run (its foreign id has a run in progress in a
      workflow the consumer belongs to): :func:`pgflow.workflow.actions.retry` — the
      run's current step runs again with its error count reset.
    * Any other dead letter (a connector's malformed or failed outside event): a copy
      is appended to ``pgflow.events`` on stream ``pgflow.replay`` with the original
      consumer, event id, type, headers and payload in its headers, for an operator's
      fixed-up consumer (or ``pgflow.connectors.table``) to pick up.

    Returns a one-line description of what was done.
    """
    from pgflow.log.events import NewEvent, append
    from pgflow.workflow import actions

    async with conn.transaction():
        row = await _pending(conn, dead_letter_id, lock=True)
        consumer, event_id, foreign_id, type_, headers, payload = row
        run = None
        if foreign_id:
            cur = await conn.execute(
                "SELECT workflow, run_id FROM pgflow.records WHERE foreign_id = %s"
                " AND run_state IN ('INITIATED', 'RUNNING', 'PAUSED')"
                # step consumers are named "<workflow>/<STATUS>"
                " AND (%s = workflow OR starts_with(%s, workflow || '/'))"
                " ORDER BY created_at DESC LIMIT 1",
                [foreign_id, consumer, consumer],
            )
            run = await cur.fetchone()
        if run is not None:
            rec = await actions.retry(conn, run[0], foreign_id, run[1])
            done = (
                f"replayed dead letter {dead_letter_id}: retried {rec.workflow} / "
                f"{rec.foreign_id} / run {rec.run_id} at {rec.status}"
            )
        else:
            replay_headers = _headers(headers)
            replay_headers.update(
                {
                    "replay_of": str(dead_letter_id),
                    "consumer": consumer,
                    "event_id": event_id,
                    "type": type_ or "",
                }
            )
            if payload is not None:
                replay_headers["payload"] = json.dumps(payload, separators=(",", ":"))
            event = NewEvent(
                stream="pgflow.replay",
                type=type_ or "replay",
                foreign_id=foreign_id or event_id,
                headers=replay_headers,
            )
            (new_id,) = await append(conn, [event])
            done = (
                f"replayed dead letter {dead_letter_id}: appended event {new_id} "
                f"to stream pgflow.replay for consumer {consumer}"
            )
        await mark_replayed(conn, dead_letter_id)  # locked FOR UPDATE above: still pending
    return done


# ------------------------------------------------------- replay, through a connector
@dataclass(frozen=True, slots=True)
class ConnectorDeadLetter:
    """A pending dead letter of a connector, well-formed enough to be given to its
    connector function again (:func:`connector_dead_letter` checked it)."""

    id: int
    consumer: str
    event_id: str
    foreign_id: str
    type: str
    headers: dict[str, str]


async def connector_dead_letter(
    conn: AsyncConnection[Any], dead_letter_id: int
) -> ConnectorDeadLetter:
    """Dead letter ``dead_letter_id`` if it can be replayed through its connector:
    it exists (else :class:`NotFound`), is pending and well-formed (else
    :class:`InvalidTransition`) and is a connector's (else :class:`ConfigError`).

    Worth calling before building the workflow to replay it through: nothing of the
    workflow's (its module, its factory) runs for a dead letter that cannot be replayed.
    """
    consumer, event_id, foreign_id, type_, headers, _ = await _pending(conn, dead_letter_id)
    if "--" not in consumer:
        raise ConfigError(
            f"dead letter {dead_letter_id} is not a connector's (consumer {consumer!r}); "
            "replay it without --target"
        )
    if foreign_id is None or type_ is None:
        raise InvalidTransition(
            f"dead letter {dead_letter_id} is a malformed message (no foreign id or type): "
            "fix it at the source and send it again"
        )
    return ConnectorDeadLetter(dead_letter_id, consumer, event_id, foreign_id, type_,
                               _headers(headers))  # fmt: skip


def _connector_of(consumer: str, workflow: str) -> str | None:
    """The connector name in a dead letter's ``consumer`` if it belongs to ``workflow``.

    The runner stores ``"<workflow>--<connector>"``
    (:func:`pgflow.workflow._connectors.dead_letter_consumer`); a consumer name with its
    shard suffix (``"<workflow>--<connector>-1-of-2"``) is accepted too. Matching the
    known workflow name, rather than splitting at a ``--``, stays right when a name
    itself contains ``--``.
    """
    prefix = f"{workflow}--"
    if not consumer.startswith(prefix) or len(consumer) == len(prefix):
        return None
    return consumer[len(prefix) :]


async def replay_through_connector(
    conn: AsyncConnection[Any],
    dead_letter: int | ConnectorDeadLetter,
    workflow: Workflow[Any, Any],
) -> str:
    """Give a connector's dead letter to its connector function in ``workflow`` again.

    The function runs through the workflow's API bound to one transaction that also
    marks the dead letter replayed: either both commit or neither does. When the
    function raises, :class:`ReplayFailed` says so and the dead letter stays pending.
    ``workflow`` stays open (it is the caller's to close). Returns a one-line
    description of what was done.
    """
    from pgflow.connectors._base import ConnectorEvent
    from pgflow.observability import connector_span

    if isinstance(dead_letter, int):
        dead_letter = await connector_dead_letter(conn, dead_letter)
    dl, wf = dead_letter, workflow
    connector = _connector_of(dl.consumer, wf.name)
    if connector is None:
        raise ConfigError(
            f"the dead letter belongs to {dl.consumer.split('--', 1)[0]!r} (consumer "
            f"{dl.consumer!r}), not to workflow {wf.name!r}"
        )
    spec = wf.graph.connectors.get(connector) or wf.graph.connectors.get(
        (split_shard(connector) or (connector,))[0]
    )
    if spec is None:
        raise ConfigError(f"workflow {wf.name!r} has no connector {connector!r}")
    event = ConnectorEvent(id=dl.event_id, foreign_id=dl.foreign_id, type=dl.type,
                           headers=dl.headers)  # fmt: skip
    async with conn.transaction():
        if not await mark_replayed(conn, dl.id):
            raise InvalidTransition(f"dead letter {dl.id} was already replayed")
        attributes = {"workflow": wf.name, "foreign_id": dl.foreign_id, "replay_of": dl.id}
        try:
            with connector_span(spec.name, dl.event_id, attributes, headers=event.headers):
                await spec.fn(wf.bind(conn), event)
        except PgflowError:
            raise
        except Exception as exc:
            raise ReplayFailed(
                f"replay of dead letter {dl.id} failed, nothing changed (it "
                f"stays pending): {type(exc).__name__}: {_db.first_line(exc)}",
                dead_letter_id=dl.id,
            ) from exc
    return (
        f"replayed dead letter {dl.id}: connector {spec.name} of {wf.name} "
        f"handled event {dl.event_id} for {dl.foreign_id!r}"
    )
