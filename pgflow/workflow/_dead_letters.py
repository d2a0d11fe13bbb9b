"""Dead letters: where a connector's event goes when its function keeps failing.

After ``max_retries`` attempts (or at once for a :class:`~pgflow.connectors.Reject`, or
a :class:`~pgflow.connectors.MalformedEvent` that never was an event) the connector
runner stores the event here with the reason and acks it: nothing is lost, nothing
blocks its shard forever. ``pgflow dead-letters`` lists and replays them.

This module owns every write of ``pgflow.dead_letters`` but one: storing a dead letter
and marking it replayed (:mod:`pgflow.ops.dead_letters` replays, and calls
:func:`mark_replayed`); retention's prune deletes old replayed ones.
"""

from __future__ import annotations

import json
from typing import Any

from psycopg import AsyncConnection

from pgflow.connectors._base import ConnectorEvent, MalformedEvent
from pgflow.log.names import ConsumerName
from pgflow.workflow._codec import to_jsonable

__all__ = ["dead_letter", "dead_letter_consumer", "mark_replayed", "to_jsonable_safe"]


def dead_letter_consumer(workflow: str, connector: str) -> str:
    """The ``pgflow.dead_letters.consumer`` of a workflow's connector:
    ``"<workflow>--<connector>"`` (its consumer names without the shard suffix,
    :attr:`pgflow.log.names.ConsumerName.group`).

    Scoped to the workflow like the consumer names, so same-named connectors of two
    workflows keep separate dead letters (the table is ``UNIQUE (consumer,
    event_id)``); one for all shards, as an event id names one event whichever shard
    handled it. Step consumers' names (``"<workflow>/<STATUS>"``) cannot collide.
    """
    return ConsumerName(workflow, connector).group


async def dead_letter(
    conn: AsyncConnection[Any],
    consumer: str,
    event: ConnectorEvent | MalformedEvent,
    reason: str,
    attempts: int,
) -> None:
    """Store ``event`` in ``pgflow.dead_letters`` (idempotent per consumer and event id:
    a second failure of the same event adds its attempts and replaces the reason)."""
    if isinstance(event, MalformedEvent):
        values: tuple[Any, ...] = (
            event.event_id,
            event.foreign_id,
            None,
            "{}",
            json.dumps(to_jsonable_safe(event.payload)),
        )
    else:
        values = (event.id, event.foreign_id, event.type, json.dumps(dict(event.headers)), None)
    await conn.execute(
        "INSERT INTO pgflow.dead_letters"
        " (consumer, event_id, foreign_id, type, headers, payload, reason, attempts)"
        " VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s)"
        " ON CONFLICT (consumer, event_id) DO UPDATE SET reason = excluded.reason,"
        " attempts = pgflow.dead_letters.attempts + excluded.attempts,"
        " created_at = now(), replayed_at = NULL",
        (consumer, *values, reason, attempts),
    )


async def mark_replayed(conn: AsyncConnection[Any], dead_letter_id: int) -> bool:
    """Mark a pending dead letter replayed, in the caller's transaction (the one that
    replays it, so both commit or neither). False when it was not pending: replayed
    already, perhaps concurrently, or gone."""
    cur = await conn.execute(
        "UPDATE pgflow.dead_letters SET replayed_at = now()"
        " WHERE id = %s AND replayed_at IS NULL",
        [dead_letter_id],
    )
    return cur.rowcount == 1


def to_jsonable_safe(value: Any) -> Any:
    """``value`` as JSON data; anything that is not becomes its ``repr`` (a malformed
    event's payload is stored for a human to read, whatever it is)."""
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "replace")
    try:
        return to_jsonable(value)
    except TypeError:
        return repr(value)
