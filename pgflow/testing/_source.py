"""What the connector conformance checks share (see :mod:`pgflow.testing.connectors`)."""

from __future__ import annotations

import asyncio
import json
import unittest
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pgflow.connectors._base import (
    Ack,
    Connector,
    ConnectorConsumer,
    ConnectorEvent,
    MalformedEvent,
)

__all__ = [
    "Check",
    "MalformedProbe",
    "NotApplicable",
    "Source",
    "SourceFactory",
    "assert_same_events",
    "check_probe",
    "events",
    "expect",
    "new_tag",
    "prepare",
    "recv",
]


class NotApplicable(unittest.SkipTest):
    """The source lacks what a check needs (pytest and unittest report a skip)."""


@dataclass(frozen=True)
class MalformedProbe:
    """What :attr:`Source.publish_malformed` put on the source, to check the
    :class:`~pgflow.connectors.MalformedEvent` against (``None``: not checked)."""

    event_id: str | None = None  #: the id the connector must report
    reason: str | None = None  #: a part of the reason it must give
    payload: Any = None  #: the payload it must carry (JSON data)


@dataclass
class Source:
    """One isolated source of the connector under test, and how to feed it."""

    connector: Connector
    #: publish one event so the connector delivers it (e.g. ``connector.publish``)
    publish: Callable[[ConnectorEvent], Awaitable[object]]
    #: put one undecodable message on the source; None: the malformed checks skip
    publish_malformed: Callable[[], Awaitable[MalformedProbe]] | None = None
    #: called with each consumer name before anything is published (e.g. RabbitMQ
    #: declares the name's queue: a queue only gets what is published after it exists)
    prepare: Callable[[str], Awaitable[None]] | None = None
    #: kill a consumer the way a crashed process leaves it (no nack, no leave);
    #: default ``consumer.close()``
    kill: Callable[[Any], Awaitable[None]] | None = None
    ordered: bool = True  #: events of one foreign id arrive in publish order
    #: at most this many transactions for 100 events waiting when a workflow starts
    #: (None: not checked): a consumer that hands out what it already holds without
    #: waiting lets the runner commit many events per transaction
    batches: int | None = 25
    timeout: float = 30.0  #: seconds any one expected delivery may take


#: Makes one fresh :class:`Source`; ``fast_redelivery``: the check waits for the
#: source to redeliver unacked messages of a dead consumer, so use the shortest
#: redelivery delay (NATS ``ack_wait``, Redis ``claim_idle``) — and a normal one
#: otherwise, or a slow-but-alive delivery is redelivered and counted twice.
SourceFactory = Callable[[bool], AbstractAsyncContextManager[Source]]
Check = Callable[[SourceFactory, str], Awaitable[None]]


def events(tag: str, n: int, foreign_ids: int, start: int = 0) -> list[ConnectorEvent]:
    return [
        ConnectorEvent(
            f"{tag}-e{i}",
            f"{tag}-o{i % foreign_ids}",
            "conformance.checked",
            {"seq": str(i), "note": "ünïcode ✓"},
            datetime(2030, 1, 2, 3, 4, 5, 6000 + i, tzinfo=UTC),
        )
        for i in range(start, start + n)
    ]


def expect(ok: bool, message: str) -> None:
    """``assert``, but not removed by ``python -O`` (the checks are library code)."""
    if not ok:
        raise AssertionError(message)


def new_tag() -> str:
    return uuid.uuid4().hex[:10]


async def prepare(src: Source, *names: str) -> None:
    if src.prepare is not None:
        for name in names:
            await src.prepare(name)


async def recv(src: Source, consumer: ConnectorConsumer) -> tuple[ConnectorEvent, Ack]:
    try:
        return await asyncio.wait_for(consumer.recv(), src.timeout)
    except TimeoutError:
        raise AssertionError(f"recv() delivered nothing within {src.timeout}s") from None


def assert_same_events(
    got: Iterable[ConnectorEvent], sent: Iterable[ConnectorEvent], *, ordered: bool = True
) -> None:
    """``got`` is ``sent`` — each event whole, once — in ``sent``'s order per foreign id
    (when ``ordered``); events of different foreign ids may interleave."""
    got, sent = list(got), list(sent)
    by_id = {e.id: e for e in sent}
    ids = [e.id for e in got]
    expect(sorted(ids) == sorted(by_id), f"delivered {ids}, published {sorted(by_id)}")
    for e in got:
        want = by_id[e.id]
        fields = (e.foreign_id, e.type, dict(e.headers), e.created_at)
        expected = (want.foreign_id, want.type, dict(want.headers), want.created_at)
        expect(fields == expected, f"{e.id} arrived as {fields}, was published as {expected}")
    if ordered:
        per_fid: dict[str, list[str]] = defaultdict(list)
        for e in got:
            per_fid[e.foreign_id].append(e.id)
        for fid, seen in per_fid.items():
            want_order = [e.id for e in sent if e.foreign_id == fid]
            expect(seen == want_order, f"{fid}: delivered in order {seen}, published {want_order}")


def check_probe(bad: MalformedEvent, probe: MalformedProbe) -> None:
    """``bad`` is what the connector must raise for ``probe``'s message."""
    expect(bool(bad.reason), "a MalformedEvent needs a reason")
    json.dumps(bad.payload)  # it is stored as JSONB in pgflow.dead_letters
    if probe.event_id is not None:
        expect(bad.event_id == probe.event_id, f"{bad.event_id!r} != {probe.event_id!r}")
    if probe.reason is not None:
        expect(probe.reason in bad.reason, f"reason {bad.reason!r} does not say {probe.reason!r}")
    if probe.payload is not None:
        expect(bad.payload == probe.payload, f"{bad.payload!r} != {probe.payload!r}")
