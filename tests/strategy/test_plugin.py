"""SpaceNetPlugin inside real Avalanche strategies, on small synthetic class-incremental data."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.logging import TextLogger
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin
from torch.utils.data import TensorDataset

from spacenet.strategy import SpaceNetMLP, SpaceNetPlugin, TaskLogitNorm


class LabeledTensors(TensorDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y.tolist()


def gaussian_classes(labels: list[int], per_class: int, seed: int) -> LabeledTensors:
    """Well-separated Gaussian blobs in 784 dimensions, one per label."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(labels), 784, generator=torch.Generator().manual_seed(123)) * 1.5
    xs = [centers[i] + torch.randn(per_class, 784, generator=g) for i in range(len(labels))]
    ys = [torch.full((per_class,), label, dtype=torch.long) for label in labels]
    return LabeledTensors(torch.cat(xs).view(-1, 1, 28, 28), torch.cat(ys))


def benchmark(labels: list[int]):  # type: ignore[no-untyped-def]
    return nc_benchmark(
        gaussian_classes(labels, 200, 0),
        gaussian_classes(labels, 50, 1),
        n_experiences=5,
        task_labels=False,
        shuffle=False,
        fixed_class_order=labels,
    )


def run(labels: list[int], plugin: SpaceNetPlugin, model: SpaceNetMLP, extra: list | None = None):  # type: ignore[no-untyped-def,type-arg]
    bm = benchmark(labels)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    log = io.StringIO()
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), loss_metrics(stream=True), loggers=[TextLogger(log)]
    )
    sched = LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=1.0))
    strategy = Naive(
        model,
        opt,
        train_mb_size=32,
        train_epochs=3,
        eval_mb_size=256,
        plugins=[plugin, sched, *(extra or [])],
        evaluator=evaluator,
    )
    for exp in bm.train_stream:
        strategy.train(exp, num_workers=0)
    results = strategy.eval(bm.test_stream, num_workers=0)
    return bm, strategy, results, log.getvalue()


def round_trip(plugin: SpaceNetPlugin, fresh: SpaceNetPlugin, seed: int = 0) -> SpaceNetMLP:
    """Save ``plugin``'s state (it carries the weights) to a checkpoint and load it (weights
    only) into ``fresh``, attached to a new model built as the trained one was (after
    ``torch.manual_seed(seed)``); returns the new model."""
    buf = io.BytesIO()
    torch.save(plugin.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.manual_seed(seed)
    clone = SpaceNetMLP()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same initial weights: no warning
        fresh.attach(clone)  # the pending state applies now
    return clone


def stream_accuracy(results: dict[str, float]) -> float:
    return next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream/eval_phase/test_stream"))


def test_plugin_learns_every_task_with_evaluator_loggers_and_other_plugins() -> None:
    torch.manual_seed(0)
    model = SpaceNetMLP()
    plugin = SpaceNetPlugin(seed=0, n_select=40, n_reserve=20, connections=(2000, 400, 40))
    _, _, results, log = run(list(range(10)), plugin, model)
    # Blobs are easy; a forgetting-only learner would sit near 0.2.
    assert stream_accuracy(results) > 0.9
    assert "Top1_Acc_Stream" in log
    report = plugin.capacity()
    assert report.tasks_learned == 5 and report.classes_known == 10
    assert [c.reserved_neurons for c in report.layers] == [100, 100, 10]


def test_arbitrary_label_values_are_mapped_onto_the_output_layer() -> None:
    torch.manual_seed(0)
    labels = [907, 12, 450, 3, 88, 1000, 51, 600, 7, 300]
    model = SpaceNetMLP()
    plugin = SpaceNetPlugin(seed=0, n_select=40, n_reserve=20, connections=(2000, 400, 40))
    _, _, results, _ = run(labels, plugin, model)
    assert stream_accuracy(results) > 0.9
    assert sorted(plugin.spacenet.label_to_unit_) == sorted(labels)
    assert sorted(plugin.spacenet.label_to_unit_.values()) == list(range(10))


def test_calibration_option_runs_and_round_trips() -> None:
    torch.manual_seed(0)
    model = SpaceNetMLP()
    plugin = SpaceNetPlugin(
        seed=0, n_select=40, n_reserve=20, connections=(2000, 400, 40), calibration=TaskLogitNorm()
    )
    _, _, results, _ = run(list(range(10)), plugin, model)
    assert stream_accuracy(results) > 0.9
    assert plugin.calibration is not None and sorted(plugin.calibration.stats_) == [0, 1, 2, 3, 4]
    buf = io.BytesIO()
    torch.save(plugin.state_dict(), buf)
    buf.seek(0)
    again = SpaceNetPlugin(calibration=TaskLogitNorm())
    again.load_state_dict(torch.load(buf, weights_only=True))
    torch.manual_seed(0)
    again.attach(SpaceNetMLP())
    assert again.calibration is not None and again.calibration.stats_ == plugin.calibration.stats_


def test_saved_state_restores_identical_predictions() -> None:
    torch.manual_seed(0)
    model = SpaceNetMLP()
    plugin = SpaceNetPlugin(seed=0, n_select=40, n_reserve=20, connections=(2000, 400, 40))
    bm, _, _, _ = run(list(range(10)), plugin, model)
    restored = SpaceNetPlugin()
    clone = round_trip(plugin, restored)
    x = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(20)])
    assert torch.equal(model(x), clone(x))
    assert restored.capacity() == plugin.capacity()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plugin_on_cuda() -> None:
    torch.manual_seed(0)
    model = SpaceNetMLP().cuda()
    plugin = SpaceNetPlugin(seed=0, n_select=40, n_reserve=20, connections=(2000, 400, 40))
    bm = benchmark(list(range(10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    strategy = Naive(
        model,
        opt,
        train_mb_size=32,
        train_epochs=3,
        device="cuda",
        plugins=[plugin],
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
    )
    for exp in bm.train_stream:
        strategy.train(exp, num_workers=0)
    assert stream_accuracy(strategy.eval(bm.test_stream, num_workers=0)) > 0.8
    assert plugin.spacenet.layers_[0].conn_owner_.is_cuda
