"""A workflow's graph: which consumer moves a run from which status to which.

Built and validated by :class:`pgflow.Builder`; read by the engine (what to consume,
which moves are allowed, which statuses are terminal) and by ``pgflow graph``
(:meth:`Graph.mermaid`). A status is *terminal* when no step, callback or timeout
leaves it: reaching one completes the run.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pgflow.workflow._options import Options

__all__ = ["CallbackSpec", "ConnectorSpec", "Graph", "StepSpec", "TimeoutSpec"]

S = TypeVar("S", bound=enum.Enum)

#: mermaid diagram directions: top-bottom, bottom-top, left-right, right-left
DIRECTIONS = ("TB", "BT", "LR", "RL")


def _fn_name(fn: Any) -> str:
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


@dataclass(frozen=True, slots=True)
class StepSpec(Generic[S]):
    status: S
    fn: Callable[..., Any]
    to: tuple[S, ...]
    options: Options

    @property
    def name(self) -> str:
        return _fn_name(self.fn)


@dataclass(frozen=True, slots=True)
class CallbackSpec(Generic[S]):
    status: S
    fn: Callable[..., Any]
    to: tuple[S, ...]

    @property
    def name(self) -> str:
        return _fn_name(self.fn)


@dataclass(frozen=True, slots=True)
class TimeoutSpec(Generic[S]):
    status: S
    timer: Callable[..., Any]
    expire: Callable[..., Any]
    to: tuple[S, ...]
    options: Options
    #: position among the timeouts of ``status`` (``pgflow.timeouts.timer``): a status
    #: may have several (luno), each armed and fired on its own
    index: int = 0

    @property
    def name(self) -> str:
        return _fn_name(self.expire)


@dataclass(frozen=True, slots=True)
class ConnectorSpec:
    name: str
    connector: Any
    fn: Callable[..., Any]
    options: Options


@dataclass(slots=True)
class Graph(Generic[S]):
    """The validated graph of one workflow."""

    workflow: str
    statuses: type[S]
    start: S
    steps: dict[S, StepSpec[S]] = field(default_factory=dict)
    callbacks: dict[S, list[CallbackSpec[S]]] = field(default_factory=dict)
    timeouts: dict[S, list[TimeoutSpec[S]]] = field(default_factory=dict)
    connectors: dict[str, ConnectorSpec] = field(default_factory=dict)

    def destinations(self, status: S) -> set[S]:
        """Every status a run in ``status`` may move to (steps, callbacks, timeouts)."""
        out: set[S] = set()
        if status in self.steps:
            out.update(self.steps[status].to)
        for cb in self.callbacks.get(status, ()):
            out.update(cb.to)
        for spec in self.timeouts.get(status, ()):
            out.update(spec.to)
        return out

    def is_terminal(self, status: S) -> bool:
        return not (status in self.steps or status in self.callbacks or status in self.timeouts)

    def used_statuses(self) -> list[S]:
        """Statuses that appear in the graph, in enum order."""
        used = {self.start}
        for status in self.steps:
            used.add(status)
            used.update(self.steps[status].to)
        for status, cbs in self.callbacks.items():
            used.add(status)
            for cb in cbs:
                used.update(cb.to)
        for status, specs in self.timeouts.items():
            used.add(status)
            for spec in specs:
                used.update(spec.to)
        return [s for s in self.statuses if s in used]

    def edges(self) -> Iterator[tuple[S, S, str]]:
        """``(from, to, label)`` for every declared move."""
        for status, step in self.steps.items():
            for dest in step.to:
                yield status, dest, step.name
        for status, cbs in self.callbacks.items():
            for cb in cbs:
                for dest in cb.to:
                    yield status, dest, f"callback {cb.name}"
        for status, specs in self.timeouts.items():
            for spec in specs:
                for dest in spec.to:
                    yield status, dest, f"timeout {spec.name}"

    def mermaid(self, direction: str | None = None) -> str:
        """The graph as a mermaid ``stateDiagram-v2`` (paste into any mermaid viewer).

        ``direction``: ``"TB"`` (top to bottom, mermaid's default), ``"BT"``, ``"LR"``
        or ``"RL"`` (luno ``CreateDiagram``'s direction)."""
        lines = ["stateDiagram-v2"]
        if direction is not None:
            if direction.upper() not in DIRECTIONS:
                raise ValueError(
                    f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}"
                )
            lines.append(f"    direction {direction.upper()}")
        lines.append(f"    %% workflow {self.workflow}")
        lines.append(f"    [*] --> {self.start.name}")
        for src, dest, label in self.edges():
            lines.append(f"    {src.name} --> {dest.name}: {label}")
        for status in self.used_statuses():
            if self.is_terminal(status):
                lines.append(f"    {status.name} --> [*]")
        for name in self.connectors:
            lines.append(f"    %% connector {name}")
        return "\n".join(lines) + "\n"
