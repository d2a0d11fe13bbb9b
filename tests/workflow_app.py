"""Workflows that tests run in worker subprocesses (``pgflow worker tests.workflow_app:…``)."""

from __future__ import annotations

import asyncio
import enum
import os
from typing import Any

import pgflow


class Status(enum.IntEnum):
    CREATED = 1
    CHARGED = 2
    PACKED = 3
    SHIPPED = 4


async def _effect(run: pgflow.Run[dict[str, Any], Status], step: str) -> None:
    # Two app tables written in the step's transaction: `effects` has a unique
    # constraint (a second application would fail), `effect_log` has none (a second
    # committed application would show up as a duplicate row).
    await run.tx.execute("INSERT INTO effects VALUES (%s, %s)", (run.foreign_id, step))
    await run.tx.execute("INSERT INTO effect_log VALUES (%s, %s)", (run.foreign_id, step))
    delay = float(os.environ.get("PGFLOW_TEST_STEP_DELAY", "0.002"))
    if delay:
        await asyncio.sleep(delay)  # keep batches in flight long enough to be killed


async def charge(run: pgflow.Run[dict[str, Any], Status]) -> Status:
    await _effect(run, "charge")
    return Status.CHARGED


async def pack(run: pgflow.Run[dict[str, Any], Status]) -> Status:
    await _effect(run, "pack")
    return Status.PACKED


async def ship(run: pgflow.Run[dict[str, Any], Status]) -> Status:
    await _effect(run, "ship")
    return Status.SHIPPED


def make_builder() -> pgflow.Builder[dict[str, Any], Status]:
    b = pgflow.Builder("crashy", dict, Status, polling_frequency=0.2, batch_size=20)
    b.add_step(Status.CREATED, charge, Status.CHARGED, parallel_count=2)
    b.add_step(Status.CHARGED, pack, Status.PACKED, parallel_count=2)
    b.add_step(Status.PACKED, ship, Status.SHIPPED, parallel_count=2)
    return b


#: for `pgflow graph tests.workflow_app:builder`
builder = make_builder()


def wf() -> pgflow.Workflow[dict[str, Any], Status]:
    """Factory: `pgflow worker tests.workflow_app:wf` (DSN from PGFLOW_DATABASE_URL)."""
    return make_builder().build(None)


APP_TABLES = (
    "CREATE TABLE effects (foreign_id text, step text, UNIQUE (foreign_id, step));"
    "CREATE TABLE effect_log (foreign_id text, step text)"
)
