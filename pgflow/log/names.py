"""Consumer names of workflow connectors: one type that writes them and reads them back.

A workflow's connector with ``parallel_count=N`` runs N consumers named
``"<workflow>--<connector>-<i>-of-<N>"`` (``i`` counted from 1). The name is what a
source keys its position on — a table connector's ``pgflow.cursors`` row, a Redis
consumer group, a NATS durable, a Kafka group, a RabbitMQ queue — so it lives here, in
the log layer that keys cursors by it, and everything that writes one
(:mod:`pgflow.workflow`) or reads one back (the table connector inheriting another
shard layout's position, ``pgflow dead-letters replay``) goes through
:class:`ConsumerName`. Written in three places and parsed with regexes in two others,
a change of format would have silently orphaned every stored position.

The name is scoped to the workflow, so two workflows that each have a connector
called ``payments`` on one source keep separate positions. ``--`` separates workflow
and connector; neither name is restricted here (a workflow name may itself contain
``--``), so :meth:`ConsumerName.parse` takes the workflow name when the caller knows
it and otherwise splits at the first ``--``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ConsumerName", "split_shard"]

#: a name ending in ``-<i>-of-<N>``: the longest rest wins, so a connector named
#: ``x-1-of-2`` keeps its own suffix; ASCII digits without leading zeros (``int`` would
#: also take ``+1``, ``01`` or ``٣``, and the name would not read back as written)
_SHARDED = re.compile(r"(.+)-([1-9][0-9]*)-of-([1-9][0-9]*)", re.DOTALL)
_SEP = "--"


def split_shard(text: str) -> tuple[str, int, int] | None:
    """``text`` without its shard suffix, the shard (0-based) and the shard count — or
    None when ``text`` does not end in ``-<i>-of-<N>`` with ``1 <= i <= N`` after a
    non-empty rest. Works on anything that ends like a consumer name (a cursor key
    with a prefix, a dead letter's consumer), which is why it is not only
    :meth:`ConsumerName.parse`."""
    match = _SHARDED.fullmatch(text)
    if match is None:
        return None
    shard, count = int(match[2]), int(match[3])
    if shard > count:
        return None
    return match[1], shard - 1, count


@dataclass(frozen=True, slots=True)
class ConsumerName:
    """Shard ``shard`` (0-based) of ``count`` of connector ``connector`` of ``workflow``.

    ``str(name)`` is the stored form; :meth:`parse` reads it back;
    :attr:`group` is the name without the shard (what dead letters are keyed by: an
    event id names one event whichever shard handled it).
    """

    workflow: str
    connector: str
    shard: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        for what, value in (("workflow", self.workflow), ("connector", self.connector)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"consumer name: {what} name must be a non-empty string")
            if "\x00" in value:
                raise ValueError(f"consumer name: {what} name {value!r} contains NUL")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"consumer name: shard count must be >= 1, got {self.count!r}")
        if isinstance(self.shard, bool) or not isinstance(self.shard, int):
            raise ValueError(f"consumer name: shard must be an int, got {self.shard!r}")
        if not 0 <= self.shard < self.count:
            raise ValueError(
                f"consumer name: shard {self.shard} is not in 0..{self.count - 1} (of {self.count})"
            )

    @property
    def group(self) -> str:
        """``"<workflow>--<connector>"``: every shard's name without its suffix."""
        return f"{self.workflow}{_SEP}{self.connector}"

    def __str__(self) -> str:
        return f"{self.group}-{self.shard + 1}-of-{self.count}"

    @classmethod
    def parse(cls, text: str, *, workflow: str | None = None) -> ConsumerName:
        """Read back ``str(name)``. With ``workflow`` the name must belong to it (this
        stays right when the workflow name contains ``--``); without, the workflow is
        what precedes the first ``--``. Raises ValueError, saying why, on anything
        else."""
        if not isinstance(text, str):
            raise ValueError(f"consumer name must be a string, got {type(text).__name__}")
        split = split_shard(text)
        if split is None:
            raise ValueError(f"consumer name {text!r} does not end in -<i>-of-<N> (1 <= i <= N)")
        group, shard, count = split
        if workflow is not None:
            prefix = workflow + _SEP
            if not group.startswith(prefix):
                raise ValueError(
                    f"consumer name {text!r} is not one of workflow {workflow!r}'s"
                    f" (it does not start with {prefix!r})"
                )
            connector = group[len(prefix) :]
        else:
            workflow, sep, connector = group.partition(_SEP)
            if not sep:
                raise ValueError(
                    f"consumer name {text!r} has no {_SEP!r} between workflow and connector"
                )
        return cls(workflow, connector, shard, count)
