"""The workflow tests/test_workflow_chaos.py runs in its (repeatedly killed) workers.

``pgflow worker tests.chaos_app:wf`` (DSN from ``PGFLOW_DATABASE_URL``). Three steps,
each writing one row through ``run.tx`` into ``chaos_effects`` (unique on
``(foreign_id, step)``: a second committed application would fail) and
``chaos_effect_log`` (no constraint: a second committed application would show up as
a duplicate row). Some steps raise on their first attempt or two — *after* writing, so
the retry path must roll those writes back — following a plan derived from the chaos
seed, so the test process can compute which runs were meant to be retried.
"""

from __future__ import annotations

import asyncio
import enum
import os
import zlib
from typing import Any

import pgflow

STEPS = ("charge", "pack", "ship")


class Status(enum.IntEnum):
    CREATED = 1
    CHARGED = 2
    PACKED = 3
    SHIPPED = 4


class PlannedFailure(Exception):
    """A step failing on purpose, to exercise retries under chaos."""


def planned_failures(seed: int, foreign_id: str, step: str) -> int:
    """How many attempts of ``step`` for ``foreign_id`` fail before one succeeds (0-2)."""
    bucket = zlib.crc32(f"{seed}/{foreign_id}/{step}".encode()) % 10
    return 2 if bucket == 0 else 1 if bucket == 1 else 0


def _seed() -> int:
    return int(os.environ.get("PGFLOW_CHAOS_SEED", "0"))


async def _effect(run: pgflow.Run[dict[str, Any], Status], step: str) -> None:
    await run.tx.execute(
        "INSERT INTO chaos_effects (foreign_id, step) VALUES (%s, %s)", (run.foreign_id, step)
    )
    await run.tx.execute(
        "INSERT INTO chaos_effect_log (foreign_id, step) VALUES (%s, %s)", (run.foreign_id, step)
    )
    delay = float(os.environ.get("PGFLOW_CHAOS_STEP_DELAY", "0.002"))
    if delay:
        await asyncio.sleep(delay)  # keep batches in flight long enough to be killed
    if run.err_count < planned_failures(_seed(), run.foreign_id, step):
        raise PlannedFailure(f"{step} of {run.foreign_id}, attempt {run.err_count + 1}")


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
    b: pgflow.Builder[dict[str, Any], Status] = pgflow.Builder(
        "chaos",
        dict,
        Status,
        polling_frequency=0.05,
        batch_size=5,
        err_backoff=0.05,
        pause_after_err_count=5,  # a replayed effect (unique violation) would pause the run
    )
    b.add_step(Status.CREATED, charge, Status.CHARGED, parallel_count=3)
    b.add_step(Status.CHARGED, pack, Status.PACKED, parallel_count=2)
    b.add_step(Status.PACKED, ship, Status.SHIPPED, parallel_count=3)
    return b


def wf() -> pgflow.Workflow[dict[str, Any], Status]:
    """Factory for ``pgflow worker tests.chaos_app:wf``; a small pool keeps three workers
    (plus the ones still shutting down) well inside the server's connection limit."""
    return make_builder().build(None, pool_size=5)


APP_TABLES = (
    "CREATE TABLE chaos_effects (foreign_id text NOT NULL, step text NOT NULL,"
    " UNIQUE (foreign_id, step));"
    "CREATE TABLE chaos_effect_log (foreign_id text NOT NULL, step text NOT NULL)"
)
