"""Task-identity inference: per-task statistics from the task's own records, exact state
round trips, faithful mode untouched, and a clear gain on a small split-MNIST slice."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from spacenet.strategy import SpaceNetMLP, SpaceNetPlugin, bench
from spacenet.strategy.baselines import TrainSettings, task_inference_for
from spacenet.strategy.benchmarks import BENCHMARKS
from spacenet.strategy.task_inference import TaskInference, _Component, _pack, _Scorer, _unpack
from tests.strategy.test_plugin import benchmark, gaussian_classes, round_trip


def blobs(task: int, n: int = 300, d: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of task ``task`` as non-negative blobs in [0, 1]^d."""
    g = torch.Generator().manual_seed(task)
    centres = torch.rand(2, d, generator=torch.Generator().manual_seed(100 + task))
    x = torch.cat([(centres[c] + 0.1 * torch.randn(n, d, generator=g)).clamp(0, 1) for c in range(2)])
    return x, torch.arange(2 * n) // n + 2 * task


def mixtures(ti: TaskInference) -> dict[int, list[tuple[torch.Tensor, torch.Tensor, float, float]]]:
    return {u: [(c.mean, c.basis, c.noise, c.log_weight) for c in comps] for u, comps in ti.models_.items()}


def same(a: dict[int, Any], b: dict[int, Any]) -> bool:
    return a.keys() == b.keys() and all(
        all(
            torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2:] == y[2:]
            for x, y in zip(a[u], b[u], strict=True)
        )
        for u in a
    )


def test_a_task_is_fitted_from_its_own_records_and_later_tasks_never_touch_it() -> None:
    clean, poisoned = TaskInference(components=2, rank=3), TaskInference(components=2, rank=3)
    for ti in (clean, poisoned):
        ti.fit_task(0, *blobs(0))
    task0 = mixtures(clean)
    # Poison every statistic of task 0: if fitting task 1 read any of it, task 1 would differ.
    for comps in poisoned.models_.values():
        for c in comps:
            c.mean.fill_(float("nan"))
            c.basis.fill_(float("nan"))
    clean.fit_task(1, *blobs(1))
    poisoned.fit_task(1, *blobs(1))
    assert same(
        {u: m for u, m in mixtures(clean).items() if u >= 2},
        {u: m for u, m in mixtures(poisoned).items() if u >= 2},
    )
    assert same({u: m for u, m in mixtures(clean).items() if u < 2}, task0)  # task 0 unchanged
    assert clean.task_of_unit_ == {0: 0, 1: 0, 2: 1, 3: 1}


class RecordingTaskInference(TaskInference):
    """A real TaskInference that also records which labels each fit received."""

    def __init__(self) -> None:
        super().__init__(components=1, rank=4, input_range=(-5.0, 5.0))
        self.seen: list[tuple[int, list[int]]] = []

    def fit_task(self, task: int, inputs: torch.Tensor, units: torch.Tensor) -> None:
        self.seen.append((task, sorted(set(units.tolist()))))
        super().fit_task(task, inputs, units)


def train(plugin: SpaceNetPlugin, seed: int = 0) -> tuple[SpaceNetMLP, Any]:
    torch.manual_seed(seed)
    model = SpaceNetMLP()
    bm = benchmark(list(range(10)))
    strategy = Naive(
        model, torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=32, train_epochs=2,
        plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]),
    )  # fmt: skip
    for exp in bm.train_stream:
        strategy.train(exp, num_workers=0)
    return model, bm


def test_plugin_fits_each_task_from_its_experience_only() -> None:
    ti = RecordingTaskInference()
    train(SpaceNetPlugin(seed=0, n_select=40, n_reserve=20, connections=(2000, 400, 40), task_inference=ti))
    assert ti.seen == [(t, [2 * t, 2 * t + 1]) for t in range(5)]


def test_option_off_trains_bit_identically_and_leaves_outputs_alone() -> None:
    kw: dict[str, Any] = {"seed": 0, "n_select": 40, "n_reserve": 20, "connections": (2000, 400, 40)}
    faithful, _ = train(SpaceNetPlugin(**kw))
    with_ti_plugin = SpaceNetPlugin(
        **kw, task_inference=TaskInference(components=1, rank=4, input_range=(-5, 5))
    )
    with_ti, bm = train(with_ti_plugin)
    for a, b in zip(faithful.state_dict().values(), with_ti.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the option only adds statistics; training is untouched
    x = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(8)])
    logits = faithful(x)
    assert SpaceNetPlugin(**kw).spacenet.infer(logits, x) is logits


def test_state_round_trips_through_a_weights_only_checkpoint() -> None:
    kw: dict[str, Any] = {"seed": 0, "n_select": 40, "n_reserve": 20, "connections": (2000, 400, 40)}
    plugin = SpaceNetPlugin(**kw, task_inference=TaskInference(input_range=(-5, 5)))
    model, _ = train(plugin)
    restored = SpaceNetPlugin(**kw, task_inference=TaskInference(input_range=(-5, 5)))
    clone = round_trip(plugin, restored)
    x = gaussian_classes(list(range(10)), 20, 7).tensors[0]
    assert torch.equal(plugin.spacenet.infer(model(x), x), restored.spacenet.infer(clone(x), x))
    assert restored.capacity().task_inference_bytes == plugin.capacity().task_inference_bytes > 0


def test_state_without_statistics_is_refused() -> None:
    torch.manual_seed(0)
    plugin = SpaceNetPlugin(task_inference=TaskInference()).attach(SpaceNetMLP())
    torch.manual_seed(0)
    faithful = SpaceNetPlugin().attach(SpaceNetMLP())
    with pytest.raises(ValueError, match="no task_inference statistics"):
        plugin.spacenet.load_state_dict(faithful.spacenet.state_dict())


def test_statistics_of_five_mnist_sized_tasks_fit_in_160_kb() -> None:
    ti = TaskInference()  # the defaults spacenet_ti uses, on 784-pixel inputs
    g = torch.Generator().manual_seed(0)
    for task in range(5):
        x = torch.rand(400, 784, generator=g) ** 4
        ti.fit_task(task, x, torch.arange(400) % 2 + 2 * task)
    assert sum(len(c) for c in ti.models_.values()) == 40  # 4 components for each class
    assert 150_000 < ti.nbytes <= 160_000


@pytest.mark.parametrize("bits", [4, 8])
def test_coefficients_pack_and_unpack_exactly(bits: int) -> None:
    q = 2 ** (bits - 1) - 1
    coeffs = torch.randint(
        -q, q + 1, (3, 7, 5), generator=torch.Generator().manual_seed(bits), dtype=torch.int8
    )
    assert torch.equal(_unpack(_pack(coeffs, bits), bits, 7, 5), coeffs)


def test_calibration_and_task_inference_are_exclusive() -> None:
    from spacenet.strategy import TaskLogitNorm

    with pytest.raises(ValueError, match="choose one"):
        SpaceNetPlugin(calibration=TaskLogitNorm(), task_inference=TaskInference())


def test_task_inference_beats_faithful_mode_widely_on_a_split_mnist_slice() -> None:
    # 1000 training images a class at lr 0.05: enough steps for SpaceNet to learn its tasks
    # (about as well as on full MNIST at lr 0.01).
    settings = TrainSettings(epochs=4, lr=0.05, input_range=BENCHMARKS["split_mnist"].input_range)
    accuracy = {}
    for name in ("spacenet", "spacenet_ti"):
        config = bench.RunConfig(
            "split_mnist", name, 0, settings, subset_per_class=1000, test_subset_per_class=100, progress=False
        )
        accuracy[name] = bench.run_one(config)["final_accuracy"]
    assert accuracy["spacenet_ti"] > accuracy["spacenet"] + 0.15, accuracy
    assert accuracy["spacenet_ti"] > 0.85, accuracy
    assert task_inference_for(settings, 0).input_range == settings.input_range


def test_batched_scorer_matches_the_dense_gaussian_density() -> None:
    g = torch.Generator().manual_seed(3)
    comps = [
        _Component(torch.rand(12, generator=g).double(), torch.randn(12, k, generator=g).double(), 0.05, -0.7)
        for k in (3, 2)
    ]
    z = torch.rand(20, 12, generator=g)
    covariances = [c.basis @ c.basis.T + c.noise * torch.eye(12) for c in comps]
    dense = torch.stack(
        [
            torch.distributions.MultivariateNormal(c.mean, cov).log_prob(z.double()) + c.log_weight
            for c, cov in zip(comps, covariances, strict=True)
        ],
        dim=1,
    )
    assert torch.allclose(_Scorer([[c] for c in comps])(z).double(), dense, atol=1e-3)
    assert torch.allclose(_Scorer([comps])(z).double()[:, 0], torch.logsumexp(dense, dim=1), atol=1e-3)


def test_end_task_needs_the_observed_records_and_discards_them() -> None:
    from spacenet.strategy import SpaceNet

    net = SpaceNet(task_inference=TaskInference(components=1, rank=2, input_range=(-5, 5))).attach(
        SpaceNetMLP()
    )
    net.begin_task([0, 1])
    with pytest.raises(RuntimeError, match="observe"):
        net.end_task()
    x, y = gaussian_classes([0, 1], 30, 0).tensors
    net.observe(x, y)
    net.end_epoch(last=False)
    net.observe(x + 100, y)  # later epochs are not kept: the first already held every record
    net.end_task()
    assert net.task_records_ == [] and sorted(net.task_inference.models_) == [0, 1]  # type: ignore[union-attr]
    assert torch.equal(net.task_inference.predict_task(x), torch.zeros(60, dtype=torch.long))  # type: ignore[union-attr]
