"""Counters and gauges per consumer and shard: the :class:`Metrics` the engine reports to.

Every hook is a no-op until a ``MeterProvider`` is resolved (see ``_config``); while off
it costs one attribute read (``self._inst``) and one flag read (``state.resolved``).
Lag-alert crossings are detected and logged even with metrics off.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pgflow.observability._state import ensure_resolved, logger, state

if TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.metrics import (
        CallbackOptions,
        Counter,
        Histogram,
        Meter,
        Observation,
    )

#: Seconds without any lag_alert report after which the next one counts as a new crossing.
LAG_ALERT_REARM = 60.0

#: Histogram buckets for batch processing time, in seconds (1 ms .. 1 min).
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


@dataclass(slots=True)
class _Instruments:
    duration: Histogram
    events: Counter
    successes: Counter
    errors: Counter
    retries: Counter
    dead_letters: Counter
    lag_alerts: Counter
    # Observable gauges keep references so they are not collected.
    gauges: tuple[Any, ...]


class Metrics:
    """Counters and gauges per consumer and shard (no-ops until configured).

    Instruments (attributes ``pgflow.consumer``, ``pgflow.shard``):

    ======================================  =========  ==================================
    ``pgflow.consumer.lag``                 {event}    events after the cursor (gauge)
    ``pgflow.consumer.lag_time``            s          age of the oldest of them (gauge)
    ``pgflow.consumer.duration``            s          time to process a batch (histogram)
    ``pgflow.consumer.events``              {event}    events processed (counter)
    ``pgflow.consumer.successes``           {event}    handled successfully (counter)
    ``pgflow.consumer.errors``              {error}    handler failures (counter)
    ``pgflow.consumer.retries``             {retry}    retries scheduled (counter)
    ``pgflow.consumer.dead_letters``        {event}    events dead-lettered (counter)
    ``pgflow.consumer.lag_alerts``          {alert}    lag crossed ``lag_alert`` (counter)
    ``pgflow.horizon.age``                  s          oldest xid-holding transaction (gauge)
    ======================================  =========  ==================================
    """

    def __init__(self) -> None:
        self._inst: _Instruments | None = None
        self._lag: dict[tuple[str, int], tuple[int, float]] = {}
        self._horizon: float | None = None
        # (consumer, shard) -> monotonic time of the last lag_alert call while alerting
        self._alerting: dict[tuple[str, int], float] = {}
        self._thresholds: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- configuration
    @property
    def enabled(self) -> bool:
        if not state.resolved:
            ensure_resolved()
        return self._inst is not None

    def _resolved_instruments(self) -> _Instruments | None:
        """Slow path of the hooks, until the configuration is resolved: resolve it."""
        ensure_resolved()
        return self._inst

    def _install(self, meter: Meter | None) -> None:
        self._lag.clear()
        self._horizon = None
        self._alerting.clear()
        if meter is None:
            self._inst = None
            return
        gauges = (
            meter.create_observable_gauge(
                "pgflow.consumer.lag",
                callbacks=[self._observe_lag_events],
                unit="{event}",
                description="Events after the consumer's cursor, not processed yet",
            ),
            meter.create_observable_gauge(
                "pgflow.consumer.lag_time",
                callbacks=[self._observe_lag_seconds],
                unit="s",
                description="Age of the oldest event not processed yet by the consumer",
            ),
            meter.create_observable_gauge(
                "pgflow.horizon.age",
                callbacks=[self._observe_horizon],
                unit="s",
                description="Age of the oldest open transaction holding an xid: it "
                "holds back delivery for every reader in the cluster",
            ),
        )
        self._inst = _Instruments(
            duration=meter.create_histogram(
                "pgflow.consumer.duration",
                unit="s",
                description="Time to process one batch (handlers + commit)",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            ),
            events=meter.create_counter(
                "pgflow.consumer.events", unit="{event}", description="Events processed"
            ),
            successes=meter.create_counter(
                "pgflow.consumer.successes",
                unit="{event}",
                description="Events handled successfully",
            ),
            errors=meter.create_counter(
                "pgflow.consumer.errors", unit="{error}", description="Handler failures"
            ),
            retries=meter.create_counter(
                "pgflow.consumer.retries", unit="{retry}", description="Retries scheduled"
            ),
            dead_letters=meter.create_counter(
                "pgflow.consumer.dead_letters",
                unit="{event}",
                description="Events moved to pgflow.dead_letters",
            ),
            lag_alerts=meter.create_counter(
                "pgflow.consumer.lag_alerts",
                unit="{alert}",
                description="Times a consumer's lag crossed its lag_alert threshold",
            ),
            gauges=gauges,
        )

    # -- observable gauge callbacks (run by the SDK at collection time)
    def _observe_lag_events(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe_lag(0)

    def _observe_lag_seconds(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe_lag(1)

    def _observe_lag(self, field: int) -> list[Observation]:
        """One observation per consumer shard of its ``(events, seconds)[field]``."""
        from opentelemetry.metrics import Observation

        with self._lock:
            items = list(self._lag.items())
        return [Observation(lag[field], _labels(c, s)) for (c, s), lag in items]

    def _observe_horizon(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        horizon = self._horizon
        return [] if horizon is None else [Observation(horizon)]

    # -- the hooks the engine calls
    def batch(self, consumer: str, shard: int, events: int, seconds: float) -> None:
        """A batch of ``events`` was processed in ``seconds`` (committed or not)."""
        inst = self._inst
        if inst is None and (state.resolved or (inst := self._resolved_instruments()) is None):
            return
        labels = _labels(consumer, shard)
        inst.duration.record(seconds, labels)
        if events:
            inst.events.add(events, labels)

    def success(self, consumer: str, shard: int, count: int = 1) -> None:
        inst = self._inst
        if inst is None and (state.resolved or (inst := self._resolved_instruments()) is None):
            return
        inst.successes.add(count, _labels(consumer, shard))

    def error(self, consumer: str, shard: int) -> None:
        inst = self._inst
        if inst is None and (state.resolved or (inst := self._resolved_instruments()) is None):
            return
        inst.errors.add(1, _labels(consumer, shard))

    def retry(self, consumer: str, shard: int) -> None:
        inst = self._inst
        if inst is None and (state.resolved or (inst := self._resolved_instruments()) is None):
            return
        inst.retries.add(1, _labels(consumer, shard))

    def dead_letter(self, consumer: str, shard: int) -> None:
        inst = self._inst
        if inst is None and (state.resolved or (inst := self._resolved_instruments()) is None):
            return
        inst.dead_letters.add(1, _labels(consumer, shard))

    def lag(self, consumer: str, shard: int, events: int, seconds: float) -> None:
        """The consumer's current lag; also clears a raised lag alert once it recovers."""
        key = (consumer, shard)
        if self._alerting and key in self._alerting:
            threshold = self._thresholds.get(consumer)
            if events == 0 or (threshold is not None and seconds < threshold):
                del self._alerting[key]
                logger.info("consumer %s shard %d: lag back to %.1fs", consumer, shard, seconds)
        threshold = self._thresholds.get(consumer) if self._thresholds else None
        if threshold is not None and seconds >= threshold and events > 0:
            self.lag_alert(consumer, shard, seconds)
        if self._inst is None and (state.resolved or self._resolved_instruments() is None):
            return
        with self._lock:
            self._lag[key] = (int(events), float(seconds))

    def horizon_age(self, seconds: float) -> None:
        if self._inst is None and (state.resolved or self._resolved_instruments() is None):
            return
        self._horizon = float(seconds)

    def lag_alert(self, consumer: str, shard: int, seconds: float) -> None:
        """The consumer's lag crossed its ``lag_alert`` threshold.

        Counted and logged (WARNING) once per crossing: repeated calls while the lag
        stays high (the engine reports every late event) are ignored until the lag
        recovers — :meth:`lag` reports no events pending, or lag below the threshold
        registered with :meth:`set_lag_alert`, or no alert was reported for
        :data:`LAG_ALERT_REARM` seconds. The warning is logged even when metrics are off.
        """
        key = (consumer, shard)
        now = time.monotonic()
        last = self._alerting.get(key)
        self._alerting[key] = now
        if last is not None and now - last < LAG_ALERT_REARM:
            return
        threshold = self._thresholds.get(consumer)
        logger.warning(
            "consumer %s shard %d is lagging: oldest unprocessed event is %.1fs old%s",
            consumer,
            shard,
            seconds,
            f" (lag_alert {threshold:g}s)" if threshold is not None else "",
        )
        inst = self._inst
        if inst is None and (state.resolved or (inst := self._resolved_instruments()) is None):
            return
        inst.lag_alerts.add(1, _labels(consumer, shard))

    # -- helpers beyond the engine interface
    @property
    def has_lag_alerts(self) -> bool:
        """Whether any consumer registered a ``lag_alert`` threshold."""
        return bool(self._thresholds)

    def set_lag_alert(self, consumer: str, seconds: float | None) -> None:
        """Register ``consumer``'s ``lag_alert`` so :meth:`lag` / :func:`sample_database`
        detect crossings themselves (``None`` removes it)."""
        if seconds is None:
            self._thresholds.pop(consumer, None)
        else:
            self._thresholds[consumer] = float(seconds)

    def forget(self, consumer: str, shard: int) -> None:
        """Stop reporting lag for a consumer shard that no longer exists."""
        with self._lock:
            self._lag.pop((consumer, shard), None)
        self._alerting.pop((consumer, shard), None)


def _labels(consumer: str, shard: int) -> dict[str, Any]:
    return {"pgflow.consumer": consumer, "pgflow.shard": shard}


metrics = Metrics()
