"""Where a reader stands, and the one read every reader uses: snapshot batches.

This module owns the visibility predicate. Every ordered reader of a table whose rows
carry their writer's transaction id (``pgflow.events``, ``pgflow.changes``, app tables
with a ``tx xid8`` column) reads through :func:`diff_read_sql`.

Why snapshots (and not the xid horizon)
---------------------------------------
Ids are drawn at INSERT and become visible at COMMIT, in any order, so "id > last"
skips late commits. pgflow 0.1 read only below the *xid horizon*
(``tx < pg_snapshot_xmin(pg_current_snapshot())``): gap-free, but ONE transaction left
open anywhere in the cluster (another database, an idle-in-transaction session, a
forgotten prepared transaction) stopped every reader until it ended.

A reader's position is now a **snapshot** ``S1`` (``pg_snapshot``): everything visible
in ``S1`` has been consumed. The next batch is the *diff* to a newer snapshot ``S2``:
the rows whose transaction is visible in ``S2`` and not in ``S1`` (PgQ's batches,
without PgQ's ticker). A committed transaction is in the very next diff, whatever else
is still running; an open transaction only delays its own rows, which fall into a later
diff when it commits. Every committed row is in exactly one diff of a chain of
snapshots, so nothing is skipped or read twice.

The diff is read as two index walks, never a scan from ``S1``'s xmin (an hour-old open
transaction must not make each batch re-read an hour of rows):

* **A** — transactions in progress at ``S1`` (``pg_snapshot_xip(S1)``) and committed by
  ``S2``: one ``(…, tx, id)`` index probe per such transaction;
* **B** — transactions from ``xmax(S1)`` to ``xmax(S2)`` visible in ``S2``: a walk of an
  ``(…, id)`` index between ``lo`` and ``hi``, the smallest and largest id of B, found
  once per diff by one ``(…, tx, id)`` range scan.

Order: within a diff, rows come out in **id order** (A and B merged). Writers that are
serialised by a lock (two transactions moving one record) insert in commit order, so
their rows come out in commit order even when the later committer took its transaction
id first; ``(tx, id)`` order would invert them. Across diffs: commit order.

Positions inside a diff
-----------------------
A diff larger than a batch is read in chunks in id order: the position is then
``(S1, upto=S2, after_id, lo, hi)`` — the diff being read, the last id taken from it,
and B's bounds. When the diff is exhausted the position becomes ``(S2)``. A backlog of
a million rows is one diff read chunk by chunk: each chunk is a bounded index walk
(plus one range scan per diff for the bounds), never a sort of the backlog.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONSUMED",
    "CURSOR_ROW",
    "START_SNAPSHOT",
    "DiffRead",
    "Position",
    "PositionSQL",
    "consumed_sql",
    "diff_read_sql",
    "intersect_snapshots",
]

#: A snapshot in which no transaction is visible: the start of every log.
START_SNAPSHOT = "1:1:"


@dataclass(frozen=True, slots=True)
class Position:
    """A reader's place: everything visible in ``snapshot`` is consumed, and, while a
    diff is read in chunks (``upto`` set), the rows of ``diff(snapshot, upto)`` up to
    id ``after_id``. ``lo``/``hi`` bound the ids of the diff's new transactions.

    Positions are compared for equality only (compare-and-set); snapshots are
    partially ordered, so there is no ``<``.
    """

    snapshot: str = START_SNAPSHOT
    upto: str | None = None
    after_id: int = 0
    lo: int | None = None
    hi: int | None = None

    @classmethod
    def start(cls) -> Position:
        return cls()

    @property
    def in_diff(self) -> bool:
        return self.upto is not None

    def could_follow(self, old: Position) -> bool:
        """False when moving ``old -> self`` is certainly not forwards: the same place,
        back inside one diff, or back into the diff that ends where ``old`` starts.
        (Snapshots are partially ordered, so this cannot catch every backward move; the
        compare-and-set on the stored position is what makes cursors safe.)"""
        if self == old or self.upto == old.snapshot:
            return False
        return not (
            self.snapshot == old.snapshot
            and self.upto == old.upto
            and self.after_id <= old.after_id
        )

    def params(self, prefix: str = "__") -> dict[str, Any]:
        """The position as the named parameters of :func:`diff_read_sql`."""
        return {
            f"{prefix}s1": self.snapshot,
            f"{prefix}upto": self.upto,
            f"{prefix}after": self.after_id,
            f"{prefix}lo": self.lo,
            f"{prefix}hi": self.hi,
        }


@dataclass(frozen=True, slots=True)
class PositionSQL:
    """SQL expressions for the five parts of a position: parameters by default, or
    columns of an outer query (a consumer reads its cursor row and the batch in one
    statement)."""

    s1: str = "%(__s1)s::pg_snapshot"
    upto: str = "%(__upto)s::pg_snapshot"
    after: str = "%(__after)s::bigint"
    lo: str = "%(__lo)s::bigint"
    hi: str = "%(__hi)s::bigint"


def intersect_snapshots(snapshots: Sequence[str]) -> str:
    """The snapshot in which a transaction is visible only if it is visible in every
    one of ``snapshots`` (the start of the log when there are none): xmin and xmax the
    smallest, in progress whatever any of them had in progress below that xmax."""
    if not snapshots:
        return START_SNAPSHOT
    parsed = [_parse_snapshot(s) for s in snapshots]
    xmax = min(p[1] for p in parsed)
    xip = sorted({x for p in parsed for x in p[2] if x < xmax})
    xmin = min([*xip, xmax])  # everything below it is visible in every one of them
    return f"{xmin}:{xmax}:{','.join(map(str, xip))}"


def _parse_snapshot(text: str) -> tuple[int, int, list[int]]:
    xmin, xmax, xip = text.split(":")
    return int(xmin), int(xmax), [int(x) for x in xip.split(",") if x]


def consumed_sql(row: str = "e", cursor: str = "c") -> str:
    """Has the cursor row aliased ``cursor`` read the log row aliased ``row``? Visible
    in its snapshot, or taken from the diff it is reading. SQL, for prune, lag, repairs
    and tests; the predicate itself is the function ``pgflow.consumed`` (migration
    0013), written once for Python and the ``pgflow.consumer_lag`` view alike, and
    inlined by the planner (plans are as with the expression written in place)."""
    r, c = row, cursor
    return f"pgflow.consumed({r}.tx, {r}.id, {c}.snap, {c}.upto, {c}.after_id)"


#: :func:`consumed_sql` for a log row ``e`` and a cursor row ``c``.
CONSUMED = consumed_sql()

#: The position stored in a ``pgflow.cursors`` row aliased ``c``.
CURSOR_ROW = PositionSQL("c.snap", "c.upto", "c.after_id", "c.lo", "c.hi")


def diff_read_sql(
    *,
    relation: str,
    columns: str,
    where: Sequence[str] = (),
    tx: str = "tx",
    id: str = "id",
    fan_out: str | None = None,
    position: PositionSQL = PositionSQL(),
    limit: str = "%(__limit)s",
    keep_empty: bool = False,
    walk_prefix: Sequence[tuple[str, str]] = (),
) -> str:
    """The next chunk of the diff at ``position``, in id order, as one statement.

    ``relation`` is read as alias ``e`` (a table name, or a parenthesised subquery);
    ``columns`` is the select list over ``e``; ``where`` are the filter predicates over
    ``e``; ``tx``/``id`` name the transaction-id and id columns. ``fan_out``, when
    given, is a FROM item (e.g. ``unnest(%(types)s::text[]) AS t(type)``) that each
    index walk is repeated for (the predicates may refer to it): one ordered walk per
    type, merged, instead of a ``type = ANY(…)`` that cannot return id order.

    Output columns: ``s2`` (the diff's upper snapshot, as text), ``lo``, ``hi``,
    ``__id`` (the row's id) and then ``columns``. The caller fetches ``limit`` =
    batch size + 1 rows to learn whether the diff has more (see :class:`DiffRead`).
    When the position is not inside a diff, ``S2`` is this statement's own snapshot
    and B's bounds are computed here; no row means nothing new (and nothing is
    written: the stored position stays valid). ``keep_empty`` returns one row with
    ``__id`` NULL instead of none, so the caller learns ``S2`` even then: an idle
    reader may move to it (nothing of its filter committed before it).

    ``walk_prefix`` names the equality-filtered leading columns of the index part B
    walks (e.g. ``[("stream", "%(stream)s"), ("type", "%(type)s")]`` for
    ``(stream, type, id)``): the id bounds are then written as row comparisons over
    them, which only that index can serve. A plain ``id`` range lets the planner pick
    the primary key and filter every other stream's rows out (1,046 rows read for
    101 kept on a 3-type, 4-shard stream, measured).
    """
    filters = " AND ".join(["true", *where])
    # Part B states the prefix equalities only inside its row comparisons: given
    # "stream = x" as well, btree starts at the first (x, …) entry and checks the row
    # comparison on every entry from there (10 ms per chunk late in a 500k backlog,
    # growing with progress, measured), instead of starting at (x, lo).
    prefixed = {f"e.{c} = {v}" for c, v in walk_prefix}
    b_filters = " AND ".join(["true", *(w for w in where if w not in prefixed)])
    p = position

    def walk(extra: str, order_limit: str, filters: str = filters) -> str:
        inner = (
            f"SELECT e.{id} AS __id, {columns} FROM {relation} e"
            f" WHERE {filters} AND {extra} {order_limit}"
        )
        if fan_out is None:
            return inner
        return f"SELECT x.* FROM {fan_out} CROSS JOIN LATERAL ({inner}) AS x"

    # OFFSET 0 keeps the planner from turning min()/max() into walks of the id index
    # from either end (filtering the whole log); the range scan of (…, tx, id) is what
    # reads only the diff's new transactions.
    bounds_inner = (
        f"SELECT min(r.i) AS lo, max(r.i) AS hi FROM (SELECT e.{id} AS i FROM {relation} e"
        f" WHERE {filters} AND {p.upto} IS NULL"
        f" AND e.{tx} >= pg_snapshot_xmax({p.s1}) AND e.{tx} < pg_snapshot_xmax(s.s2)"
        f" AND pg_visible_in_snapshot(e.{tx}, s.s2) OFFSET 0) AS r"
    )
    if fan_out is not None:
        bounds_inner = (
            f"SELECT min(y.lo) AS lo, max(y.hi) AS hi FROM {fan_out}"
            f" CROSS JOIN LATERAL ({bounds_inner}) AS y"
        )
    part_a = (
        f"SELECT a.* FROM pg_snapshot_xip({p.s1}) AS xa(tx)"
        f" CROSS JOIN LATERAL ("
        + walk(f"e.{tx} = xa.tx AND e.{id} > {p.after}", f"ORDER BY e.{id} LIMIT {limit}")
        + ") AS a WHERE pg_visible_in_snapshot(xa.tx, b.s2)"
    )
    # The tx tests are written as function calls (xid8ge/xid8lt), not operators, so the
    # planner cannot use them as index conditions: it must walk the (…, id) index in id
    # order between lo and hi and stop at the limit. Given a tx range it walked a tx
    # index instead and sorted the whole remaining diff for every chunk (50 ms per
    # 500-event chunk of a 100k backlog, measured; 1 ms walking ids).
    cols = ", ".join([f"e.{c}" for c, _ in walk_prefix] + [f"e.{id}"])
    vals = ", ".join(v for _, v in walk_prefix)
    vals = vals + ", " if vals else ""
    part_b = walk(
        f"({cols}) > ({vals}greatest({p.after}, b.lo - 1))"
        f" AND ({cols}) <= ({vals}b.hi)"
        f" AND xid8ge(e.{tx}, pg_snapshot_xmax({p.s1}))"
        f" AND xid8lt(e.{tx}, pg_snapshot_xmax(b.s2))"
        f" AND pg_visible_in_snapshot(e.{tx}, b.s2)",
        # The whole index order, so no sort is planned: between the two row bounds the
        # prefix is constant, so this is id order.
        f"ORDER BY {cols} LIMIT {limit}",
        b_filters,
    )
    return (
        "SELECT b.s2::text AS s2, b.lo, b.hi, d.* FROM ("
        f"SELECT s.s2, CASE WHEN {p.upto} IS NULL THEN bb.lo ELSE {p.lo} END AS lo,"
        f" CASE WHEN {p.upto} IS NULL THEN bb.hi ELSE {p.hi} END AS hi"
        f" FROM (SELECT coalesce({p.upto}, pg_current_snapshot()) AS s2) AS s"
        f" CROSS JOIN LATERAL ({bounds_inner}) AS bb"
        f") AS b {'LEFT' if keep_empty else 'CROSS'} JOIN LATERAL ("
        f"SELECT * FROM (({part_a}) UNION ALL ({part_b})) AS u"
        f" ORDER BY u.__id LIMIT {limit}"
        f") AS d{' ON true' if keep_empty else ''}"
    )


@dataclass(frozen=True, slots=True)
class DiffRead:
    """The rows of one chunk, and where a reader stands after each of them.

    ``rows`` holds at most ``limit`` rows (the statement fetched one more to learn
    whether the diff goes on: ``more``). The position after the last row of an
    exhausted diff is ``(S2)``; every other position stays inside the diff. Positions
    are made on demand: a consumer needs only the last one, and building one per row
    cost a quarter of a millisecond per 500-row batch.
    """

    raw: Sequence[Sequence[Any]]  #: the statement's rows (at most ``limit``)
    start: Position
    offset: int = 0  #: where the caller's columns start in a raw row
    s2: str = START_SNAPSHOT
    lo: int | None = None
    hi: int | None = None
    more: bool = False

    @property
    def rows(self) -> list[Sequence[Any]]:
        """The rows without the leading columns (s2, lo, hi, __id and any before)."""
        return [r[self.offset :] for r in self.raw]

    @classmethod
    def from_rows(
        cls, start: Position, raw: Sequence[Sequence[Any]], limit: int, skip: int = 0
    ) -> DiffRead:
        """Split ``raw`` rows of :func:`diff_read_sql` (``skip`` leading columns of an
        outer query first) into rows and what positions need. Nothing new (no row, or
        ``keep_empty``'s one row without an id) is a read without rows whose ``s2`` is
        that row's snapshot (or ``start``'s): see :meth:`idle_position`."""
        if not raw or raw[0][skip + 3] is None:
            return cls([], start, skip + 4, str(raw[0][skip]) if raw else start.snapshot)
        more = len(raw) > limit
        raw = raw[:limit]
        first = raw[0]
        return cls(raw, start, skip + 4, str(first[skip]), first[skip + 1], first[skip + 2], more)

    def position_at(self, index: int) -> Position:
        """The position after row ``index``."""
        if index == len(self.raw) - 1 and not self.more:
            return Position(self.s2)
        row_id = int(self.raw[index][self.offset - 1])
        return Position(self.start.snapshot, self.s2, row_id, self.lo, self.hi)

    @property
    def positions(self) -> list[Position]:
        return [self.position_at(i) for i in range(len(self.raw))]

    def idle_position(self) -> Position | None:
        """For a read that found nothing outside a diff: where an idle reader may move
        (the statement's own snapshot, with ``keep_empty``: nothing of its filter
        committed before it), or None when that is where it stands."""
        if self.raw or self.start.in_diff or self.s2 == self.start.snapshot:
            return None
        return Position(self.s2)
