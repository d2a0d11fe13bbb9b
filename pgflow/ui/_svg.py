"""Server-side SVG drawings: a workflow's graph and lag sparklines.

The console must work offline and under a CSP that forbids inline script, so nothing
is drawn in the browser (no mermaid, no chart library): the server emits plain SVG,
styled by classes from the console's stylesheet.

The graph layout is deliberately simple — statuses in columns by their distance from
the start status (breadth-first), in enum order within a column; forward edges are
straight, edges going back or within a column arc below. Workflow graphs are small
(tens of statuses), for which this reads well.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from markupsafe import Markup, escape

from pgflow.workflow.graph import Graph

__all__ = ["graph_svg", "sparkline"]

_W, _H, _DX, _DY, _PAD = 168, 48, 236, 76, 24


def _layers(graph: Graph[Any]) -> dict[Any, int]:
    order = {s: i for i, s in enumerate(graph.used_statuses())}
    dist: dict[Any, int] = {graph.start: 0}
    todo = deque([graph.start])
    while todo:
        cur = todo.popleft()
        for dest in sorted(graph.destinations(cur), key=lambda s: order.get(s, 0)):
            if dest not in dist:
                dist[dest] = dist[cur] + 1
                todo.append(dest)
    last = max(dist.values(), default=0) + 1
    for status in graph.used_statuses():
        dist.setdefault(status, last)
    return dist


def graph_svg(
    graph: Graph[Any], counts: Mapping[str, str] | None = None, link: str | None = None
) -> Markup:
    """The graph as an ``<svg>``; ``counts`` maps a status name to the text shown under
    it (runs there now); ``link`` is a URL template with ``{status}`` for each node."""
    counts = counts or {}
    layer = _layers(graph)
    columns: dict[int, list[Any]] = {}
    for status in graph.used_statuses():
        columns.setdefault(layer[status], []).append(status)
    pos: dict[Any, tuple[int, int]] = {}
    for col, members in columns.items():
        for row, status in enumerate(members):
            pos[status] = (_PAD + col * _DX, _PAD + row * _DY)
    width = _PAD * 2 + (max(columns, default=0)) * _DX + _W
    back = any(pos[dest][0] <= pos[src][0] for src, dest, _ in graph.edges())
    rows = max((len(m) for m in columns.values()), default=1)
    height = _PAD * 2 + (rows - 1) * _DY + _H + (60 if back else 0)

    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="graph of workflow {escape(graph.workflow)}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'class="arrowhead"/></marker></defs>',
    ]
    for src, dest, label in graph.edges():
        (x1, y1), (x2, y2) = pos[src], pos[dest]
        if x2 > x1:
            sx, sy, ex, ey = x1 + _W, y1 + _H // 2, x2, y2 + _H // 2
            d = f"M{sx},{sy} C{sx + 60},{sy} {ex - 60},{ey} {ex},{ey}"
            lx, ly = (sx + ex) // 2, (sy + ey) // 2 - 6
        else:  # back edge or same column: arc below both boxes
            sx, sy, ex, ey = x1 + _W // 2, y1 + _H, x2 + _W // 2, y2 + _H
            drop = max(sy, ey) + 40
            d = f"M{sx},{sy} C{sx},{drop} {ex},{drop} {ex},{ey}"
            lx, ly = (sx + ex) // 2, drop - 4
        out.append(
            f'<path class="edge" d="{d}" marker-end="url(#arrow)"><title>'
            f"{escape(src.name)} → {escape(dest.name)}: {escape(label)}</title></path>"
        )
        out.append(
            f'<text class="edge-label" x="{lx}" y="{ly}" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
    for status, (x, y) in pos.items():
        kind = "terminal" if graph.is_terminal(status) else "node"
        if status == graph.start:
            kind += " start"
        count = counts.get(status.name, "")
        box = (
            f'<g class="{kind}" data-status="{escape(status.name)}">'
            f'<rect x="{x}" y="{y}" width="{_W}" height="{_H}" rx="8"/>'
            f'<text x="{x + _W // 2}" y="{y + 20}" text-anchor="middle" class="name">'
            f"{escape(status.name)}</text>"
            f'<text x="{x + _W // 2}" y="{y + 38}" text-anchor="middle" class="count">'
            f"{escape(count)}</text></g>"
        )
        if link:
            href = escape(link.replace("{status}", quote(status.name, safe="")))
            box = f'<a href="{href}">{box}</a>'
        out.append(box)
    out.append("</svg>")
    return Markup("".join(out))


def sparkline(values: Sequence[float], width: int = 180, height: int = 36) -> Markup:
    """A tiny line chart of ``values`` (oldest first), scaled to its own maximum."""
    if not values:
        return Markup(f'<svg class="spark" width="{width}" height="{height}"></svg>')
    if len(values) == 1:  # one sample so far: a flat line at its level
        values = [values[0], values[0]]
    top = max(max(values), 1e-9)
    step = width / max(len(values) - 1, 1)
    pts = " ".join(
        f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values)
    )
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="spark" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}"><polyline points="{pts}"/>'
        f"<title>max {top:g}, now {values[-1]:g}</title></svg>"
    )
