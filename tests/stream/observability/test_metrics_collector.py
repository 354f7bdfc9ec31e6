"""ModelStateCollector: scrape-time series from snapshots of a real SpaceNet."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from spacenet.strategy import SpaceNet, SpaceNetMLP
from spacenet.stream.observability.metrics import ServiceMetrics
from spacenet.stream.observability.metrics_collector import AccuracySnapshot, ModelState, ModelStateCollector

FAMILIES = {
    "spacenet_model_state_available",
    "spacenet_evaluated_model_version",
    "spacenet_layer_neurons",
    "spacenet_layer_free_neurons",
    "spacenet_layer_reserved_neurons",
    "spacenet_layer_used_neurons",
    "spacenet_layer_free_neuron_ratio",
    "spacenet_layer_used_connection_ratio",
    "spacenet_task_reserved_neurons",
    "spacenet_tasks_remaining",
    "spacenet_tasks_learned",
    "spacenet_classes_learned",
    "spacenet_accuracy_ratio",
    "spacenet_sample_accuracy_ratio",
    "spacenet_task_accuracy_ratio",
    "spacenet_accuracy_matrix_ratio",
    "spacenet_task_forgetting_ratio",
    "spacenet_average_forgetting_ratio",
    "spacenet_backward_transfer_ratio",
    "spacenet_task_labels_truncated",
    "spacenet_task_inference_accuracy_ratio",
    "spacenet_task_inference_bytes",
    "spacenet_learner_state_bytes",
    "spacenet_dense_model_bytes",
    "spacenet_model_state_errors",
}


class Matrix:
    """A minimal accuracy matrix with the collector's protocol (the definitions of
    ``cl_metrics.AccuracyMatrix``), so these tests do not depend on that module."""

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = rows

    def matrix(self) -> list[list[float | None]]:
        return [list(r) for r in self.rows]

    def final_accuracy(self) -> float:
        last = len(self.rows) - 1
        return sum(self.rows[last][: last + 1]) / (last + 1)

    def forgetting(self) -> dict[int, float]:
        last = len(self.rows) - 1
        return {j: max(self.rows[i][j] for i in range(j, last)) - self.rows[last][j] for j in range(last)}

    def average_forgetting(self) -> float:
        f = self.forgetting()
        return sum(f.values()) / len(f) if f else 0.0

    def backward_transfer(self) -> float:
        last = len(self.rows) - 1
        return sum(self.rows[last][j] - self.rows[j][j] for j in range(last)) / last if last else 0.0


def families(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(registry).decode()
    return {
        f.name: [(s.labels, s.value) for s in f.samples if not s.name.endswith("_created")]
        for f in text_string_to_metric_families(text)
    }


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """A series of stream "0" (every model-state series carries its stream)."""
    return registry.get_sample_value(name, {"stream": "0", **labels})


@pytest.fixture
def net() -> SpaceNet:
    return SpaceNet(seed=0).attach(SpaceNetMLP())


def test_free_neurons_fall_and_reservations_show_per_task(net: SpaceNet) -> None:
    state: list[ModelState | None] = [ModelState.of(net)]
    registry = CollectorRegistry()
    registry.register(ModelStateCollector(lambda: {"0": state[0]}))

    def get(name: str, **labels: str) -> float | None:
        return sample(registry, name, **labels)

    assert get("spacenet_layer_free_neurons", layer="hidden.0") == 400.0
    assert get("spacenet_layer_free_neuron_ratio", layer="hidden.0") == 1.0
    assert get("spacenet_layer_used_connection_ratio", layer="hidden.0") == 0.0
    assert get("spacenet_tasks_learned") == 0.0
    first_remaining = get("spacenet_tasks_remaining") or 0.0

    net.begin_task([0, 1])
    net.end_task()
    state[0] = ModelState.of(net, model_version=1)
    assert get("spacenet_layer_free_neurons", layer="hidden.0") == 360.0
    assert get("spacenet_layer_reserved_neurons", layer="hidden.0") == 40.0
    assert get("spacenet_layer_free_neurons", layer="out") == 8.0
    assert get("spacenet_layer_free_neuron_ratio", layer="hidden.1") == pytest.approx(0.9)
    assert 0.0 < (get("spacenet_layer_used_connection_ratio", layer="hidden.0") or 0.0) < 1.0
    assert get("spacenet_task_reserved_neurons", layer="hidden.0", task="0") == 40.0
    assert get("spacenet_tasks_learned") == 1.0
    assert get("spacenet_classes_learned") == 2.0
    assert get("spacenet_evaluated_model_version") == 1.0
    assert (get("spacenet_tasks_remaining") or 0.0) < first_remaining

    net.begin_task([2, 3])
    net.end_task()
    state[0] = ModelState.of(net, model_version=2)
    assert get("spacenet_layer_free_neurons", layer="hidden.0") == 320.0
    assert get("spacenet_task_reserved_neurons", layer="out", task="1") == 2.0
    assert get("spacenet_task_labels_truncated") == 0.0
    assert registry.get_sample_value("spacenet_model_state_available") == 1.0


def test_accuracy_series_follow_the_definitions(net: SpaceNet) -> None:
    rows = [[0.9, 0.0, 0.0], [0.6, 0.8, 0.0], [0.5, 0.7, 0.95]]
    state = ModelState.of(net, Matrix(rows), model_version=3)
    registry = CollectorRegistry()
    registry.register(ModelStateCollector(lambda: {"0": state}))

    def get(name: str, **labels: str) -> float | None:
        return sample(registry, name, **labels)

    assert get("spacenet_accuracy_ratio") == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert get("spacenet_task_accuracy_ratio", task="2") == 0.95
    assert get("spacenet_task_forgetting_ratio", task="0") == pytest.approx(0.4)
    assert get("spacenet_task_forgetting_ratio", task="1") == pytest.approx(0.1)
    assert get("spacenet_task_forgetting_ratio", task="2") is None
    assert get("spacenet_average_forgetting_ratio") == pytest.approx(0.25)
    assert get("spacenet_backward_transfer_ratio") == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert get("spacenet_accuracy_matrix_ratio", trained_through="1", task="0") == 0.6
    assert get("spacenet_accuracy_matrix_ratio", trained_through="0", task="2") == 0.0
    matrix = families(registry)["spacenet_accuracy_matrix_ratio"]
    assert len(matrix) == 9
    # The protocol's optional part: without sample counts there is no weighted series.
    assert families(registry)["spacenet_sample_accuracy_ratio"] == []


def test_each_stream_has_its_own_series(net: SpaceNet) -> None:
    fresh = ModelState.of(SpaceNet(seed=0).attach(SpaceNetMLP()), model_version=0)
    net.begin_task([0, 1])
    net.end_task()
    states = {"0": fresh, "3": ModelState.of(net, Matrix([[0.9]]), model_version=1)}
    registry = CollectorRegistry()
    registry.register(ModelStateCollector(lambda: states))
    free = {
        labels["stream"]: v
        for labels, v in families(registry)["spacenet_layer_free_neurons"]
        if labels["layer"] == "hidden.0"
    }
    assert free == {"0": 400.0, "3": 360.0}
    assert registry.get_sample_value("spacenet_accuracy_ratio", {"stream": "3"}) == 0.9
    assert registry.get_sample_value("spacenet_accuracy_ratio", {"stream": "0"}) is None
    assert registry.get_sample_value("spacenet_model_state_available") == 1.0
    del states["3"]
    assert {labels["stream"] for labels, _ in families(registry)["spacenet_tasks_learned"]} == {"0"}


def test_snapshot_does_not_follow_later_updates(net: SpaceNet) -> None:
    matrix = Matrix([[0.9]])
    state = ModelState.of(net, matrix)
    matrix.rows.append([0.1, 0.2])
    assert state.accuracy == AccuracySnapshot(
        rows=((0.9,),), final=0.9, forgetting={}, average_forgetting=0.0, backward_transfer=0.0
    )


def test_real_accuracy_matrix_gives_the_sample_weighted_accuracy(net: SpaceNet) -> None:
    cl_metrics = pytest.importorskip("spacenet.strategy.cl_metrics")
    m = cl_metrics.AccuracyMatrix()
    m.record(0, 0, 0.9, 100)
    m.record(1, 0, 0.6, 100)
    m.record(1, 1, 0.8, 300)
    registry = CollectorRegistry()
    registry.register(ModelStateCollector(lambda: {"0": ModelState.of(net, m)}))
    assert sample(registry, "spacenet_accuracy_ratio") == pytest.approx(0.7)
    assert sample(registry, "spacenet_sample_accuracy_ratio") == pytest.approx(0.75)
    assert sample(registry, "spacenet_average_forgetting_ratio") == pytest.approx(0.3)
    assert sample(registry, "spacenet_backward_transfer_ratio") == pytest.approx(-0.3)


def test_task_labels_are_capped(net: SpaceNet) -> None:
    for classes in ([0, 1], [2, 3], [4, 5]):
        net.begin_task(classes)
        net.end_task()
    rows = [[0.9, 0.0, 0.0], [0.8, 0.9, 0.0], [0.7, 0.8, 0.9]]
    registry = CollectorRegistry()
    registry.register(ModelStateCollector(lambda: {"0": ModelState.of(net, Matrix(rows))}, max_task_label=2))
    got = families(registry)
    assert sample(registry, "spacenet_task_labels_truncated") == 1.0
    for name in (
        "spacenet_task_accuracy_ratio",
        "spacenet_accuracy_matrix_ratio",
        "spacenet_task_reserved_neurons",
        "spacenet_task_forgetting_ratio",
    ):
        tasks = {labels["task"] for labels, _ in got[name]}
        assert tasks and tasks <= {"0", "1"}, name
    assert {labels["trained_through"] for labels, _ in got["spacenet_accuracy_matrix_ratio"]} == {"0", "1"}
    # The headline numbers still cover every task.
    assert sample(registry, "spacenet_accuracy_ratio") == pytest.approx(0.8)


def test_no_model_yet_and_failing_source_expose_empty_families() -> None:
    registry = CollectorRegistry()
    registry.register(ModelStateCollector(lambda: {}))
    got = families(registry)
    assert set(got) == FAMILIES
    assert got["spacenet_model_state_available"] == [({}, 0.0)]
    assert all(not samples for name, samples in got.items() if name.startswith("spacenet_layer_"))

    def broken() -> dict[str, ModelState]:
        raise RuntimeError("snapshot failed")

    registry = CollectorRegistry()
    registry.register(ModelStateCollector(broken))
    generate_latest(registry)
    assert registry.get_sample_value("spacenet_model_state_errors_total") == 2.0  # two scrapes so far
    assert registry.get_sample_value("spacenet_model_state_available") == 0.0


def test_task_inference_accuracy_only_with_the_option(net: SpaceNet) -> None:
    for accuracy in (None, 0.75):
        registry = CollectorRegistry()
        registry.register(
            ModelStateCollector(lambda a=accuracy: {"0": ModelState.of(net, task_inference_accuracy=a)})
        )
        assert sample(registry, "spacenet_task_inference_accuracy_ratio") == accuracy
        assert sample(registry, "spacenet_task_inference_bytes") == 0.0  # net has no statistics
        dense = sample(registry, "spacenet_dense_model_bytes")
        assert dense == 4 * (784 * 400 + 400 + 400 * 400 + 400 + 400 * 10 + 10)
        assert 0 < (sample(registry, "spacenet_learner_state_bytes") or 0) < 0.3 * dense


def test_shares_a_registry_with_service_metrics_without_clashes(net: SpaceNet) -> None:
    registry = CollectorRegistry()
    ServiceMetrics(registry)
    registry.register(ModelStateCollector(lambda: {"0": ModelState.of(net)}))
    names = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert names >= FAMILIES
    assert "spacenet_model_version" in names and "spacenet_current_task" in names
    # describe() names the families, so a second collector on the registry is refused.
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(ModelStateCollector(lambda: {}))
