"""A registry holding every series the service exports, driven through its real classes.

Used to check that the dashboard and the alert rules only name series that exist.

    >>> registry, metrics = populated_registry()
    >>> "spacenet_layer_free_neurons" in exposed_names(registry)
    True
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from spacenet.strategy import SpaceNet, SpaceNetMLP
from spacenet.stream.observability.metrics import ServiceMetrics
from spacenet.stream.observability.metrics_collector import ModelState, ModelStateCollector

# A series name, not part of a recording rule's ``level:metric:operations`` name.
METRIC_NAME = re.compile(r"(?<![\w:])((?:spacenet|process)_[a-z0-9_]+)(?![\w:.])")


class _Matrix:
    """Two tasks' accuracy matrix (the collector's protocol)."""

    rows = [[0.9, 0.0], [0.6, 0.8]]

    def matrix(self) -> list[list[float | None]]:
        return [list(r) for r in self.rows]

    def final_accuracy(self) -> float:
        return 0.7

    def sample_weighted_accuracy(self) -> float:
        return 0.75

    def forgetting(self) -> dict[int, float]:
        return {0: 0.3}

    def average_forgetting(self) -> float:
        return 0.3

    def backward_transfer(self) -> float:
        return -0.3


def populated_registry(process: bool = False) -> tuple[CollectorRegistry, ServiceMetrics]:
    """ServiceMetrics and a ModelStateCollector (two tasks learned) on one registry,
    with every labelled series touched once; ``process`` adds the process collector."""
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry, layers=("hidden.0", "hidden.1", "out"))
    net = SpaceNet(seed=0).attach(SpaceNetMLP())
    for classes in ([0, 1], [2, 3]):
        net.begin_task(classes)
        net.end_task()
    state = ModelState.of(net, _Matrix(), model_version=2, task_inference_accuracy=0.9)
    registry.register(ModelStateCollector(lambda: {"0": state}))
    if process:
        from prometheus_client import ProcessCollector

        ProcessCollector(registry=registry)
    metrics.stream_added("0")
    metrics.stream_restored(0.5)
    drive(metrics)
    return registry, metrics


def drive(metrics: ServiceMetrics, task: int = 1) -> None:
    """One round of activity on every instrument (stream "0" taken on already)."""
    metrics.batch()
    metrics.consumed("train", 0, records=10, decode_seconds=0.001)
    metrics.rejected("schema", decode_seconds=0.0005)
    metrics.routed("train", 10)
    metrics.lag("train", 0, 5)
    metrics.task_opened("0", task, "new_class")
    metrics.prequential("0", scored=8, accuracy=0.875, drifts=1)
    metrics.set_known_classes("0", 2 * (task + 1))
    metrics.uncheckpointed_messages("0", 4)
    metrics.training_started()
    metrics.steps(5)
    metrics.training_finished(3.0, task=task, stream="0")
    with metrics.checkpoint("0"):
        pass
    metrics.checkpoint_size("0", 10_000)
    metrics.model_published("0", task + 1)
    metrics.prediction(0.01, records=4)
    metrics.dead_lettered("schema")
    metrics.capacity_exhausted("out")
    metrics.training_finished(1.0, failed=True)


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry exposes (``_total``, ``_bucket``... included)."""
    text = generate_latest(registry).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def referenced_names(text: str) -> set[str]:
    """``spacenet_*`` and ``process_*`` series names in PromQL or rule text."""
    return set(METRIC_NAME.findall(text))
