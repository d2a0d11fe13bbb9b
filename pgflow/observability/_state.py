"""The one place that holds observability's mutable state.

Every other module of the package reads and writes it through the :data:`state` object
(``state.tracer``, ``state.resolved``, ...). Never ``from ._state import`` one of its
fields: that would copy a value that :func:`~pgflow.observability.configure` or
:func:`~pgflow.observability.reset` replaces later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.trace import Tracer

#: One logger for the whole package (operators filter on ``pgflow.observability``).
logger = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "pgflow"
DEFAULT_SERVICE_NAME = "pgflow"
MESSAGING_SYSTEM = "pgflow"


class State:
    """Whether telemetry is on, and the providers pgflow owns.

    The hooks' hot path reads :attr:`tracer` and, until the first resolution,
    :attr:`resolved` — two attribute reads on a slotted object.
    """

    __slots__ = ("lock", "owned", "resolved", "resolver", "retired", "tracer")

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
        #: Decides the configuration (``_config.resolve_once``, registered when _config is
        #: imported, which the package's ``__init__`` always does). Injected rather than
        #: imported: _config imports this module, and a cycle would hide which is lower.
        self.resolver: Callable[[], None] = _unregistered


def _unregistered() -> None:
    raise RuntimeError("pgflow.observability._config was not imported")


state = State()


def ensure_resolved() -> None:
    """Decide once, on first use of any hook, whether tracing/metrics are on.

    The hooks call this only on their slow path (``not state.resolved``).
    """
    state.resolver()
