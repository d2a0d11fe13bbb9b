"""The connector conformance suite: the checks every shipped broker connector passes.

A connector author runs them against their own connector. Each check takes a
:data:`SourceFactory` — it makes one fresh, isolated :class:`Source` (a new stream,
topic or queue prefix, so checks never see each other's messages) — and the DSN of a
migrated database (the ``pgflow_dsn`` fixture; the checks that drive a workflow use
it, the others ignore it)::

    from pgflow.testing.connectors import CHECKS, Source

    @contextlib.asynccontextmanager
    async def my_source(fast_redelivery: bool):
        conn = MyConnector(stream=f"test-{uuid.uuid4().hex}", ack_wait=1 if fast_redelivery else 30)
        try:
            yield Source(conn, publish=conn.publish)
        finally:
            await conn.close()

    @pytest.mark.parametrize("check", CHECKS.values(), ids=CHECKS.keys())
    async def test_conformance(check, pgflow_dsn):
        await check(my_source, pgflow_dsn)

(or ``await run_connector_conformance(my_source, dsn)`` from any runner). A check
whose capability the source lacks (no ``publish_malformed``) raises
:class:`NotApplicable`, which pytest reports as a skip.

What is checked — the contract of :mod:`pgflow.connectors._base` for sources whose
position lives outside the workflow's database (at-least-once: commit, then ack):

* ``delivery``: publish → recv → ack hands back each event whole (id, foreign id,
  type, headers, created_at), in publish order per foreign id (``ordered``); each
  consumer name has its own position and sees every event; a consumer made again under
  a name resumes after what was acked; a waiting ``recv()`` returns what is published.
* ``redelivery_after_close``: what was received but not acked when the consumer closed
  (after a waiting ``recv()`` was cancelled, as the runner does when it stops) comes
  again to the next consumer of that name, even when later events were acked first;
  nothing acked comes again.
* ``redelivery_after_crash``: the same when the consumer dies without closing
  (``Source.kill``), within ``Source.timeout`` given ``fast_redelivery``.
* ``malformed``: an undecodable message raises
  :class:`~pgflow.connectors.MalformedEvent` (reason, id, JSON-able payload) carrying
  an ack; acking it moves past it, and the consumer goes on with the next event.
* ``close``: ``close()`` of a consumer (idle or after a delivery) and of the connector
  is idempotent.
* ``workflow_once``: through a workflow, each event gets exactly one run and one call
  of the connector function, acks come only after the effect committed, in order per
  foreign id, and batched (100 events waiting when the workflow starts take at most
  ``Source.batches`` transactions: a consumer that hands out what it already holds
  without waiting lets the runner commit many events per transaction).
* ``workflow_crash``: a worker that committed every event but died before acking:
  the next worker gets them all again, and each still has exactly one run.
* ``workflow_malformed``: an undecodable message lands in ``pgflow.dead_letters``
  (reason, payload), is acked after that committed, and the connector keeps going.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pgflow.connectors._base import Ack, ConnectorConsumer, ConnectorEvent, MalformedEvent
from pgflow.testing._source import (
    Check,
    MalformedProbe,
    NotApplicable,
    Source,
    SourceFactory,
    assert_same_events,
    check_probe,
    events,
    expect,
    new_tag,
    prepare,
    recv,
)
from pgflow.testing._workflow_checks import (
    check_workflow_crash,
    check_workflow_malformed,
    check_workflow_once,
)

__all__ = [
    "CHECKS",
    "Check",
    "MalformedProbe",
    "NotApplicable",
    "Report",
    "Source",
    "SourceFactory",
    "check_close",
    "check_delivery",
    "check_malformed",
    "check_redelivery_after_close",
    "check_redelivery_after_crash",
    "check_workflow_crash",
    "check_workflow_malformed",
    "check_workflow_once",
    "run_connector_conformance",
]


async def check_delivery(make: SourceFactory, dsn: str = "") -> None:
    """publish → recv → ack; positions per consumer name (see the module doc)."""
    tag = new_tag()
    a_name, b_name = f"conform-{tag}-a", f"conform-{tag}-b"
    async with make(False) as src:
        await prepare(src, a_name, b_name)
        sent = events(tag, 6, 2)
        for e in sent:
            await src.publish(e)
        a = await src.connector.make(a_name)
        expect(isinstance(a, ConnectorConsumer), f"{type(a).__name__} is no ConnectorConsumer")
        got = []
        for _ in sent:
            ev, ack = await recv(src, a)
            got.append(ev)
            await ack()
        assert_same_events(got, sent, ordered=src.ordered)
        b = await src.connector.make(b_name)  # its own position: sees everything too
        got_b = [(await recv(src, b))[0] for _ in sent]
        assert_same_events(got_b, sent, ordered=src.ordered)
        await a.close()
        await b.close()
        a = await src.connector.make(a_name)  # resumes after what it acked
        waiting = asyncio.ensure_future(a.recv())
        try:
            done, _ = await asyncio.wait({waiting}, timeout=0.3)
            if done:
                ev, _ = waiting.result()
                raise AssertionError(f"{ev.id} was acked, yet delivered again to {a_name}")
            late = events(tag, 1, 2, start=6)
            await src.publish(late[0])
            ev, ack = await asyncio.wait_for(waiting, src.timeout)
            assert_same_events([ev], late)
            await ack()
        finally:
            waiting.cancel()
            with contextlib.suppress(BaseException):
                await waiting
            await a.close()


async def _recv_until(
    src: Source, consumer: ConnectorConsumer, want: set[str]
) -> list[tuple[ConnectorEvent, Ack]]:
    """Receive until every id of ``want`` arrived; everything received, in order."""
    got: list[tuple[ConnectorEvent, Ack]] = []
    while not want <= {e.id for e, _ in got}:
        try:
            got.append(await recv(src, consumer))
        except AssertionError:
            seen = [e.id for e, _ in got]
            raise AssertionError(f"waited for {sorted(want)}, got only {seen}") from None
    return got


async def _nothing_acked_comes_again(src: Source, name: str, tag: str, start: int) -> None:
    """A new consumer of ``name`` gets a newly published event, and nothing before it."""
    consumer = await src.connector.make(name)
    try:
        fresh = events(tag, 1, 1, start=start)[0]
        await src.publish(fresh)
        ev, ack = await recv(src, consumer)
        expect(ev.id == fresh.id, f"{ev.id} was acked, yet delivered again (not {fresh.id})")
        await ack()
    finally:
        await consumer.close()


async def check_redelivery_after_close(make: SourceFactory, dsn: str = "") -> None:
    """Unacked events come again after close; acked ones never (see the module doc)."""
    tag = new_tag()
    name = f"conform-{tag}-w"
    async with make(True) as src:
        await prepare(src, name)
        e0, e1, e2, e3 = events(tag, 4, 1)
        for e in (e0, e1, e2):
            await src.publish(e)
        first = await src.connector.make(name)
        got = [await recv(src, first) for _ in range(3)]
        assert_same_events([e for e, _ in got], [e0, e1, e2], ordered=src.ordered)
        acks = {e.id: ack for e, ack in got}
        await acks[e0.id]()
        await acks[e2.id]()  # acked after an unacked one: must not move past e1
        waiting = asyncio.ensure_future(first.recv())  # the runner cancels this on stop
        await asyncio.sleep(0.05)
        waiting.cancel()
        with contextlib.suppress(BaseException):
            await waiting
        await first.close()
        await src.publish(e3)
        second = await src.connector.make(name)
        try:
            again = await _recv_until(src, second, {e1.id, e3.id})
            ids = [e.id for e, _ in again]
            expect(e0.id not in ids, f"acked {e0.id} was delivered again: {ids}")
            expect(set(ids) <= {e1.id, e2.id, e3.id}, f"not published here: {ids}")
            for _, ack in again:
                await ack()
        finally:
            await second.close()
        await _nothing_acked_comes_again(src, name, tag, 4)


async def check_redelivery_after_crash(make: SourceFactory, dsn: str = "") -> None:
    """A consumer killed before its ack: the event comes again (see the module doc)."""
    tag = new_tag()
    name = f"conform-{tag}-k"
    async with make(True) as src:
        await prepare(src, name)
        e0, e1 = events(tag, 2, 1)
        await src.publish(e0)
        await src.publish(e1)
        first = await src.connector.make(name)
        ev, ack = await recv(src, first)
        expect(ev.id == e0.id, f"got {ev.id} first, not {e0.id}")
        await ack()
        ev, _ = await recv(src, first)
        expect(ev.id == e1.id, f"got {ev.id} second, not {e1.id}")
        await (src.kill or type(first).close)(first)
        second = await src.connector.make(name)
        try:
            again, ack = await recv(src, second)
            expect(again.id == e1.id, f"after the crash got {again.id}, not unacked {e1.id}")
            await ack()
        finally:
            await second.close()
        await _nothing_acked_comes_again(src, name, tag, 2)


async def check_malformed(make: SourceFactory, dsn: str = "") -> None:
    """An undecodable message: MalformedEvent with an ack (see the module doc)."""
    tag = new_tag()
    name = f"conform-{tag}-m"
    async with make(False) as src:
        if src.publish_malformed is None:
            raise NotApplicable("the source cannot carry undecodable messages")
        await prepare(src, name)
        probe = await src.publish_malformed()
        good = events(tag, 1, 1)[0]
        await src.publish(good)
        consumer = await src.connector.make(name)
        bad: list[MalformedEvent] = []
        good_events = []
        try:
            for _ in range(2):  # one partition each, maybe: either may come first
                try:
                    ev, ack = await recv(src, consumer)
                except MalformedEvent as exc:
                    bad.append(exc)
                    await exc.ack()
                else:
                    good_events.append(ev)
                    await ack()
        finally:
            await consumer.close()
        expect(len(bad) == 1, f"expected one MalformedEvent, got {bad} and {good_events}")
        check_probe(bad[0], probe)
        assert_same_events(good_events, [good])
        await _nothing_acked_comes_again(src, name, tag, 1)


async def check_close(make: SourceFactory, dsn: str = "") -> None:
    """``close()`` twice, idle and after a delivery, and the connector's (module doc)."""
    tag = new_tag()
    name = f"conform-{tag}-c"
    async with make(False) as src:
        await prepare(src, name)
        idle = await src.connector.make(name)
        await idle.close()
        await idle.close()
        await src.publish(events(tag, 1, 1)[0])
        used = await src.connector.make(name)
        _, ack = await recv(src, used)
        await ack()
        await used.close()
        await used.close()
        close = getattr(src.connector, "close", None)
        if close is not None:
            await close()
            await close()


CHECKS: Mapping[str, Check] = {
    "delivery": check_delivery,
    "redelivery_after_close": check_redelivery_after_close,
    "redelivery_after_crash": check_redelivery_after_crash,
    "malformed": check_malformed,
    "close": check_close,
    "workflow_once": check_workflow_once,
    "workflow_crash": check_workflow_crash,
    "workflow_malformed": check_workflow_malformed,
}
"""Every check by name, in a sensible order (parametrise a test over it)."""


@dataclass
class Report:
    """What :func:`run_connector_conformance` ran: the checks that passed, and those
    the source could not take part in, with the reason."""

    passed: list[str] = field(default_factory=list)
    not_applicable: dict[str, str] = field(default_factory=dict)


async def run_connector_conformance(
    make: SourceFactory, dsn: str, *, only: Iterable[str] | None = None
) -> Report:
    """Run the checks (all, or those named in ``only``) one after another on the
    database ``dsn``; raises ``AssertionError`` naming every check that failed."""
    report = Report()
    failed: dict[str, BaseException] = {}
    for name in only if only is not None else CHECKS:
        try:
            await CHECKS[name](make, dsn)
        except NotApplicable as exc:
            report.not_applicable[name] = str(exc)
        except Exception as exc:
            failed[name] = exc
        else:
            report.passed.append(name)
    if failed:
        lines = [f"{name}: {type(exc).__name__}: {exc}" for name, exc in failed.items()]
        raise AssertionError("connector conformance failed:\n" + "\n".join(lines))
    return report
