"""Two tiny workflows for `pgflow worker a b` (one process, several workflows)."""

from __future__ import annotations

import enum
from typing import Any

import pgflow


class S(enum.IntEnum):
    NEW = 1
    DONE = 2


def _make(name: str) -> pgflow.Builder[dict[str, Any], S]:
    b = pgflow.Builder(name, dict, S, polling_frequency=0.05)
    b.add_step(S.NEW, lambda run: S.DONE, S.DONE)
    return b


billing = _make("billing")
shipping = _make("shipping")
