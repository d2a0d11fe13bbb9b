"""Shared helpers for the benchmark scripts in ``bench/``.

Small on purpose: every bench script imports it (``from _common import ...`` works when
run as ``python bench/NAME.py``; ``from bench._common import ...`` from the repo root).

* :func:`bench_args` — the common command line (``--dsn``, ``--quick``, ``--out``,
  ``--private-server``); :func:`server` — the server DSN it selects.
* :func:`scratch_database` — create a throwaway database on the server, migrated with
  the pgflow schema, and drop it afterwards (benchmarks never touch real data).
* :class:`Timer`, :func:`percentile`, :func:`summarize` — timing and latency stats.
* :func:`print_table`, :func:`write_results` — the printed table and
  ``bench/results/NAME.json`` that every performance claim must come from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_DSN",
    "RESULTS_DIR",
    "Timer",
    "bench_args",
    "fmt",
    "percentile",
    "print_table",
    "resolve_dsn",
    "scratch_database",
    "server",
    "summarize",
    "write_results",
]

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Make ``import pgflow`` work when a script is run from a checkout without installing.
_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def resolve_dsn(dsn: str | None = None) -> str:
    """``--dsn``, else ``PGFLOW_DATABASE_URL``/``DATABASE_URL``, else 127.0.0.1:5432."""
    for candidate in (dsn, os.environ.get("PGFLOW_DATABASE_URL"), os.environ.get("DATABASE_URL")):
        if candidate:
            return candidate
    return DEFAULT_DSN


def bench_args(
    description: str,
    argv: Sequence[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> argparse.Namespace:
    """Parse the common options; pass ``parser`` to add script-specific ones first.

    ``args.dsn`` is resolved (never None); ``args.quick`` shortens every phase so CI can
    smoke-test the script; ``args.out`` overrides the JSON path.
    """
    parser = parser or argparse.ArgumentParser(description=description)
    parser.add_argument("--dsn", default=None, help="server DSN (default: env or 127.0.0.1:5432)")
    parser.add_argument("--quick", action="store_true", help="short phases (CI smoke run)")
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/)")
    parser.add_argument(
        "--private-server",
        action="store_true",
        help="start a private PostgreSQL cluster for the run (fsync on) instead of --dsn, "
        "away from other clients' load on a shared server",
    )
    args = parser.parse_args(argv)
    args.dsn = resolve_dsn(args.dsn)
    return args


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[str]:
    """The server DSN to benchmark against: ``args.dsn``, or a private cluster."""
    if not getattr(args, "private_server", False):
        yield args.dsn
        return
    import shutil
    import tempfile

    from pgflow.postgres import LocalCluster

    root = Path(tempfile.mkdtemp(prefix="pgflow-bench-", dir="/tmp"))
    os.chmod(root, 0o755)
    cluster = LocalCluster(root / "data", fast_unsafe=False)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _with_dbname(dsn: str, dbname: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return make_conninfo("", **params)


@contextlib.asynccontextmanager
async def scratch_database(server_dsn: str, *, prefix: str = "pgflow_bench") -> AsyncIterator[str]:
    """A fresh database with the pgflow schema migrated; dropped on exit. Yields its DSN."""
    import psycopg
    from psycopg import sql

    from pgflow.ops.migrations import migrate

    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    async with await psycopg.AsyncConnection.connect(server_dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = _with_dbname(server_dsn, name)
    try:
        await migrate(dsn)
        yield dsn
    finally:
        async with await psycopg.AsyncConnection.connect(server_dsn, autocommit=True) as admin:
            await admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (monotonic, high resolution)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by linear interpolation; NaN when empty."""
    if not values:
        return math.nan
    data = sorted(values)
    k = (len(data) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi:
        return data[lo]
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """count, mean, p50, p90, p99, max of ``values`` (e.g. latencies in ms)."""
    return {
        "count": float(len(values)),
        "mean": sum(values) / len(values) if values else math.nan,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
    }


def fmt(value: Any) -> str:
    """Human formatting for table cells: thousands separators, 3 significant decimals."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def print_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Print ``rows`` as an aligned plain-text table (and return the text)."""
    rows = list(rows)
    if not rows:
        return ""
    cols = list(columns or rows[0].keys())
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    for row in cells:
        lines.append(
            "  ".join(
                v.rjust(w) if i else v.ljust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_results(name: str, results: Mapping[str, Any], *, path: str | Path | None = None) -> Path:
    """Write ``results`` plus run metadata to ``bench/results/NAME.json``; return the path."""
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        **results,
    }
    text = json.dumps(_clean(doc), indent=2, default=str, allow_nan=False)
    out.write_text(text + "\n")
    return out


def _clean(value: Any) -> Any:
    """NaN/inf become null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value
