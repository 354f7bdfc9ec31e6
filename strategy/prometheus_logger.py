"""An Avalanche logger that forwards evaluation metrics to a Prometheus registry.

Benchmark runs can then be watched live in Grafana. Each scalar metric value becomes
``spacenet_bench_metric{name, phase, stream, task, experience, key}``: the Avalanche
metric name ``Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001`` is split by its
markers (``*_phase``, ``*_stream``, ``TaskNNN``, ``ExpNNN``), not by position, so
names without a task or experience parse too; segments no marker explains (a class
id of a per-class accuracy, say) form ``key``. Labels stay bounded: task and
experience indices at or above ``max_index`` and series beyond ``max_series`` are
dropped and counted in ``spacenet_bench_metrics_dropped_total{reason}``, as are values
that are not scalars (images, confusion matrices).

    >>> from prometheus_client import CollectorRegistry
    >>> registry = CollectorRegistry()
    >>> logger = PrometheusLogger(registry)
    >>> logger.log_single_metric("Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001", 0.93, 4)
    >>> registry.get_sample_value("spacenet_bench_metric", {"name": "Top1_Acc_Exp", "phase": "eval",
    ...     "stream": "test", "task": "0", "experience": "1", "key": ""})
    0.93

Use it like any Avalanche logger:
``EvaluationPlugin(accuracy_metrics(experience=True), loggers=[PrometheusLogger(registry)])``.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Any

from avalanche.logging import BaseLogger
from prometheus_client import CollectorRegistry, Counter, Gauge

_INDEX = re.compile(r"(Task|Exp)_?(\d+)")
LABELS = ("name", "phase", "stream", "task", "experience", "key")
DROP_REASONS = ("not_scalar", "index_cap", "series_cap")


@dataclass(frozen=True)
class MetricName:
    """The parts of an Avalanche metric name; ``None`` where the name has no such part.

    >>> MetricName.parse("StreamForgetting/eval_phase/test_stream")
    MetricName(name='StreamForgetting', phase='eval', stream='test', task=None, experience=None, key='')
    >>> MetricName.parse("Top1_ClassAcc_Epoch/train_phase/train_stream/Task000/3").key
    '3'
    """

    name: str
    phase: str | None = None
    stream: str | None = None
    task: int | None = None
    experience: int | None = None
    key: str = ""

    @classmethod
    def parse(cls, full_name: str) -> MetricName:
        name, *segments = full_name.split("/")
        phase = stream = None
        task = experience = None
        rest: list[str] = []
        for seg in segments:
            index = _INDEX.fullmatch(seg)
            if seg.endswith("_phase") and phase is None:
                phase = seg.removesuffix("_phase")
            elif seg.endswith("_stream") and stream is None:
                stream = seg.removesuffix("_stream")
            elif index and index.group(1) == "Task" and task is None:
                task = int(index.group(2))
            elif index and index.group(1) == "Exp" and experience is None:
                experience = int(index.group(2))
            else:
                rest.append(seg)
        return cls(name, phase, stream, task, experience, "/".join(rest))


def scalar(value: Any) -> float | None:
    """A float for scalar values (numbers, 0-d tensors and arrays), else None."""
    best = getattr(value, "best_supported_value", None)  # Avalanche's AlternativeValues
    if callable(best):
        value = best(float, int)
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) else None
    return None


class PrometheusLogger(BaseLogger):  # type: ignore[misc]
    """Forward an ``EvaluationPlugin``'s scalar metrics to ``registry`` as gauges.

    Parameters:
        registry: where the gauges are registered (never the global registry).
        max_index: task and experience indices ``0 .. max_index - 1`` are kept.
        max_series: at most this many distinct label sets; later ones are dropped.
    """

    def __init__(self, registry: CollectorRegistry, max_index: int = 32, max_series: int = 2000) -> None:
        super().__init__()
        self.registry = registry
        self.max_index = max_index
        self.max_series = max_series
        self.values = Gauge(
            "spacenet_bench_metric",
            "Latest value of an Avalanche evaluation metric.",
            LABELS,
            registry=registry,
        )
        self.steps = Gauge(
            "spacenet_bench_metric_step",
            "Avalanche x_plot (strategy step) of the latest value.",
            LABELS,
            registry=registry,
        )
        self.dropped = Counter(
            "spacenet_bench_metrics_dropped_total",
            "Metric values not exported, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        self._series: set[tuple[str, ...]] = set()

    def labels_of(self, name: str) -> tuple[str, ...] | None:
        """The label values for a metric name; None when an index is beyond the cap."""
        parsed = MetricName.parse(name)
        indices = [i for i in (parsed.task, parsed.experience) if i is not None]
        if any(i >= self.max_index for i in indices):
            return None

        def text(value: object) -> str:
            return "" if value is None else str(value)

        return (
            parsed.name,
            text(parsed.phase),
            text(parsed.stream),
            text(parsed.task),
            text(parsed.experience),
            parsed.key,
        )

    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        number = scalar(value)
        if number is None:
            self.dropped.labels("not_scalar").inc()
            return
        labels = self.labels_of(name)
        if labels is None:
            self.dropped.labels("index_cap").inc()
            return
        if labels not in self._series:
            if len(self._series) >= self.max_series:
                self.dropped.labels("series_cap").inc()
                return
            self._series.add(labels)
        self.values.labels(*labels).set(number)
        self.steps.labels(*labels).set(x_plot)
