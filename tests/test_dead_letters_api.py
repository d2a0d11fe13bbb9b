"""`pgflow.ops.dead_letters`: the Python API the CLI and the console share."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg import AsyncConnection

from pgflow.errors import ConfigError, InvalidTransition, NotFound
from pgflow.ops import dead_letters as dl
from tests.test_cli_tables import payments_builder


async def _seed(conn: AsyncConnection[Any]) -> list[int]:
    cur = await conn.execute(
        "INSERT INTO pgflow.dead_letters (consumer, event_id, foreign_id, type, reason)"
        " SELECT CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END, 'e-' || i, 'f-' || i, 't', 'boom'"
        " FROM generate_series(1, 7) i RETURNING id"
    )
    ids = [r[0] for r in await cur.fetchall()]
    await conn.execute("UPDATE pgflow.dead_letters SET replayed_at = now() WHERE id = %s", [ids[2]])
    return ids


async def _all_pages(conn: AsyncConnection[Any], **kwargs: Any) -> list[int]:
    seen: list[int] = []
    after = None
    while True:
        page = await dl.list_dead_letters(conn, limit=2, after=after, **kwargs)
        assert len(page.rows) <= 2
        seen += [r["id"] for r in page.rows]
        if page.next_after is None:
            return seen
        assert page.next_after == page.rows[-1]["id"]
        after = page.next_after


async def test_list_pages_by_id_both_ways_with_filters(pgflow_dsn: str) -> None:
    async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        ids = await _seed(conn)
        pending = [i for i in ids if i != ids[2]]
        assert await _all_pages(conn) == sorted(pending, reverse=True)
        assert await _all_pages(conn, newest_first=False) == sorted(pending)
        assert await _all_pages(conn, pending_only=False) == sorted(ids, reverse=True)
        only_a = await _all_pages(conn, consumer="a", pending_only=False)
        assert only_a == sorted(ids[1::2], reverse=True)
        page = await dl.list_dead_letters(conn, limit=10, pending_only=False)
        assert page.next_after is None and len(page.rows) == 7
        assert {r["state"] for r in page.rows} == {"pending", "replayed"}  # the view's columns
        row = await dl.get_dead_letter(conn, ids[0])
        assert row is not None and row["event_id"] == "e-1" and row["state"] == "pending"
        assert await dl.get_dead_letter(conn, -1) is None
        with pytest.raises(ValueError):
            await dl.list_dead_letters(conn, limit=0)


async def test_replay_once_and_only_once(pgflow_dsn: str) -> None:
    async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        ids = await _seed(conn)
        done = await dl.replay_dead_letter(conn, ids[0])
        assert "appended event" in done and "pgflow.replay" in done
        with pytest.raises(InvalidTransition, match="already replayed"):
            await dl.replay_dead_letter(conn, ids[0])
        with pytest.raises(InvalidTransition, match="already replayed"):
            await dl.replay_dead_letter(conn, ids[2])
        with pytest.raises(NotFound):
            await dl.replay_dead_letter(conn, -1)
        # not a connector's dead letter: refused before any workflow is needed
        with pytest.raises(ConfigError, match="not a connector's"):
            await dl.connector_dead_letter(conn, ids[1])


async def test_replay_through_a_built_workflow(pgflow_dsn: str) -> None:
    wf = payments_builder().build(pgflow_dsn)
    try:
        async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "INSERT INTO pgflow.dead_letters (consumer, event_id, foreign_id, type, reason)"
                " VALUES ('payments--bank-1-of-1', 'e-1', 'o-1', 'paid', 'down'),"
                " ('refunds--bank', 'e-2', 'o-2', 'paid', 'down') RETURNING id"
            )
            ours, theirs = (r[0] for r in await cur.fetchall())
            with pytest.raises(ConfigError, match="belongs to 'refunds'"):
                await dl.replay_through_connector(conn, theirs, wf)
            done = await dl.replay_through_connector(conn, ours, wf)
            assert "connector bank of payments handled event e-1" in done
            cur = await conn.execute(
                "SELECT count(*) FROM pgflow.records WHERE foreign_id = 'pay-o-1'"
            )
            assert await cur.fetchone() == (1,)
            with pytest.raises(InvalidTransition, match="already replayed"):
                await dl.replay_through_connector(conn, ours, wf)
    finally:
        await wf.close()
