from __future__ import annotations

from pgflow.cursors import BatchOutcome, CursorKey, consume_once, ensure_cursor
from pgflow.events import NewEvent, append, shard_hash
from pgflow.streamer import Filter, read_batch
from pgflow.events import Position


async def test_append_read_consume(pool) -> None:
    async with pool.connection() as conn:
        ids = await append(conn, [NewEvent("s", "a", f"f{i}") for i in range(5)])
    assert len(ids) == 5
    async with pool.connection() as conn:
        batch = await read_batch(conn, Filter("s"), Position.start())
        assert [e.id for e in batch] == ids
        assert batch[0].shard_hash == shard_hash("f0")
        await ensure_cursor(conn, CursorKey("c"), Filter("s"))
    seen = []

    async def handler(events, conn):
        seen.extend(e.id for e in events)

    r = await consume_once(pool, CursorKey("c"), Filter("s"), handler, batch_size=3)
    assert r.outcome is BatchOutcome.APPLIED and r.events == 3
    r = await consume_once(pool, CursorKey("c"), Filter("s"), handler, batch_size=3)
    assert r.events == 2
    r = await consume_once(pool, CursorKey("c"), Filter("s"), handler, batch_size=3)
    assert r.outcome is BatchOutcome.EMPTY
    assert seen == ids
