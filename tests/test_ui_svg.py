"""The console's server-side drawings (no database)."""

from __future__ import annotations

import enum
import re
from typing import Any

import pgflow
from pgflow.ui._svg import graph_svg, sparkline


class S(enum.StrEnum):
    NEW = "NEW"
    CHECK = "CHECK"
    FIX = "FIX"
    DONE = "DONE"
    ORPHAN = "ORPHAN"


async def check(run: Any) -> None:
    return None


def test_graph_with_a_cycle_draws_every_status_and_edge() -> None:
    b: pgflow.Builder[Any, Any] = pgflow.Builder("repairs <&>", dict, S)
    b.add_step(S.NEW, check, S.CHECK)
    b.add_step(S.CHECK, check, S.FIX, S.DONE)
    b.add_step(S.FIX, check, S.CHECK)  # back edge: arcs below
    svg = str(graph_svg(b.graph(), {"NEW": "3 active"}, "/runs?workflow=x&status={status}"))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert sorted(re.findall(r'data-status="(\w+)"', svg)) == ["CHECK", "DONE", "FIX", "NEW"]
    assert svg.count('class="edge"') == 4
    assert "3 active" in svg and "repairs &lt;&amp;&gt;" in svg
    assert 'href="/runs?workflow=x&amp;status=FIX"' in svg


def test_sparkline_scales_to_its_maximum() -> None:
    points = re.search(r'points="([^"]+)"', str(sparkline([0, 5, 10], width=100, height=20)))
    assert points is not None
    xy = [tuple(map(float, p.split(","))) for p in points.group(1).split()]
    assert [x for x, _ in xy] == [0.0, 50.0, 100.0]
    assert xy[0][1] == 18.0 and xy[2][1] == 2.0  # 0 at the bottom, the max at the top
    assert 'points="' in str(sparkline([7]))  # one sample: a flat line, not nothing
    assert "polyline" not in str(sparkline([]))
