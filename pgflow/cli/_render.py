"""Rendering query results for a terminal: aligned tables, records, JSON and CSV.

Tables are for people: values are shortened (long text and JSON cut with ``…``,
intervals as ``2m 05s``, booleans as yes/no, numbers right-aligned). JSON and CSV are
for programs: full values, timestamps in ISO 8601, intervals in seconds.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from pgflow.errors import ConfigError
from pgflow.ops._format import format_interval

__all__ = [
    "FORMATS",
    "add_format_arguments",
    "format_interval",
    "render",
    "render_csv",
    "render_json",
    "render_limited",
    "render_record",
    "render_table",
    "selected_format",
]

FORMATS = ("table", "json", "csv")
DEFAULT_MAX_WIDTH = 60


def add_format_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json`` / ``--csv`` (default: an aligned table)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--json", dest="format", action="store_const", const="json", help="print JSON"
    )
    group.add_argument("--csv", dest="format", action="store_const", const="csv", help="print CSV")
    parser.set_defaults(format="table")


def selected_format(args: argparse.Namespace) -> str:
    return str(getattr(args, "format", None) or "table")


# ------------------------------------------------------------------ cell values
def _format_datetime(value: datetime) -> str:
    spec = "seconds" if value.microsecond == 0 else "milliseconds"
    return value.isoformat(sep=" ", timespec=spec)


def _cell(value: Any, max_width: int) -> str:
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, datetime):
        text = _format_datetime(value)
    elif isinstance(value, timedelta):
        text = format_interval(value)
    elif isinstance(value, float):
        text = "" if math.isnan(value) else f"{value:.3f}".rstrip("0").rstrip(".")
    elif isinstance(value, dict | list):
        text = json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False)
    else:
        text = str(value)
    text = " ".join(text.split()) if ("\n" in text or "\t" in text) else text
    if max_width and len(text) > max_width:
        text = text[: max_width - 1] + "…"
    return text


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


# --------------------------------------------------------------------- renderers
def render_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    max_width: int = DEFAULT_MAX_WIDTH,
    footer: bool = True,
    truncated: bool = False,
) -> str:
    """An aligned text table with a header rule; numbers are right-aligned."""
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    right = [
        bool(rows) and all(_numeric(r[i]) or r[i] is None for r in rows)
        for i in range(len(columns))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if right[i] else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    if footer:
        n = len(rows)
        more = " (more rows exist: raise --limit)" if truncated else ""
        out.append(f"({n} row{'s' if n != 1 else ''}){more}")
    return "\n".join(out)


def render_record(
    pairs: Sequence[tuple[str, Any]], *, max_width: int = 100, title: str | None = None
) -> str:
    """One record as aligned ``key  value`` lines (psql's expanded display)."""
    width = max((len(k) for k, _ in pairs), default=0)
    out = [title] if title else []
    out += [f"{k.ljust(width)}  {_cell(v, max_width)}".rstrip() for k, v in pairs]
    return "\n".join(out)


def _plain(value: Any) -> Any:
    """A JSON-serialisable form: ISO timestamps, seconds for intervals, str for UUIDs."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    return str(value)


def render_json(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A JSON array of objects, one per row (full values)."""
    data = [{c: _plain(v) for c, v in zip(columns, row, strict=True)} for row in rows]
    return json.dumps(data, indent=2, ensure_ascii=False)


def render_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """RFC 4180 CSV with a header row; JSON values as compact JSON text."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        out = []
        for value in row:
            plain = _plain(value)
            if plain is None:
                out.append("")
            elif isinstance(plain, dict | list):
                out.append(json.dumps(plain, separators=(",", ":"), ensure_ascii=False))
            elif isinstance(plain, bool):
                out.append("true" if plain else "false")
            else:
                out.append(str(plain))
        writer.writerow(out)
    return buf.getvalue().rstrip("\n")


def render(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    fmt: str = "table",
    *,
    max_width: int = DEFAULT_MAX_WIDTH,
    truncated: bool = False,
) -> str:
    """Render rows as ``table`` (default), ``json`` or ``csv``."""
    if fmt == "json":
        return render_json(columns, rows)
    if fmt == "csv":
        return render_csv(columns, rows)
    if fmt != "table":
        raise ConfigError(f"unknown format {fmt!r} (use one of {', '.join(FORMATS)})")
    return render_table(columns, rows, max_width=max_width, truncated=truncated)


def _with_short_ids(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str
) -> Sequence[Sequence[Any]]:
    """Tables show run ids as 8-character prefixes (enough for --run-id); JSON/CSV full."""
    if fmt != "table" or "run_id" not in columns:
        return rows
    i = list(columns).index("run_id")
    return [(*r[:i], "" if r[i] is None else str(r[i])[:8], *r[i + 1 :]) for r in rows]


def render_limited(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str, limit: int
) -> str:
    """Rows a query fetched with ``LIMIT limit + 1``: the first ``limit`` rendered, and
    the table's footer says more exist when the extra row came back."""
    shown = _with_short_ids(columns, rows[:limit], fmt)
    return render(columns, shown, fmt, truncated=len(rows) > limit)
