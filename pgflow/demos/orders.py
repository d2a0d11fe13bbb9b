"""The seed example, end to end: payments from a connector drive an order workflow.

A payment processor emits ``payment.completed``, ``payment.failed`` and
``payment.refunded`` events (here from the in-memory connector; in production a
broker, a webhook, or a captured ``payments`` table). The connector function
:func:`handle_payment` turns each into a run of the ``orders`` workflow:

* headers are validated (``amount`` a positive decimal, ``currency`` three letters):
  a bad event raises :class:`PaymentRejected`, is retried, then dead-lettered with
  the reason — nothing is silently dropped;
* payments above :data:`HIGH_VALUE_THRESHOLD` are filtered out (left for manual
  review: no run);
* a refund for an order this workflow never saw is ignored (``api.exists``);
* triggering is idempotent on the event id (``run_id_for``): a redelivered event
  finds its run and changes nothing.

Each run then takes one step: fulfil a paid order, notify the customer of a failed
payment, record a refund. ``pgflow demo`` runs it all on the embedded PostgreSQL (or
``--dsn``) and prints the runs and the SQL to look at them.

The demo runs against whatever database it is given — often the developer's own, since
every doc snippet sets ``PGFLOW_DATABASE_URL`` — so it never touches data it did not
create: its workflow has its own name (:data:`WORKFLOW`, not ``orders``, which the docs'
examples use), it deletes nothing, and it reports only the runs and dead letters of this
invocation (event ids carry a fresh tag, run ids derive from them).
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from pgflow import _db
from pgflow.connectors._base import Connector, ConnectorEvent
from pgflow.connectors.memory import Connector as MemoryConnector
from pgflow.connectors.memory import event
from pgflow.ops.migrations import migrate
from pgflow.workflow._connectors import dead_letter_consumer
from pgflow.workflow.api import API, run_id_for
from pgflow.workflow.builder import Builder
from pgflow.workflow.run import Run
from pgflow.workflow.workflow import Workflow

__all__ = [
    "CONNECTOR",
    "DEAD_LETTER_CONSUMER",
    "HIGH_VALUE_THRESHOLD",
    "WORKFLOW",
    "DemoResult",
    "Order",
    "PaymentRejected",
    "Status",
    "build_orders",
    "handle_payment",
    "order_from_event",
    "run_demo",
    "sample_events",
]

#: the demo's own workflow name (a user's ``orders`` workflow is never touched)
WORKFLOW = "pgflow-demo"
CONNECTOR = "payment-processor"
#: the demo connector's ``pgflow.dead_letters.consumer`` (scoped to the workflow)
DEAD_LETTER_CONSUMER = dead_letter_consumer(WORKFLOW, CONNECTOR)
#: Payments above this amount need a human: the connector skips them.
HIGH_VALUE_THRESHOLD = Decimal("10000")


class Status(enum.IntEnum):
    UNKNOWN = 0
    PAYMENT_COMPLETED = 1
    FULFILLED = 2
    PAYMENT_FAILED = 3
    CUSTOMER_NOTIFIED = 4
    REFUNDED = 5
    REFUND_RECORDED = 6


#: Which status a payment event starts its run at.
STARTS = {
    "payment.completed": Status.PAYMENT_COMPLETED,
    "payment.failed": Status.PAYMENT_FAILED,
    "payment.refunded": Status.REFUNDED,
}


@dataclass
class Order:
    order_id: str = ""
    amount: str = "0"
    currency: str = ""
    payment_event: str = ""
    notes: list[str] = field(default_factory=list)


class PaymentRejected(ValueError):
    """A payment event whose headers are missing or invalid (dead-lettered)."""


def order_from_event(ev: ConnectorEvent) -> Order:
    """Validate the headers of a payment event; :class:`PaymentRejected` says why not."""
    raw_amount = ev.headers.get("amount")
    if raw_amount is None:
        raise PaymentRejected(f"event {ev.id}: missing header 'amount'")
    try:
        amount = Decimal(raw_amount)
    except InvalidOperation:
        raise PaymentRejected(f"event {ev.id}: amount {raw_amount!r} is not a number") from None
    if not amount.is_finite() or amount <= 0:
        raise PaymentRejected(f"event {ev.id}: amount {raw_amount!r} must be positive")
    currency = ev.headers.get("currency", "")
    if len(currency) != 3 or not currency.isalpha() or not currency.isupper():
        raise PaymentRejected(f"event {ev.id}: currency {currency!r} is not an ISO 4217 code")
    return Order(ev.foreign_id, str(amount), currency, ev.id)


async def handle_payment(api: API[Order, Status], ev: ConnectorEvent) -> None:
    """The connector function (see the module doc)."""
    start = STARTS.get(ev.type)
    if start is None:
        return  # not a payment event: not ours
    order = order_from_event(ev)
    if Decimal(order.amount) > HIGH_VALUE_THRESHOLD:
        return  # high value: manual review, no automatic run
    if ev.type == "payment.refunded" and not await api.exists(ev.foreign_id):
        return  # refund of an order we never handled
    await api.trigger(ev.foreign_id, order, start, run_id=run_id_for(CONNECTOR, ev.id))


async def fulfil(run: Run[Order, Status]) -> Status:
    run.object.notes.append("shipped")
    return Status.FULFILLED


async def notify_customer(run: Run[Order, Status]) -> Status:
    run.object.notes.append("customer told to retry payment")
    return Status.CUSTOMER_NOTIFIED


async def record_refund(run: Run[Order, Status]) -> Status:
    run.object.notes.append(f"refunded {run.object.amount} {run.object.currency}")
    return Status.REFUND_RECORDED


def build_orders(
    db: Any,
    connector: Connector,
    *,
    name: str = WORKFLOW,
    parallel_count: int = 1,
    max_retries: int = 3,
    err_backoff: timedelta = timedelta(milliseconds=20),
    polling_frequency: timedelta = timedelta(milliseconds=100),
    batch_size: int = 100,
) -> Workflow[Order, Status]:
    """The orders workflow fed by ``connector`` through :func:`handle_payment`."""
    b: Builder[Order, Status] = Builder(name, Order, Status)
    fast = {"polling_frequency": polling_frequency, "err_backoff": err_backoff}
    b.add_step(Status.PAYMENT_COMPLETED, fulfil, Status.FULFILLED, **fast)
    b.add_step(Status.PAYMENT_FAILED, notify_customer, Status.CUSTOMER_NOTIFIED, **fast)
    b.add_step(Status.REFUNDED, record_refund, Status.REFUND_RECORDED, **fast)
    b.add_connector(
        CONNECTOR,
        connector,
        handle_payment,
        parallel_count=parallel_count,
        max_retries=max_retries,
        batch_size=batch_size,
        **fast,
    )
    return b.build(db)


def sample_events(tag: str = "") -> list[ConnectorEvent]:
    """The demo's payment events; ``tag`` makes event ids unique per demo run."""

    def e(n: int, order: str, kind: str, **headers: str) -> ConnectorEvent:
        return event(f"pay-{n}{tag}", order, kind, **headers)

    return [
        e(1, "order-1", "payment.completed", amount="120.00", currency="EUR"),
        e(2, "order-2", "payment.completed", amount="80.50", currency="USD"),
        e(3, "order-3", "payment.failed", amount="40.00", currency="EUR"),
        e(4, "order-4", "payment.completed", amount="25000.00", currency="EUR"),  # high value
        e(5, "order-5", "payment.completed", currency="EUR"),  # no amount: dead letter
        e(6, "order-6", "payment.completed", amount="12.00", currency="euro"),  # dead letter
        e(2, "order-2", "payment.completed", amount="80.50", currency="USD"),  # redelivered
        e(7, "order-9", "payment.refunded", amount="10.00", currency="EUR"),  # unknown order
    ]


@dataclass
class DemoResult:
    runs: list[tuple[str, str, str, str]]  #: foreign id, status, run state, notes
    dead_letters: list[tuple[str, str]]  #: event id, reason
    skipped: list[str]  #: event ids that started nothing
    seconds: float


async def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the demo did not finish in time")
        await asyncio.sleep(0.02)


async def run_demo(dsn: str, *, timeout: float = 20.0, tag: str | None = None) -> DemoResult:
    """Migrate, run the workflow over :func:`sample_events` (+ a refund once order-1
    is fulfilled) and return what happened in this invocation. Deletes nothing: earlier
    demo runs stay, and are simply not reported."""
    started = time.monotonic()
    tag = f"-{secrets.token_hex(4)}" if tag is None else tag
    await migrate(dsn)
    events = sample_events(tag)
    refund = event(f"pay-8{tag}", "order-1", "payment.refunded", amount="120.00", currency="EUR")
    mine = _Invocation([*events, refund])
    memory = MemoryConnector(events)
    wf = build_orders(dsn, memory)
    async with wf:
        await _wait(lambda: mine.settled(dsn, 3, 2), timeout)
        # A refund for a fulfilled order starts a new run for it.
        memory.append(refund)
        await _wait(lambda: mine.settled(dsn, 4, 2), timeout)
    async with await _db.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT foreign_id, status, run_state, object->'notes' FROM pgflow.runs"
            " WHERE workflow = %s AND run_id = ANY(%s::uuid[]) ORDER BY foreign_id, created_at",
            (WORKFLOW, mine.run_ids),
        )
        runs = [(r[0], r[1], r[2], ", ".join(r[3] or [])) for r in await cur.fetchall()]
        cur = await conn.execute(
            "SELECT event_id, reason FROM pgflow.dead_letter_queue"
            " WHERE consumer = %s AND event_id = ANY(%s) ORDER BY id",
            (DEAD_LETTER_CONSUMER, mine.event_ids),
        )
        dead = [(r[0], r[1]) for r in await cur.fetchall()]
    ran = {r[0] for r in runs}
    dead_ids = {d[0] for d in dead}
    skipped = [e.id for e in events if e.foreign_id not in ran and e.id not in dead_ids]
    return DemoResult(runs, dead, sorted(set(skipped)), time.monotonic() - started)


class _Invocation:
    """The runs and dead letters one demo invocation can create (by its event ids)."""

    def __init__(self, events: Sequence[ConnectorEvent]) -> None:
        self.event_ids = sorted({e.id for e in events})
        self.run_ids = [run_id_for(CONNECTOR, e) for e in self.event_ids]

    async def settled(self, dsn: str, finished: int, dead: int) -> bool:
        async with await _db.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM pgflow.records WHERE workflow = %s"
                "        AND run_id = ANY(%s::uuid[]) AND run_state = 'COMPLETED'),"
                "       (SELECT count(*) FROM pgflow.dead_letters WHERE consumer = %s"
                "        AND event_id = ANY(%s))",
                (WORKFLOW, self.run_ids, DEAD_LETTER_CONSUMER, self.event_ids),
            )
            row = await cur.fetchone()
        return row is not None and row[0] >= finished and row[1] >= dead


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
