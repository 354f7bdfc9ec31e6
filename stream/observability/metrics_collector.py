"""Scrape-time Prometheus series computed from a snapshot of the model's state.

The service builds a ``ModelState`` of a stream after each of its tasks (on the thread
that trains, between tasks) and hands the collector a callable returning the latest one
of each stream it learns; every scrape turns them into series labelled with their
``stream``. Nothing here touches the live model, so a scrape never races training.

Accuracy definitions (``R[i][j]``: accuracy on task ``j``'s held-out sample after
training task ``i``; ``T - 1``: the last trained task):

- accuracy (seen classes): ``mean_{j <= T-1} R[T-1][j]``;
- sample-weighted accuracy: the held-out samples of all seen tasks pooled;
- forgetting of task ``j < T-1``: ``max_{j <= l < T-1} R[l][j] - R[T-1][j]``;
  average forgetting is its mean over ``j < T-1`` (0 with one task);
- backward transfer: ``mean_{j < T-1} (R[T-1][j] - R[j][j])``, in ``[-1, 1]``
  (negative: learning later tasks hurt earlier ones).

    >>> from prometheus_client import CollectorRegistry
    >>> from spacenet.strategy import SpaceNet, SpaceNetMLP
    >>> net = SpaceNet(seed=0).attach(SpaceNetMLP())
    >>> net.begin_task([0, 1]); net.end_task()
    >>> state = ModelState.of(net, model_version=1)
    >>> registry = CollectorRegistry()
    >>> _ = registry.register(ModelStateCollector(lambda: {"0": state}))
    >>> registry.get_sample_value("spacenet_layer_free_neurons", {"stream": "0", "layer": "hidden.0"})
    360.0
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from spacenet.strategy.capacity import CapacityReport
from spacenet.strategy.layers import FREE
from spacenet.strategy.spacenet import SpaceNet

log = logging.getLogger(__name__)


class AccuracySource(Protocol):
    """What the collector needs of an accuracy matrix (``cl_metrics.AccuracyMatrix`` fits).

    Summary methods may raise ``ValueError`` while entries are missing."""

    def matrix(self) -> list[list[float | None]]: ...
    def final_accuracy(self) -> float: ...
    def forgetting(self) -> dict[int, float]: ...
    def average_forgetting(self) -> float: ...
    def backward_transfer(self) -> float: ...


@runtime_checkable
class SampleWeighted(Protocol):
    def sample_weighted_accuracy(self) -> float: ...


def _or_none(compute: Callable[[], float]) -> float | None:
    try:
        return float(compute())
    except (ValueError, KeyError, ZeroDivisionError):
        return None


@dataclass(frozen=True)
class AccuracySnapshot:
    """The accuracy matrix and its summaries, copied so later updates do not show through.

    >>> AccuracySnapshot(rows=((0.9,), (0.6, 0.8)), final=0.7).latest_row
    (0.6, 0.8)
    """

    rows: tuple[tuple[float | None, ...], ...] = ()
    final: float | None = None
    sample_weighted: float | None = None
    forgetting: Mapping[int, float] = field(default_factory=dict)
    average_forgetting: float | None = None
    backward_transfer: float | None = None

    @property
    def latest_row(self) -> tuple[float | None, ...]:
        return self.rows[-1] if self.rows else ()

    @classmethod
    def of(cls, source: AccuracySource) -> AccuracySnapshot:
        rows = tuple(tuple(row) for row in source.matrix())
        if not rows:
            return cls()
        weighted = source.sample_weighted_accuracy if isinstance(source, SampleWeighted) else None
        try:
            forgetting = dict(source.forgetting())
        except (ValueError, KeyError):
            forgetting = {}
        return cls(
            rows=rows,
            final=_or_none(source.final_accuracy),
            sample_weighted=_or_none(weighted) if weighted is not None else None,
            forgetting=forgetting,
            average_forgetting=_or_none(source.average_forgetting),
            backward_transfer=_or_none(source.backward_transfer),
        )


def reserved_by_task(net: SpaceNet) -> dict[str, dict[int, int]]:
    """Layer name -> task -> neurons that task reserved (output units for the output layer)."""
    out: dict[str, dict[int, int]] = {}
    for name, layer in zip(net.layer_names_, net.layers_, strict=True):
        owners = layer.reserved_by_[layer.reserved_by_ != FREE]
        tasks, counts = torch.unique(owners, return_counts=True)
        out[name] = {int(t): int(c) for t, c in zip(tasks.tolist(), counts.tolist(), strict=True)}
    return out


@dataclass(frozen=True)
class ModelState:
    """An immutable snapshot of what the model has learned and what capacity is left.

    ``model_version`` is the published version these numbers describe (the service's
    own ``spacenet_model_version`` gauge says which version is serving right now).
    """

    capacity: CapacityReport
    accuracy: AccuracySnapshot | None = None
    model_version: int = 0
    reserved: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    task_inference_accuracy: float | None = None  # None: the option is off

    @classmethod
    def of(
        cls,
        net: SpaceNet,
        accuracy: AccuracySource | None = None,
        model_version: int = 0,
        task_inference_accuracy: float | None = None,
    ) -> ModelState:
        """Snapshot ``net`` (call between tasks, on the thread that trains it)."""
        return cls(
            capacity=net.capacity(),
            accuracy=AccuracySnapshot.of(accuracy) if accuracy is not None else None,
            model_version=model_version,
            reserved=reserved_by_task(net),
            task_inference_accuracy=task_inference_accuracy,
        )


def _gauge(name: str, documentation: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=["stream", *labels])


class _Stream:
    """The families, with ``stream``'s label value put first on every sample."""

    def __init__(self, families: dict[str, GaugeMetricFamily], stream: str) -> None:
        self.families, self.stream = families, stream

    def add(self, name: str, labels: list[str], value: float) -> None:
        self.families[name].add_metric([self.stream, *labels], value)


class ModelStateCollector(Collector):
    """Capacity and accuracy series from ``source()``, computed at scrape time.

    ``source`` returns the latest ``ModelState`` of each stream (by its ``stream`` label
    value); with none (before there is a model) every family is exposed with no samples
    and ``spacenet_model_state_available`` is 0.
    If ``source`` raises, the scrape still succeeds (the families are empty) and
    ``spacenet_model_state_errors_total`` counts it. Per-task series cover tasks
    ``0 .. max_task_label - 1`` only; ``spacenet_task_labels_truncated`` is 1 when later
    tasks were left out (the headline accuracy and forgetting still include them).
    """

    def __init__(self, source: Callable[[], Mapping[str, ModelState]], max_task_label: int = 32) -> None:
        if max_task_label < 0:
            raise ValueError("max_task_label must be >= 0")
        self.source = source
        self.max_task_label = max_task_label
        self._errors = 0

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return [*self._families().values(), self._error_family()]

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        families = self._families()
        states: Mapping[str, ModelState]
        try:
            states = dict(self.source())
        except Exception:  # a scrape must not fail: the hot-path series still matter
            self._errors += 1
            log.exception("model state source failed")
            states = {}
        families["spacenet_model_state_available"].add_metric([], 1.0 if states else 0.0)
        for stream, state in sorted(states.items()):
            self._fill(_Stream(families, stream), state)
        yield from families.values()
        yield self._error_family(self._errors)

    @staticmethod
    def _error_family(value: float | None = None) -> CounterMetricFamily:
        return CounterMetricFamily(
            "spacenet_model_state_errors", "Scrapes where the model state source raised.", value=value
        )

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        specs = [
            ("spacenet_evaluated_model_version", "Model version the capacity and accuracy series describe."),
            ("spacenet_layer_neurons", "Neurons (output units) in the layer.", "layer"),
            ("spacenet_layer_free_neurons", "Neurons no task has reserved.", "layer"),
            ("spacenet_layer_reserved_neurons", "Neurons reserved (frozen) by learned tasks.", "layer"),
            ("spacenet_layer_used_neurons", "Neurons any task uses (reserved or connected).", "layer"),
            ("spacenet_layer_free_neuron_ratio", "Free neurons / neurons.", "layer"),
            (
                "spacenet_layer_used_connection_ratio",
                "Connections owned by a task / all connections.",
                "layer",
            ),
            ("spacenet_task_reserved_neurons", "Neurons a task reserved in a layer.", "layer", "task"),
            ("spacenet_tasks_remaining", "Estimated further tasks that fit in the free capacity."),
            ("spacenet_tasks_learned", "Tasks the model has learned."),
            ("spacenet_classes_learned", "Classes the model has learned."),
            ("spacenet_accuracy_ratio", "Mean held-out accuracy over seen tasks after the last task."),
            ("spacenet_sample_accuracy_ratio", "Held-out accuracy over all seen tasks' samples pooled."),
            ("spacenet_task_accuracy_ratio", "Held-out accuracy per task after the last task.", "task"),
            (
                "spacenet_accuracy_matrix_ratio",
                "R[trained_through][task]: accuracy on task after training trained_through.",
                "trained_through",
                "task",
            ),
            (
                "spacenet_task_forgetting_ratio",
                "Best earlier accuracy minus latest accuracy, per task.",
                "task",
            ),
            ("spacenet_average_forgetting_ratio", "Mean forgetting over all tasks but the last."),
            ("spacenet_backward_transfer_ratio", "Mean over earlier tasks of R[last][j] - R[j][j] (-1..1)."),
            ("spacenet_task_labels_truncated", "1 when tasks >= the task-label cap were left out."),
            (
                "spacenet_task_inference_accuracy_ratio",
                "Held-out records whose task the task inference chose right (option task_inference).",
            ),
            ("spacenet_task_inference_bytes", "Bytes of the stored task-inference statistics."),
            (
                "spacenet_learner_state_bytes",
                "Bytes of the learner's saved state: SpaceNet's sparse state, weights included.",
            ),
            ("spacenet_dense_model_bytes", "Bytes of the managed layers' dense weights and biases."),
        ]
        available = GaugeMetricFamily(
            "spacenet_model_state_available", "1 when a model state is available, else 0."
        )
        return {available.name: available} | {
            name: _gauge(name, doc, *labels) for name, doc, *labels in specs
        }

    def _fill(self, f: _Stream, state: ModelState) -> None:
        cap, cut = state.capacity, self.max_task_label
        truncated = False
        f.add("spacenet_evaluated_model_version", [], float(state.model_version))
        for layer in cap.layers:
            f.add("spacenet_layer_neurons", [layer.name], float(layer.neurons))
            f.add("spacenet_layer_free_neurons", [layer.name], float(layer.free_neurons))
            f.add("spacenet_layer_reserved_neurons", [layer.name], float(layer.reserved_neurons))
            f.add("spacenet_layer_used_neurons", [layer.name], float(layer.used_neurons))
            f.add("spacenet_layer_free_neuron_ratio", [layer.name], float(layer.free_neuron_ratio))
            f.add("spacenet_layer_used_connection_ratio", [layer.name], float(layer.used_connection_ratio))
        for name, per_task in state.reserved.items():
            for task, neurons in sorted(per_task.items()):
                if task < cut:
                    f.add("spacenet_task_reserved_neurons", [name, str(task)], float(neurons))
                truncated |= task >= cut
        f.add("spacenet_tasks_remaining", [], float(cap.tasks_remaining))
        f.add("spacenet_tasks_learned", [], float(cap.tasks_learned))
        f.add("spacenet_classes_learned", [], float(cap.classes_known))
        if state.task_inference_accuracy is not None:
            f.add("spacenet_task_inference_accuracy_ratio", [], float(state.task_inference_accuracy))
        f.add("spacenet_task_inference_bytes", [], float(cap.task_inference_bytes))
        f.add("spacenet_learner_state_bytes", [], float(cap.state_bytes))
        f.add("spacenet_dense_model_bytes", [], float(cap.dense_bytes))
        acc = state.accuracy
        if acc is not None and acc.rows:
            truncated |= self._fill_accuracy(f, acc)
        f.add("spacenet_task_labels_truncated", [], 1.0 if truncated else 0.0)

    def _fill_accuracy(self, f: _Stream, acc: AccuracySnapshot) -> bool:
        """Add the accuracy series; True when some task was beyond the label cap."""
        cut, last = self.max_task_label, len(acc.rows) - 1
        truncated = False
        for name, value in (
            ("spacenet_accuracy_ratio", acc.final),
            ("spacenet_sample_accuracy_ratio", acc.sample_weighted),
            ("spacenet_average_forgetting_ratio", acc.average_forgetting),
            ("spacenet_backward_transfer_ratio", acc.backward_transfer),
        ):
            if value is not None:
                f.add(name, [], float(value))
        for task, value in enumerate(acc.latest_row):
            if value is not None and task <= last:
                truncated |= task >= cut
                if task < cut:
                    f.add("spacenet_task_accuracy_ratio", [str(task)], float(value))
        for task, value in sorted(acc.forgetting.items()):
            if task < cut:
                f.add("spacenet_task_forgetting_ratio", [str(task)], float(value))
        for row, values in enumerate(acc.rows):
            for task, value in enumerate(values):
                if value is None:
                    continue
                truncated |= row >= cut or task >= cut
                if row < cut and task < cut:
                    f.add("spacenet_accuracy_matrix_ratio", [str(row), str(task)], float(value))
        return truncated
