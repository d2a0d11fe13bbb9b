"""wf.list(): typed filters and keyset pagination (luno ``List`` + ``FilterBy...``)."""

from __future__ import annotations

import enum
import itertools
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import pgflow
import pgflow.sync
from pgflow import RunState
from pgflow.workflow.listing import _encode, list_records


class S(enum.IntEnum):
    NEW = 1
    DONE = 2


def make(dsn: str) -> pgflow.Workflow[dict[str, Any], S]:
    b = pgflow.Builder("lst", dict, S)
    b.add_step(S.NEW, lambda run: S.DONE, S.DONE)
    return b.build(dsn)


def seed(dsn: str, n: int = 23) -> None:
    """n runs of 'lst' with distinct created_at, plus noise in another workflow; every
    third run COMPLETED at DONE, every fifth PAUSED; two runs share one created_at."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgflow.records (run_id, workflow, foreign_id, status, run_state,"
            " object, created_at)"
            " SELECT gen_random_uuid(), 'lst', 'f' || (i %% 7), CASE WHEN i %% 3 = 0 THEN 'DONE'"
            " ELSE 'NEW' END, CASE WHEN i %% 3 = 0 THEN 'COMPLETED' WHEN i %% 5 = 0 THEN 'PAUSED'"
            " ELSE 'CANCELLED' END, jsonb_build_object('i', i),"
            " timestamptz '2026-01-01' + least(i, 20) * interval '1 minute'"
            " FROM generate_series(1, %s) i",
            (n,),
        )
        conn.execute(
            "INSERT INTO pgflow.records (run_id, workflow, foreign_id, status, run_state)"
            " SELECT gen_random_uuid(), 'other', 'f1', 'NEW', 'CANCELLED'"
            " FROM generate_series(1, 5)"
        )


async def all_pages(wf: Any, **kw: Any) -> list[int]:
    out: list[int] = []
    after = None
    for _ in range(100):
        page = await wf.list(after=after, **kw)
        out += [r.object["i"] for r in page]
        after = page.after
        if after is None:
            return out
    raise AssertionError("paging never ended")


async def test_pages_cover_every_run_once_in_order(pgflow_dsn: str) -> None:
    seed(pgflow_dsn)
    async with make(pgflow_dsn) as wf:
        desc = await all_pages(wf, limit=4)
        asc = await all_pages(wf, limit=5, order="asc")
        assert sorted(desc) == list(range(1, 24)) and sorted(asc) == list(range(1, 24))
        assert desc == asc[::-1]  # ties on created_at (i >= 20) broken by run_id, stably
        first = await wf.list(limit=50)
        assert len(first) == 23 and first.after is None
        rec = first.records[0]
        assert isinstance(rec, pgflow.Record) and rec.workflow_name == "lst"
        assert rec.status in (S.NEW, S.DONE) and isinstance(rec.run_state, RunState)


async def test_filters(pgflow_dsn: str) -> None:
    seed(pgflow_dsn)
    async with make(pgflow_dsn) as wf:
        done = await all_pages(wf, status=S.DONE, limit=2)
        assert sorted(done) == [3, 6, 9, 12, 15, 18, 21]
        paused = await all_pages(wf, run_state=RunState.PAUSED, limit=2)
        assert sorted(paused) == [5, 10, 20]
        assert sorted(await all_pages(wf, run_state="paused")) == [5, 10, 20]
        either = await all_pages(wf, run_state=[RunState.PAUSED, "COMPLETED"], limit=3)
        assert sorted(either) == sorted([5, 10, 20, 3, 6, 9, 12, 15, 18, 21])
        by_fid = await all_pages(wf, foreign_id="f1", limit=1)
        assert sorted(by_fid) == [1, 8, 15, 22]
        assert sorted(await all_pages(wf, foreign_id=["f1", "f2"])) == [1, 2, 8, 9, 15, 16, 22, 23]
        both = await all_pages(wf, status=S.NEW, run_state=RunState.PAUSED)
        assert sorted(both) == [5, 10, 20]
        t0 = (await wf.list(order="asc", limit=1)).records[0].created_at
        window = await all_pages(
            wf,
            created_after=t0 + timedelta(minutes=2),
            created_before=t0 + timedelta(minutes=6),
            limit=2,
        )
        assert sorted(window) == [4, 5, 6]  # exclusive bounds
        # a key outside the window (or on its edge) is redundant with the bound
        for at in (t0, t0 + timedelta(minutes=2), t0 + timedelta(minutes=6), t0 + timedelta(1)):
            for order in ("asc", "desc"):
                token = _encode(at, uuid.UUID(int=2**127), order)
                page = await wf.list(
                    created_after=t0 + timedelta(minutes=2),
                    created_before=t0 + timedelta(minutes=6),
                    order=order,
                    after=token,
                )
                minute = (at - t0) // timedelta(minutes=1)
                want = [
                    i for i in (4, 5, 6) if (i - 1 > minute if order == "asc" else i - 1 < minute)
                ]
                assert sorted(r.object["i"] for r in page) == want, (at, order)
        assert await all_pages(wf, status=[S.NEW, S.DONE]) == await all_pages(wf)


async def test_keyset_is_stable_under_inserts(pgflow_dsn: str) -> None:
    seed(pgflow_dsn, 10)
    async with make(pgflow_dsn) as wf:
        page = await wf.list(limit=4, order="asc")
        seen = [r.object["i"] for r in page]
        # new runs arrive while someone pages (luno's OFFSET would shift): none of the
        # remaining ones is skipped or repeated, and new ones appear at the end
        for n in range(3):
            await wf.trigger(f"new{n}", initial={"i": 100 + n})
        after = page.after
        while after:
            page = await wf.list(limit=4, order="asc", after=after)
            seen += [r.object["i"] for r in page]
            after = page.after
        assert seen == [*range(1, 11), 100, 101, 102]


async def test_bad_input_is_one_clear_error(pgflow_dsn: str) -> None:
    seed(pgflow_dsn, 5)
    async with make(pgflow_dsn) as wf:
        page = await wf.list(limit=2)
        assert page.after is not None
        with pytest.raises(ValueError, match="not a page token"):
            await wf.list(after="garbage!")
        with pytest.raises(ValueError, match="order='desc' listing, not 'asc'"):
            await wf.list(after=page.after, order="asc")
        with pytest.raises(ValueError, match="limit must be an int from 1 to 10000"):
            await wf.list(limit=0)
        with pytest.raises(ValueError, match="order must be 'asc' or 'desc'"):
            await wf.list(order="up")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="run_state: 'NOPE' is not a valid RunState"):
            await wf.list(run_state="nope")
        with pytest.raises(ValueError, match="status: 'NOPE' is not a S"):
            await wf.list(status="NOPE")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty list matches nothing"):
            await wf.list(foreign_id=[])


def test_sync_twin(pgflow_dsn: str) -> None:
    seed(pgflow_dsn, 7)
    with pgflow.sync.connect(make(pgflow_dsn)) as wf:
        page = wf.list(limit=3, run_state=RunState.CANCELLED, order="asc")
        more = wf.list(limit=3, run_state=RunState.CANCELLED, order="asc", after=page.after)
        got = [r.object["i"] for r in itertools.chain(page, more)]
        assert got == [1, 2, 4, 7]


async def test_list_records_needs_only_a_connection_and_a_name(pgflow_dsn: str) -> None:
    seed(pgflow_dsn, 4)
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
        page = await list_records(conn, "lst", status="DONE", limit=10)
        assert [r.object["i"] for r in page] == [3] and page.after is None
        assert len(await list_records(conn, "other")) == 5


def test_queries_are_index_ordered(pgflow_dsn: str) -> None:
    """Each documented single-value filter reads one index range in order (no Sort):
    what keeps a page cheap on 1,000,000 records (bench/list.py measures it)."""
    seed(pgflow_dsn, 30)
    with psycopg.connect(pgflow_dsn) as conn:
        conn.execute("SET enable_seqscan = off")  # a 50-row table: ask what it *can* do
        conn.execute("ANALYZE pgflow.records")
        for where in (
            "",
            "AND status = 'DONE'",
            "AND run_state = 'PAUSED'",
            "AND foreign_id = 'f1'",
        ):
            plan = "\n".join(
                r[0]
                for r in conn.execute(
                    "EXPLAIN SELECT * FROM pgflow.records WHERE workflow = 'lst' "
                    + where
                    + " AND (created_at, run_id) < (now(), gen_random_uuid())"
                    " ORDER BY created_at DESC, run_id DESC LIMIT 51"
                ).fetchall()
            )
            assert "Sort" not in plan or "foreign_id" in where, plan
            assert "Index" in plan, plan
