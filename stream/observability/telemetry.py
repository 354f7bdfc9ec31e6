"""One service process's observability: its metrics, model-state snapshots, consumer lag, HTTP.

``Telemetry`` creates ``ServiceMetrics`` on the registry the process made, registers a
``ModelStateCollector`` that reads the latest snapshot of each stream at scrape time, and
serves ``/metrics``, ``/healthz`` and ``/readyz``. The training thread publishes a stream's
new snapshot after each of its tasks; nothing model-derived is computed on the hot path.

    >>> tm = Telemetry(CollectorRegistry(), device="cpu")
    >>> tm.metrics.boundary("new_class")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from spacenet.strategy.spacenet import SpaceNet
from spacenet.stream.observability.http import MetricsServer
from spacenet.stream.observability.metrics import DEFAULT_DEAD_LETTER_REASONS, ServiceMetrics
from spacenet.stream.observability.metrics_collector import AccuracySource, ModelState, ModelStateCollector
from spacenet.stream.observability.status_page import StatusView, StreamView, render

DEAD_LETTER_REASONS = (*DEFAULT_DEAD_LETTER_REASONS, "unconfirmed_class")
# The registry's families the status page reads (prometheus_client names counters without _total).
STATUS_FAMILIES = (
    "spacenet_current_task",
    "spacenet_model_version",
    "spacenet_dead_letter_messages",
    "spacenet_messages_rejected",
)


class Telemetry:
    """Metrics, the model-state collector and the HTTP endpoints of one process."""

    def __init__(
        self,
        registry: CollectorRegistry,
        device: str = "cpu",
        device_name: str = "",
        layers: Sequence[str] = (),
        lag_every_s: float = 5.0,
        checkpoint_max_age_s: float = 7200.0,
    ) -> None:
        self.registry = registry
        self.device = device if not device_name else f"{device} ({device_name})"
        self.metrics = ServiceMetrics(
            registry,
            layers=layers,
            dead_letter_reasons=DEAD_LETTER_REASONS,
            device=device,
            device_name=device_name,
            checkpoint_max_age_s=checkpoint_max_age_s,
        )
        self.states_: dict[str, ModelState] = {}  # by stream; replaced whole, never mutated
        registry.register(ModelStateCollector(lambda: self.states_))
        self.lag_every_s = lag_every_s
        self._next_lag = 0.0

    def snapshot(
        self,
        stream: str,
        net: SpaceNet,
        accuracy: AccuracySource | None,
        version: int,
        task_inference_accuracy: float | None = None,
    ) -> None:
        """Publish what ``stream``'s model knows now (between its tasks, on the training side)."""
        state = ModelState.of(
            net,
            accuracy if accuracy is not None and _has_rows(accuracy) else None,
            version,
            task_inference_accuracy,
        )
        self.states_ = {**self.states_, stream: state}
        self.metrics.set_known_classes(stream, len(net.label_to_unit_))

    def drop(self, stream: str) -> None:
        """``stream`` was handed over: none of its series stay in this process."""
        self.states_ = {s: state for s, state in self.states_.items() if s != stream}
        self.metrics.stream_removed(stream)

    def lag(self, consumer: Any, positions: Mapping[int, int]) -> None:
        """Consumer lag per assigned partition, at most every ``lag_every_s`` seconds."""
        now = time.monotonic()
        if now < self._next_lag:
            return
        self._next_lag = now + self.lag_every_s
        assigned = list(consumer.assignment())
        if not assigned:
            return
        ends = consumer.end_offsets(assigned)
        for tp in assigned:
            position = positions.get(tp.partition)
            if position is None:
                position = consumer.position(tp)
            self.metrics.lag(tp.topic, tp.partition, max(0, int(ends[tp]) - int(position)))

    def status_view(self) -> StatusView:
        """What the status page at ``/`` shows: the streams' snapshots and the registry's series."""
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in self.registry.collect():
            if family.name in STATUS_FAMILIES:
                for s in family.samples:
                    if s.name == family.name or s.name == family.name + "_total":
                        samples.setdefault(family.name, {})[tuple(sorted(s.labels.items()))] = s.value

        def by(family: str, label: str) -> dict[str, float]:
            return {dict(k)[label]: v for k, v in samples.get(family, {}).items() if label in dict(k)}

        tasks, versions = by("spacenet_current_task", "stream"), by("spacenet_model_version", "stream")
        states = self.states_
        streams = {
            s: StreamView(
                states.get(s),
                int(tasks[s]) if s in tasks else None,
                max(int(versions.get(s, 0)), states[s].model_version if s in states else 0),
            )
            for s in sorted({*states, *versions, *tasks})
        }
        counters = {
            f: by(f, "reason") for f in ("spacenet_dead_letter_messages", "spacenet_messages_rejected")
        }
        return StatusView(
            streams=streams,
            counters={f"{f}_total": v for f, v in counters.items()},
            boundaries=tuple(self.metrics.recent_boundaries),
            device=self.device,
        )

    def serve_http(
        self, host: str, port: int, ready: Callable[[], tuple[bool, str]], health: Callable[[], bool]
    ) -> MetricsServer | None:
        """Start ``/`` (the status page), ``/metrics``, ``/healthz``, ``/readyz`` unless ``port``
        is negative."""
        if port < 0:
            return None
        server = MetricsServer(
            self.registry,
            host=host,
            port=port,
            health=health,
            ready=ready,
            status=lambda: render(self.status_view()),
        )
        server.start()
        return server


def _has_rows(accuracy: AccuracySource) -> bool:
    return bool(accuracy.matrix())
