"""``pgflow.Builder``: declare a workflow's steps, callbacks, timeouts and connectors.

Registration only records what was asked; :meth:`Builder.build` validates everything
at once and raises :class:`pgflow.BuildError` naming each problem (unknown statuses,
steps without or to undeclared destinations, duplicate consumers, bad options), so a
broken graph never reaches a worker.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pgflow.errors import BuildError
from pgflow.workflow._engine import Engine
from pgflow.workflow._options import Options, parse_options
from pgflow.workflow.graph import CallbackSpec, ConnectorSpec, Graph, StepSpec, TimeoutSpec
from pgflow.workflow.records import UNSET, _Unset

if TYPE_CHECKING:  # pragma: no cover
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

    from pgflow.workflow.clock import Clock
    from pgflow.workflow.workflow import Workflow

__all__ = ["Builder"]

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)
F = TypeVar("F", bound=Callable[..., Any])

Hook = Callable[..., Any]


@dataclass(slots=True)
class _Registration:
    kind: str  # "step" | "callback" | "timeout"
    status: Any
    fns: tuple[Callable[..., Any], ...]
    to: tuple[Any, ...]
    options: dict[str, Any] = field(default_factory=dict)


class Builder(Generic[T, S]):
    """Declares a workflow ``name`` whose runs carry a ``T`` and move through ``S``.

    ``status_enum`` must be an ``IntEnum`` or ``StrEnum`` (any ``Enum`` works); its
    member names are what the database stores. ``start`` is the status ``trigger``
    uses by default (else the first status a step, callback or timeout leaves).
    """

    def __init__(
        self,
        name: str,
        type: Any,
        status_enum: type[S],
        *,
        start: S | None = None,
        custom_delete: Callable[[T], T | None] | None = None,
        **defaults: Any,
    ) -> None:
        self.name = name
        #: luno ``WithCustomDelete``: ``fn(object) -> object`` (or None after changing
        #: it in place) decides what ``delete_data`` keeps: erase the personal fields,
        #: keep the rest. Without it the object is erased whole (NULL).
        self.custom_delete = custom_delete
        self.type = type
        self.status_enum = status_enum
        self.start = start
        self.defaults = defaults
        self._regs: list[_Registration] = []
        self._connectors: list[tuple[str, Any, Callable[..., Any], dict[str, Any]]] = []
        self._on_complete: list[Hook] = []
        self._on_pause: list[Hook] = []
        self._on_cancel: list[Hook] = []
        #: hooks that run inside the change's transaction (``in_transaction=True``)
        self._in_tx: dict[str, list[Hook]] = {"complete": [], "pause": [], "cancel": []}

    # -- declaring -------------------------------------------------------------------

    def step(self, from_: S, to: Iterable[S] = (), **options: Any) -> Callable[[F], F]:
        """Decorator form of :meth:`add_step`: ``@b.step(S.A, to=[S.B])``."""

        def register(fn: F) -> F:
            self.add_step(from_, fn, *to, **options)
            return fn

        return register

    def add_step(self, from_: S, fn: Callable[..., Any], *to: S, **options: Any) -> Builder[T, S]:
        """Run ``fn(run) -> S | None`` for every run that reaches ``from_``."""
        self._regs.append(_Registration("step", from_, (fn,), tuple(to), dict(options)))
        return self

    def add_callback(self, status: S, fn: Callable[..., Any], *to: S) -> Builder[T, S]:
        """``wf.callback(foreign_id, status, payload)`` calls ``fn(run, payload) -> S|None``."""
        self._regs.append(_Registration("callback", status, (fn,), tuple(to)))
        return self

    def add_timeout(
        self,
        status: S,
        timer: Callable[..., Any],
        expire: Callable[..., Any],
        *to: S,
        **options: Any,
    ) -> Builder[T, S]:
        """On reaching ``status``, arm ``timer(run, now) -> datetime | None``; when it is
        due, ``expire(run, now) -> S | None`` moves the run (exactly once).

        A status may have several timeouts (e.g. a reminder after 1 day and an expiry
        after 7): each is armed on its own; the first to fire and move the run voids
        the others. :mod:`pgflow.workflow.timers` has ready-made ``timer`` functions."""
        self._regs.append(_Registration("timeout", status, (timer, expire), tuple(to), options))
        return self

    def add_connector(
        self, name: str, connector: Any, fn: Callable[..., Any], **options: Any
    ) -> Builder[T, S]:
        """Feed events from ``connector`` to ``fn(api, event)`` (see the connector runner).

        ``fn`` runs inside a transaction that also commits the source's position when
        the source lives in the workflow's database (exactly-once), else before the ack
        (at-least-once: make it idempotent, e.g. ``api.trigger(..., run_id=api.run_id_for(
        name, event.id))``). With ``parallel_count=N`` there are N consumers, named
        ``"<workflow>--<name>-<i>-of-<N>"`` (e.g. ``orders--payments-1-of-2``): that
        name is the source's durable position (Redis group, NATS durable, Kafka group,
        RabbitMQ queue, table cursor ``connector:<source>:<consumer name>``). It
        includes the workflow, so two workflows with a same-named connector on one
        source each get every event; renaming either starts a new position.
        """
        self._connectors.append((name, connector, fn, dict(options)))
        return self

    def on_complete(self, fn: F | None = None, *, in_transaction: bool = False) -> Any:
        """``fn(run)`` runs once a run completed (decorator: ``@b.on_complete``).

        By default after the completion committed, from the event log: at least once,
        retried with backoff when it raises, never re-running a step (see
        :mod:`pgflow.workflow._hooks`). ``in_transaction=True``: inside the completing
        transaction instead — a failure rolls the completion back and the step runs
        again.
        """
        return self._hook("complete", self._on_complete, fn, in_transaction)

    def on_pause(self, fn: F | None = None, *, in_transaction: bool = False) -> Any:
        """``fn(run)`` runs once a run was paused (after commit; see :meth:`on_complete`)."""
        return self._hook("pause", self._on_pause, fn, in_transaction)

    def on_cancel(self, fn: F | None = None, *, in_transaction: bool = False) -> Any:
        """``fn(run)`` runs once a run was cancelled (after commit; see :meth:`on_complete`)."""
        return self._hook("cancel", self._on_cancel, fn, in_transaction)

    def _hook(self, kind: str, after: list[Hook], fn: F | None, in_transaction: bool) -> Any:
        def register(f: F) -> F:
            (self._in_tx[kind] if in_transaction else after).append(f)
            return f

        return register if fn is None else register(fn)

    # -- validating ------------------------------------------------------------------

    def graph(self, *, pause_retry: timedelta | _Unset | None = UNSET) -> Graph[S]:
        """Validate and return the graph; raises :class:`BuildError` listing all problems.

        ``pause_retry`` (from :meth:`build`) is the default under the builder's own
        defaults and each step's options."""
        problems: list[str] = []
        if not isinstance(self.name, str) or not self.name.strip():
            problems.append("workflow name must be a non-empty string")
        if not (isinstance(self.status_enum, type) and issubclass(self.status_enum, enum.Enum)):
            problem = f"status_enum must be an IntEnum or StrEnum class, got {self.status_enum!r}"
            raise BuildError(
                f"workflow {self.name!r}: {problem}", workflow=self.name, problems=[problem]
            )
        if not list(self.status_enum):
            problems.append(f"status enum {self.status_enum.__name__} has no members")
        root = Options()
        if not isinstance(pause_retry, _Unset):
            root, retry_problems = parse_options(
                f"workflow {self.name!r} build", {"pause_retry": pause_retry}
            )
            problems += retry_problems
        if self.custom_delete is not None and not callable(self.custom_delete):
            problems.append(f"custom_delete: {self.custom_delete!r} is not callable")
        base, base_problems = parse_options(f"workflow {self.name!r} defaults", self.defaults, root)
        problems += base_problems

        def check_status(where: str, status: Any) -> bool:
            if isinstance(status, self.status_enum):
                return True
            problems.append(
                f"{where}: unknown status {status!r} (not a member of {self.status_enum.__name__})"
            )
            return False

        steps: dict[S, StepSpec[S]] = {}
        callbacks: dict[S, list[CallbackSpec[S]]] = {}
        timeouts: dict[S, list[TimeoutSpec[S]]] = {}
        first_from: S | None = None
        for reg in self._regs:
            label = getattr(reg.status, "name", repr(reg.status))
            where = f"{reg.kind} from {label}"
            ok = check_status(where, reg.status)
            for fn in reg.fns:
                if not callable(fn):
                    problems.append(f"{where}: {fn!r} is not callable")
                    ok = False
            if not reg.to:
                problems.append(f"{where}: declares no destination status (to=[...])")
                ok = False
            for dest in reg.to:
                ok = check_status(f"{where}: destination", dest) and ok
            options, option_problems = parse_options(where, reg.options, base)
            problems += option_problems
            if not ok:
                continue
            status: S = reg.status
            to: tuple[S, ...] = tuple(dict.fromkeys(reg.to))
            if first_from is None:
                first_from = status
            if reg.kind == "step":
                if status in steps:
                    problems.append(
                        f"duplicate consumer: two steps from {status.name} "
                        f"({steps[status].name} and {getattr(reg.fns[0], '__name__', '?')})"
                    )
                    continue
                steps[status] = StepSpec(status, reg.fns[0], to, options)
            elif reg.kind == "callback":
                callbacks.setdefault(status, []).append(CallbackSpec(status, reg.fns[0], to))
            else:
                # several per status, like luno; they share the status's armer consumer,
                # so consumer options must agree
                same = timeouts.setdefault(status, [])
                if same and (
                    same[0].options.parallel_count != options.parallel_count
                    or same[0].options.consume_lag != options.consume_lag
                ):
                    problems.append(
                        f"{where}: timeouts on one status must share parallel_count and "
                        "consume_lag (they are armed by one consumer)"
                    )
                    continue
                same.append(
                    TimeoutSpec(status, reg.fns[0], reg.fns[1], to, options, index=len(same))
                )

        connectors: dict[str, ConnectorSpec] = {}
        for name, connector, fn, opts in self._connectors:
            where = f"connector {name!r}"
            if not isinstance(name, str) or not name:
                problems.append(f"connector name must be a non-empty string, got {name!r}")
                continue
            if name in connectors:
                problems.append(f"duplicate consumer: two connectors named {name!r}")
                continue
            if not callable(getattr(connector, "make", None)):
                problems.append(f"{where}: {connector!r} has no make(consumer_name) method")
            if not callable(fn):
                problems.append(f"{where}: {fn!r} is not callable")
            options, option_problems = parse_options(where, opts, base)
            problems += option_problems
            connectors[name] = ConnectorSpec(name, connector, fn, options)

        start = self.start if self.start is not None else first_from
        if self.start is not None:
            check_status("start", self.start)
        if start is None:
            problems.append(
                "workflow has nothing to run: add at least one step, callback or timeout"
            )
        for hooks, what in (
            (self._on_complete + self._in_tx["complete"], "on_complete"),
            (self._on_pause + self._in_tx["pause"], "on_pause"),
            (self._on_cancel + self._in_tx["cancel"], "on_cancel"),
        ):
            for hook in hooks:
                if not callable(hook):
                    problems.append(f"{what}: {hook!r} is not callable")
        if problems:
            raise BuildError(
                f"workflow {self.name!r}: " + "; ".join(problems),
                workflow=self.name,
                problems=problems,
            )
        assert start is not None
        return Graph(
            workflow=self.name,
            statuses=self.status_enum,
            start=start,
            steps=steps,
            callbacks=callbacks,
            timeouts=timeouts,
            connectors=connectors,
        )

    def build(
        self,
        dsn_or_pool: str | AsyncConnectionPool[AsyncConnection[Any]] | None = None,
        *,
        pool_size: int = 10,
        pause_retry: timedelta | None = timedelta(hours=1),
        clock: Clock | None = None,
        pooler: str | None = None,
        listen_dsn: str | None = None,
    ) -> Workflow[T, S]:
        """Validate the graph and return the :class:`pgflow.Workflow` that runs it.

        ``dsn_or_pool``: a DSN (None: ``PGFLOW_DATABASE_URL``), or an open
        ``AsyncConnectionPool`` to share. Nothing connects until first use.

        ``pause_retry``: a run paused after ``pause_after_err_count`` errors is resumed
        this long after it paused (luno ``WithPauseRetry``, same 1 h default; None:
        ``DisablePauseRetry``). A step's own ``pause_retry=`` option overrides it. Runs
        paused by hand are never resumed automatically.

        ``clock``: what timeouts, retries and schedules read (default: the database's
        clock); :class:`pgflow.testing.Clock` makes them testable in milliseconds.

        ``pooler="transaction"`` (default: the DSN's ``pgflow_pooler``, else
        ``$PGFLOW_POOLER``, else ``"none"``) when the DSN goes through a
        transaction-mode pooler (pgbouncer, RDS Proxy, Supavisor): no server-side
        prepared statements, and LISTEN needs ``listen_dsn`` (default
        ``$PGFLOW_LISTEN_DSN``), a DSN that reaches the same database directly or
        through a session-mode pooler; without it consumers poll
        (``polling_frequency``).
        """
        from pgflow.workflow.workflow import Workflow

        graph = self.graph(pause_retry=pause_retry)
        if pool_size < 2:
            problem = "pool_size must be at least 2"
            raise BuildError(
                f"workflow {self.name!r}: {problem}", workflow=self.name, problems=[problem]
            )
        engine: Engine[T, S] = Engine(
            graph,
            self.type,
            dsn_or_pool,
            hooks={
                "complete": tuple(self._on_complete),
                "pause": tuple(self._on_pause),
                "cancel": tuple(self._on_cancel),
                **{f"{kind}:tx": tuple(hooks) for kind, hooks in self._in_tx.items()},
            },
            pool_size=pool_size,
            custom_delete=self.custom_delete,
            clock=clock,
            pooler=pooler,
            listen_dsn=listen_dsn,
        )
        return Workflow(engine)
