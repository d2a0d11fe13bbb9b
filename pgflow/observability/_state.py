"""The one place that holds observability's mutable state.

Every other module of the package reads and writes it through the :data:`state` object
(``state.tracer``, ``state.resolved``, ...). Never ``from ._state import`` one of its
fields: that would copy a value that :func:`~pgflow.observability.configure` or
:func:`~pgflow.observability.reset` replaces later.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.trace import Tracer

#: One logger for the whole package (operators filter on this name).
logger = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "pgflow"
DEFAULT_SERVICE_NAME = "pgflow"
MESSAGING_SYSTEM = "pgflow"


class State:
    """Whether telemetry is on, and the providers pgflow owns.

    The hooks' hot path reads :attr:`tracer` and, until the first resolution,
    :attr:`resolved` — two attribute reads on a slotted object.
    """

    __slots__ = ("lock", "owned", "resolved", "retired", "tracer")

    def __init__(self) -> None:
        #: pgflow's tracer, or None while tracing is off.
        self.tracer: Tracer | None = None
        #: Whether the configuration was decided (explicitly or on first use).
        self.resolved = False
        #: Serialises resolution, configure, reset and disable.
        self.lock = threading.Lock()
        #: Providers pgflow created from OTEL_* (flushed/shut down by ``reset``).
        self.owned: list[Any] = []
        #: Providers pgflow shut down: they may still be the process-global provider (it
        #: can be set only once) but must not be picked up again as "the application's".
        self.retired: list[Any] = []


state = State()


def ensure_resolved() -> None:
    """Decide once, on first use of any hook, whether tracing/metrics are on.

    The hooks call this only on their slow path (``not state.resolved``).
    """
    # Deferred: _config installs the resolved providers into the hooks' modules, which
    # import this one, so a top-level import would be circular.
    from pgflow.observability._config import resolve_once

    resolve_once()
